"""An agent on the nvme-passthru backend hosts a controller on a VF slot and migrates it to an
emulated agent and back, with real processes (etcd, orchestrator, agents) and real clients.

The passthru agent is the production agent over a FAKE PF (tests/fakes/fake_pf_agent.py): a VF
has no built-in guest, so the data is checked as a VM's would be: a pattern written into the VF's
namespace (its media, a file under the agent's data dir) with qemu-io before the move, read back
through the NBD export on the emulated agent with qemu-io, a second pattern written there, and
both found on the VF's media after the move back.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from orchctl.localcluster import LocalCluster, wait_for
from proto.v1 import agent_pb2, migration_pb2
from tests.clusterprobe import TERMINAL, migrate, wait_phase, wait_verified
from tests.nbdprobe import export, qemu_io

MiB = 1 << 20
SLOT_BYTES = 4 * MiB
pytestmark = pytest.mark.skipif(not shutil.which("qemu-io"), reason="needs qemu-utils (scripts/setup.sh installs it)")


@pytest.fixture
def mixed() -> Iterator[LocalCluster]:
    """etcd, an orchestrator, n1 on nvme-passthru over a fake PF with two 4 MiB VFs, n2 emulated."""
    with LocalCluster() as c:
        c.start_etcd()
        c.start_orchestrator()
        c.start_agent("n1", capacity=None, module="tests.fakes.fake_pf_agent",
                      extra_args=["--fake-vfs", "2", "--fake-namespace", "4M"])
        c.start_agent("n2")
        yield c


def media(cluster: LocalCluster, path: str, *commands: str) -> subprocess.CompletedProcess[str]:
    """qemu-io on a VF's namespace as the PF sees it (the fake's media file)."""
    argv = ["qemu-io", "-f", "raw", path]
    for command in commands:
        argv += ["-c", command]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)


def verified(done: subprocess.CompletedProcess[str]) -> bool:
    return done.returncode == 0 and "Pattern verification failed" not in done.stdout


def slots(cluster: LocalCluster) -> dict[str, dict[str, object]]:
    """The passthru agent's slot inventory, as it keeps it in its data dir."""
    inventory: dict[str, dict[str, object]] = json.loads((cluster.workdir / "n1" / "nvme-passthru.slots").read_text())
    return inventory["slots"]  # type: ignore[return-value]


def slot_of(cluster: LocalCluster, cid: str) -> str:
    (path,) = [str(s["path"]) for s in slots(cluster).values() if s["controller_id"] == cid and not s["job_id"]]
    return path


def allocated(cluster: LocalCluster, node: str, expected: int) -> bool:
    record = cluster.node(node)
    return record is not None and record.allocated_bytes == expected


def test_a_passthru_controller_migrates_to_an_emulated_agent_and_back(mixed: LocalCluster) -> None:
    n1 = mixed.node("n1")
    assert n1 is not None and n1.capacity_bytes == 2 * SLOT_BYTES and n1.allocated_bytes == 0
    channel, agent = mixed.agent_stub("n1")
    with channel:
        # No built-in guest on a VF: a prefill is refused by name, and so is a size no slot has.
        with pytest.raises(grpc.RpcError) as refused:
            agent.CreateController(agent_pb2.CreateControllerRequest(controller_id="p1", namespace_bytes=SLOT_BYTES,
                                                                      prefill=True), timeout=30)
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION  # type: ignore[attr-defined]
        assert "backend nvme-passthru, which has no built-in guest" in refused.value.details()  # type: ignore[attr-defined]
        with pytest.raises(grpc.RpcError) as no_slot:
            agent.CreateController(agent_pb2.CreateControllerRequest(controller_id="p1", namespace_bytes=8 * MiB),
                                   timeout=30)
        assert "no free nvme-passthru slot of 8388608 bytes" in no_slot.value.details()  # type: ignore[attr-defined]
        agent.CreateController(agent_pb2.CreateControllerRequest(controller_id="p1", namespace_bytes=SLOT_BYTES),
                               timeout=30)
    wait_for("n1 to report one slot taken", lambda: allocated(mixed, "n1", SLOT_BYTES), 30)
    first_slot = slot_of(mixed, "p1")
    assert verified(media(mixed, first_slot, "write -P 0xab 0 1M"))  # what the VM wrote before the move

    job = migrate(mixed, "p1", to="n2")
    job = wait_phase(mixed, job.id, TERMINAL)
    assert migration_pb2.Phase.Name(job.phase) == "COMPLETED", job.reason
    job = wait_verified(mixed, job.id)  # the source's slot is released once it passes
    assert job.verification == migration_pb2.VERIFICATION_PASSED, job.verification_note
    assert job.source_digest and job.source_digest == job.destination_digest
    wait_for("n1 to report its slot free", lambda: allocated(mixed, "n1", 0), 30)
    assert all(not s["controller_id"] for s in slots(mixed).values())
    (released,) = [s for s in slots(mixed).values() if s["path"] == first_slot]
    assert released["zeroed"] and verified(media(mixed, first_slot, "read -P 0 0 4M"))  # sanitized

    moved = export(mixed, "p1")
    assert moved.node == "n2"
    assert verified(qemu_io(moved.uri, "read -P 0xab 0 1M", "read -P 0 1M 3M"))
    assert verified(qemu_io(moved.uri, "write -P 0xcd 1M 1M", "read -P 0xcd 1M 1M"))

    back = migrate(mixed, "p1", to="n1")
    back = wait_phase(mixed, back.id, TERMINAL)
    assert migration_pb2.Phase.Name(back.phase) == "COMPLETED", back.reason
    back = wait_verified(mixed, back.id)  # the source's slot is released once it passes
    assert back.verification == migration_pb2.VERIFICATION_PASSED, back.verification_note
    assert back.source_digest and back.source_digest == back.destination_digest
    wait_for("n1 to report one slot taken again", lambda: allocated(mixed, "n1", SLOT_BYTES), 30)
    # The VF the controller landed on (the released one, left suspended, or the other) holds both
    # patterns; every other slot reads as zeros.
    landed = slot_of(mixed, "p1")
    assert landed == first_slot  # the lowest free CNTLID: the VF its release left suspended, taken again
    assert verified(media(mixed, landed, "read -P 0xab 0 1M", "read -P 0xcd 1M 1M", "read -P 0 2M 2M"))
    for other in {str(s["path"]) for s in slots(mixed).values()} - {landed}:
        assert verified(media(mixed, other, "read -P 0 0 4M"))
    channel, agent = mixed.agent_stub("n1")
    with channel:
        status = agent.GetController(agent_pb2.GetControllerRequest(controller_id="p1"), timeout=10)
        assert status.vfio_state == "RUNNING" and status.namespace_bytes == SLOT_BYTES
        with pytest.raises(grpc.RpcError) as no_export:
            agent.ExportController(agent_pb2.GetControllerRequest(controller_id="p1"), timeout=10)
        assert no_export.value.code() == grpc.StatusCode.FAILED_PRECONDITION  # type: ignore[attr-defined]
        assert "backend nvme-passthru has no NBD export" in no_export.value.details()  # type: ignore[attr-defined]
        with pytest.raises(grpc.RpcError) as no_verify:
            agent.Verify(agent_pb2.VerifyRequest(controller_id="p1"), timeout=10)
        assert "backend nvme-passthru has no built-in guest for Verify" in no_verify.value.details()  # type: ignore[attr-defined]
    assert Path(landed).stat().st_size == SLOT_BYTES
