"""A destination agent that resumes the guest from the switchover image after it had already run
it: the acknowledged writes of its first life are lost, and the restored guest replays the same
writes over them. Only a receipt taken before the restart shows it. Real etcd, a real
orchestrator, real agent processes; the older image is put back as the agent's own files."""

from __future__ import annotations

import os
import shutil

from agent.guest.blocks import run_label
from orchctl.localcluster import LocalCluster, wait_for
from proto.v1 import migration_pb2
from tests.clusterprobe import (
    TERMINAL,
    controller,
    create_controller,
    migrate,
    verify,
    wait_more_writes,
    wait_phase,
    wait_verified,
)

MiB = 1 << 20


def test_a_destination_restarted_from_the_switchover_image_fails_verify_with_a_receipt(
        cluster: LocalCluster) -> None:
    create_controller(cluster, "n1", "r1", 16 * MiB, write_iops=500)
    job = migrate(cluster, "r1", to="n2", bandwidth_bytes_per_s=8 * MiB)
    n2_dir = cluster.workdir / "n2"
    state_path = n2_dir / f"r1.{job.id}.state"
    # The destination writes its loaded controller and guest state (the switchover image) by
    # truncating and filling <state>.tmp, then renaming it; it deletes the file once it runs the
    # controller. A second name for that inode, made before stop-and-copy, keeps the image.
    tmp_path = state_path.with_name(state_path.name + ".tmp")
    captured = cluster.workdir / "switchover-image.state"
    tmp_path.touch()
    os.link(tmp_path, captured)
    # The guest's map comes in pieces before, into a journal beside the state file (truncated
    # and filled in place): the image is both.
    journal = state_path.with_suffix(".guestmap")
    captured_journal = cluster.workdir / "switchover-image.guestmap"
    journal.touch()
    os.link(journal, captured_journal)
    job = wait_phase(cluster, job.id, TERMINAL)
    assert migration_pb2.Phase.Name(job.phase) == "COMPLETED", job.reason
    assert job.phases[-2].phase == migration_pb2.RESUMING
    image = captured.read_bytes()
    assert image, "the destination did not write its state through <state>.tmp; the capture saw nothing"
    assert not state_path.exists() and not journal.exists()
    assert captured_journal.stat().st_size > 0, "the guest's map did not come in pieces"
    assert wait_verified(cluster, job.id).verification == migration_pb2.VERIFICATION_PASSED

    # The guest runs on n2 for a while; a receipt is taken, and it runs on past it.
    at_resume = controller(cluster, "n2", "r1").workload
    wait_more_writes(cluster, "n2", "r1", at_resume.acked_writes + 300)
    first_life = controller(cluster, "n2", "r1").workload
    receipt = first_life.receipt
    assert first_life.HasField("receipt") and receipt.run_id == first_life.run_id
    assert receipt.seq >= receipt.run_first_seq + 300
    wait_more_writes(cluster, "n2", "r1", first_life.acked_writes + 100)
    sane = verify(cluster, "n2", "r1", [receipt])
    assert sane.ok and sane.receipts_checked == 1, sane.first_mismatch
    last_seen_seq = sane.controller.workload.next_seq

    # n2 dies; on disk it is made to hold the switchover image again: the state file is back,
    # and the record that the destination namespace became the running controller is gone, so
    # the restarted agent reloads the destination from the image (agent.host.recover) and the
    # reconciler resumes it (the job completed and n2 owns r1).
    cluster.agents["n2"].kill()
    shutil.copyfile(captured, state_path)
    shutil.copyfile(captured_journal, journal)
    (n2_dir / "r1.json").unlink()
    cluster.start_agent("n2")

    def resumed_past_the_receipt() -> bool:
        try:
            status = controller(cluster, "n2", "r1")
        except Exception:
            return False
        return status.vfio_state == "RUNNING" and status.workload.next_seq > last_seen_seq + 100
    wait_for("the restarted n2 to resume r1 from the image and write past the receipt", resumed_past_the_receipt,
             120, interval_s=0.2)
    second_life = controller(cluster, "n2", "r1").workload
    assert second_life.run_id not in (receipt.run_id, 0)

    caught = verify(cluster, "n2", "r1", [receipt])
    assert not caught.ok
    assert caught.first_mismatch == (
        f"acknowledged write seq {receipt.seq} of run {run_label(receipt.run_id)}: not in the guest's history "
        f"(the guest resumed from an older image); writes {receipt.run_first_seq}..{receipt.seq} were lost")
    # The run that wrote from the image on is not the one the receipt names.
    assert second_life.receipt.run_first_seq == receipt.run_first_seq
