"""A live migration end to end: real etcd, a real orchestrator process, real agent processes."""

from __future__ import annotations

import grpc
import pytest

from orchctl.localcluster import LocalCluster
from proto.v1 import agent_pb2, migration_pb2
from tests.clusterprobe import (
    CORRUPTED_FRAME,
    REPLAYED_FRAME,
    TERMINAL,
    controller,
    controller_missing,
    create_controller,
    etcd_json,
    etcd_keys,
    get_job,
    migrate,
    migrate_through_a_bad_frame,
    orchctl,
    owners,
    replace_orchestrator,
    running_on,
    verify,
    wait_more_writes,
    wait_phase,
    wait_verified,
)

MiB = 1 << 20
FORWARD = ["PENDING", "PREPARING", "PRECOPY", "DIRTY_ITERATION", "STOP_AND_COPY", "COMMIT", "RESUMING",
           "COMPLETED"]


def test_migration_completes_and_every_acknowledged_write_verifies(cluster: LocalCluster) -> None:
    create_controller(cluster, "n1", "c1", 16 * MiB, write_iops=500)
    job = migrate(cluster, "c1", to="n2")
    assert job.phase == migration_pb2.PENDING and job.source_node == "n1"
    job = wait_phase(cluster, job.id, TERMINAL)
    assert migration_pb2.Phase.Name(job.phase) == "COMPLETED", job.reason

    # the destination namespace equals the source's at switchover
    job = wait_verified(cluster, job.id)
    assert job.verification == migration_pb2.VERIFICATION_PASSED, job.verification_note
    assert job.source_digest and job.source_digest == job.destination_digest
    # every acknowledged write reads back on the destination, which now runs the guest
    result = verify(cluster, "n2", "c1")
    assert result.ok, result.first_mismatch
    assert result.blocks_checked == 16 * MiB // 4096
    assert result.controller.workload.blackout_ms > 0
    wait_more_writes(cluster, "n2", "c1", result.controller.workload.acked_writes)
    assert owners(cluster)["c1"] == "n2"
    assert running_on(cluster, "c1", ["n1", "n2", "n3"]) == ["n2"]
    assert controller_missing(cluster, "n1", "c1")
    assert not list((cluster.workdir / "n1").glob("c1*")), "source namespace was not sanitized"

    # the job record in etcd holds every phase with timings and byte counts
    record = etcd_json(cluster, f"{cluster.etcd_prefix}jobs/{job.id}")
    assert record is not None
    phases = record["phases"]
    assert isinstance(phases, list)
    assert [p["phase"] for p in phases] == FORWARD
    assert all(p["started_at"] > 0 for p in phases)
    assert all(p["duration_ms"] > 0 for p in phases[:-1])
    by_phase = {p["phase"]: p for p in phases}
    assert by_phase["PRECOPY"]["bytes"] >= 16 * MiB  # the prefilled namespace went across
    assert by_phase["STOP_AND_COPY"]["bytes"] > 0  # at least the controller state
    assert record["bytes_transferred"] == sum(p["bytes"] for p in phases)
    assert etcd_keys(cluster, f"{cluster.etcd_prefix}active/") == []


def test_cancel_during_precopy_leaves_the_controller_running_on_the_source(cluster: LocalCluster) -> None:
    create_controller(cluster, "n1", "c2", 32 * MiB, write_iops=300)
    job = migrate(cluster, "c2", to="n2", bandwidth_bytes_per_s=2 * MiB)
    wait_phase(cluster, job.id, {migration_pb2.PRECOPY}, also=lambda j: j.bytes_transferred > 0)
    channel, api = cluster.migration_stub()
    with channel:
        cancelled = api.CancelMigration(migration_pb2.CancelMigrationRequest(id=job.id), timeout=10)
    assert cancelled.cancel_requested
    job = wait_phase(cluster, job.id, TERMINAL)
    assert migration_pb2.Phase.Name(job.phase) == "CANCELLED", job.reason
    assert "cancelled" in job.reason

    status = controller(cluster, "n1", "c2")
    assert status.vfio_state == "RUNNING"
    assert status.workload.running and not status.workload.paused
    assert status.workload.pauses == 0, "the guest was paused although the job never reached stop-and-copy"
    assert status.workload.throttle_percent == 0
    wait_more_writes(cluster, "n1", "c2", status.workload.acked_writes)
    assert owners(cluster)["c2"] == "n1"
    assert running_on(cluster, "c2", ["n1", "n2", "n3"]) == ["n1"]
    assert controller_missing(cluster, "n2", "c2")
    assert cluster.node("n2").allocated_bytes == 0  # type: ignore[union-attr]
    assert not list((cluster.workdir / "n2").glob("c2*")), "destination did not discard its copy"
    result = verify(cluster, "n1", "c2")
    assert result.ok, result.first_mismatch


@pytest.mark.parametrize(("cid", "bad"), [("c3", CORRUPTED_FRAME), ("c3r", REPLAYED_FRAME)],
                         ids=["corrupted", "replayed"])
def test_a_corrupted_or_replayed_frame_is_detected_and_the_job_rolls_back(
        cluster: LocalCluster, cid: str, bad: tuple[agent_pb2.InjectFaultRequest, tuple[str, ...]]) -> None:
    migrate_through_a_bad_frame(cluster, cid, 16 * MiB, 300, ["n1", "n2", "n3"], bad)
    status = controller(cluster, "n1", cid)
    assert status.vfio_state == "RUNNING" and status.workload.running
    wait_more_writes(cluster, "n1", cid, status.workload.acked_writes)


def test_orchestrator_killed_in_precopy_and_restarted_finishes_the_job(cluster: LocalCluster) -> None:
    create_controller(cluster, "n1", "c4", 24 * MiB, write_iops=300)
    job = migrate(cluster, "c4", to="n2", bandwidth_bytes_per_s=6 * MiB)
    first = wait_phase(cluster, job.id, {migration_pb2.PRECOPY}, also=lambda j: j.bytes_transferred > 0)
    replace_orchestrator(cluster, "orch-2")
    job = wait_phase(cluster, job.id, TERMINAL, timeout_s=180)
    end = migration_pb2.Phase.Name(job.phase)
    print(f"after the restart the job ended {end} ({job.reason or 'no reason'}) with epoch {job.epoch}")
    assert end in ("COMPLETED", "ROLLED_BACK"), f"{end}: {job.reason}"
    assert job.epoch > first.epoch, "the new leader did not take the job over with a newer epoch"
    # continued from etcd: the precopy was attached to, not started over
    assert [p.phase for p in job.phases].count(migration_pb2.PRECOPY) == 1
    owner = owners(cluster)["c4"]
    assert owner == ("n2" if end == "COMPLETED" else "n1")
    assert running_on(cluster, "c4", ["n1", "n2", "n3"]) == [owner]
    result = verify(cluster, owner, "c4")
    assert result.ok, result.first_mismatch


@pytest.mark.parametrize(("request_fields", "code", "named"), [
    ({"controller_id": "nope"}, grpc.StatusCode.NOT_FOUND, "'nope'"),
    ({"controller_id": "Bad_ID!"}, grpc.StatusCode.INVALID_ARGUMENT, "'Bad_ID!'"),
    ({"controller_id": ""}, grpc.StatusCode.INVALID_ARGUMENT, "controller_id"),
    ({"controller_id": "c5", "destination_node": "n1"}, grpc.StatusCode.FAILED_PRECONDITION, "'n1'"),
    ({"controller_id": "c5", "destination_node": "n9"}, grpc.StatusCode.NOT_FOUND, "'n9'"),
    ({"controller_id": "c5", "destination_node": "N 2"}, grpc.StatusCode.INVALID_ARGUMENT, "'N 2'"),
    ({"controller_id": "c5", "policy": {"max_downtime_ms": 0}}, grpc.StatusCode.INVALID_ARGUMENT, "got 0"),
    ({"controller_id": "c5", "policy": {"max_rounds": -3}}, grpc.StatusCode.INVALID_ARGUMENT, "got -3"),
    ({"controller_id": "c5", "policy": {"bandwidth_bytes_per_s": -1}}, grpc.StatusCode.INVALID_ARGUMENT,
     "bandwidth_bytes_per_s"),
    # absurd values: bounded, and a huge name is echoed as a prefix (not RESOURCE_EXHAUSTED)
    ({"controller_id": "c5", "policy": {"max_downtime_ms": 2_000_001}}, grpc.StatusCode.INVALID_ARGUMENT,
     "max_downtime_ms 2000001 is out of range: give 1 to 2000000 ms"),
    ({"controller_id": "c5", "policy": {"max_rounds": 2**62}}, grpc.StatusCode.INVALID_ARGUMENT,
     "give 1 to 10000 rounds"),
    ({"controller_id": "c5", "policy": {"bandwidth_bytes_per_s": 1}}, grpc.StatusCode.INVALID_ARGUMENT,
     "below the floor of 65536 bytes/s"),
    ({"controller_id": "x" * 20_000}, grpc.StatusCode.INVALID_ARGUMENT, "... (20000 characters) is malformed"),
    ({"controller_id": "c5", "destination_node": "n" * 20_000}, grpc.StatusCode.INVALID_ARGUMENT,
     "(20000 characters)"),
])
def test_bad_migration_requests_are_refused_and_write_nothing(
        bad_input_cluster: LocalCluster, request_fields: dict[str, object], code: grpc.StatusCode,
        named: str) -> None:
    before = etcd_keys(bad_input_cluster, f"{bad_input_cluster.etcd_prefix}jobs/")
    fields = dict(request_fields)
    policy = migration_pb2.ConvergencePolicy(**fields.pop("policy", {}))  # type: ignore[arg-type]
    channel, api = bad_input_cluster.migration_stub()
    with channel, pytest.raises(grpc.RpcError) as caught:
        api.CreateMigration(migration_pb2.CreateMigrationRequest(policy=policy, **fields), timeout=10)  # type: ignore[arg-type]
    assert caught.value.code() == code, caught.value.details()  # type: ignore[attr-defined]
    assert named in caught.value.details()  # type: ignore[attr-defined]
    assert etcd_keys(bad_input_cluster, f"{bad_input_cluster.etcd_prefix}jobs/") == before
    assert etcd_keys(bad_input_cluster, f"{bad_input_cluster.etcd_prefix}active/") == []


@pytest.mark.parametrize(("job_id", "code"), [
    ("mig-", grpc.StatusCode.INVALID_ARGUMENT),
    ("../etc", grpc.StatusCode.INVALID_ARGUMENT),
    ("mig-0123456789ab", grpc.StatusCode.NOT_FOUND),
])
def test_bad_job_ids_are_refused(bad_input_cluster: LocalCluster, job_id: str, code: grpc.StatusCode) -> None:
    channel, api = bad_input_cluster.migration_stub()
    with channel:
        for call, request in ((api.GetMigration, migration_pb2.GetMigrationRequest(id=job_id)),
                              (api.CancelMigration, migration_pb2.CancelMigrationRequest(id=job_id))):
            with pytest.raises(grpc.RpcError) as caught:
                call(request, timeout=10)
            assert caught.value.code() == code  # type: ignore[attr-defined]
            assert repr(job_id) in caught.value.details()  # type: ignore[attr-defined]


def test_second_migration_of_a_moving_controller_is_refused(cluster: LocalCluster) -> None:
    create_controller(cluster, "n1", "c6", 32 * MiB, write_iops=100)
    job = migrate(cluster, "c6", to="n2", bandwidth_bytes_per_s=2 * MiB)
    with pytest.raises(grpc.RpcError) as caught:
        migrate(cluster, "c6", to="n3")
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION  # type: ignore[attr-defined]
    assert job.id in caught.value.details()  # type: ignore[attr-defined]
    channel, api = cluster.migration_stub()
    with channel:
        api.CancelMigration(migration_pb2.CancelMigrationRequest(id=job.id), timeout=10)
    assert get_job(cluster, job.id).cancel_requested
    wait_phase(cluster, job.id, TERMINAL)


def test_unconvergeable_job_throttles_the_guest_then_rolls_back_and_unthrottles(cluster: LocalCluster) -> None:
    # The guest dirties 8 MB/s against a 1 MiB/s cap: even throttled by 40% (the second step) it
    # leaves far more than 50 ms of blocks after every round.
    create_controller(cluster, "n1", "c7", 4 * MiB, write_iops=2000)
    job = migrate(cluster, "c7", to="n3", max_rounds=3, bandwidth_bytes_per_s=1 * MiB)
    throttled = wait_phase(cluster, job.id, {migration_pb2.DIRTY_ITERATION, *TERMINAL},
                           also=lambda j: j.throttle_percent > 0 or j.phase in TERMINAL)
    job = wait_phase(cluster, job.id, TERMINAL)
    assert migration_pb2.Phase.Name(job.phase) == "ROLLED_BACK", job.reason
    assert "did not converge in 3 rounds" in job.reason
    assert throttled.throttle_percent > 0 or job.throttle_percent > 0
    status = controller(cluster, "n1", "c7")
    assert status.vfio_state == "RUNNING" and status.workload.throttle_percent == 0
    assert status.workload.pauses == 0
    assert verify(cluster, "n1", "c7").ok


def test_force_policy_stops_and_copies_after_max_rounds(cluster: LocalCluster) -> None:
    # 1 ms leaves half a millisecond of blocks at 1 MiB/s (none), and the guest always dirties some.
    create_controller(cluster, "n1", "c8", 2 * MiB, write_iops=2000)
    job = migrate(cluster, "c8", to="n3", max_downtime_ms=1, max_rounds=2, bandwidth_bytes_per_s=1 * MiB,
                  on_no_convergence=migration_pb2.FORCE)
    job = wait_phase(cluster, job.id, TERMINAL)
    assert migration_pb2.Phase.Name(job.phase) == "COMPLETED", job.reason
    assert job.rounds == 2 and job.throttle_percent == 0
    stop = next(p for p in job.phases if p.phase == migration_pb2.STOP_AND_COPY)
    assert "forced stop-and-copy after 2 rounds" in stop.note
    result = verify(cluster, "n3", "c8")
    assert result.ok, result.first_mismatch
    # No switchover takes 1 ms: the job completed, and says it broke its budget, everywhere.
    assert job.downtime_budget_exceeded and job.predicted_downtime_ms > 1, job
    assert not job.reason
    assert "over the downtime budget of 1 ms" in job.phases[-1].note
    shown = orchctl(cluster, "get", job.id)
    assert shown.returncode == 0, shown.stderr
    assert f"warning: migration {job.id}: switchover" in shown.stderr
    assert "over its downtime budget of 1 ms (predicted" in shown.stderr
    assert "over budget" in shown.stdout


def test_a_switchover_within_its_budget_says_nothing(cluster: LocalCluster) -> None:
    create_controller(cluster, "n1", "c10", 4 * MiB, write_iops=200)
    job = wait_phase(cluster, migrate(cluster, "c10", to="n2", max_downtime_ms=60_000).id, TERMINAL)
    assert migration_pb2.Phase.Name(job.phase) == "COMPLETED", job.reason
    assert 0 < job.downtime_ms <= 60_000 and not job.downtime_budget_exceeded
    assert 0 < job.predicted_downtime_ms <= 60_000
    shown = orchctl(cluster, "get", job.id)
    assert shown.returncode == 0 and "warning" not in shown.stderr, shown.stderr


def test_orchctl_drives_a_migration_against_the_real_orchestrator(cluster: LocalCluster) -> None:
    import json
    import subprocess
    import sys

    create_controller(cluster, "n2", "c9", 4 * MiB, write_iops=200)
    base = [sys.executable, "-m", "orchctl.cli", "--server", cluster.orchestrator_address]
    done = subprocess.run([*base, "migrate", "c9", "--wait"], capture_output=True, text=True, timeout=120,
                          check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    listed = json.loads(subprocess.run([*base, "-o", "json", "list"], capture_output=True, text=True,
                                       timeout=30, check=True).stdout)
    jobs = listed["migrations"] if isinstance(listed, dict) else listed
    (job,) = [j for j in jobs if j["controller_id"] == "c9"]
    assert job["phase"] == "COMPLETED" and job["destination_node"] in ("n1", "n3")
    refused = subprocess.run([*base, "migrate", "c9", "--to", "nowhere"], capture_output=True, text=True,
                             timeout=30, check=False)
    assert refused.returncode == 2 and "'nowhere'" in refused.stderr and "Traceback" not in refused.stderr


def test_a_guest_that_only_prefilled_does_not_start_writing_on_the_destination(cluster: LocalCluster) -> None:
    channel, n1 = cluster.agent_stub("n1")
    with channel:
        n1.CreateController(agent_pb2.CreateControllerRequest(controller_id="c10", namespace_bytes=4 * MiB,
                                                              prefill=True), timeout=60)
    job = wait_phase(cluster, migrate(cluster, "c10", to="n2").id, TERMINAL)
    assert migration_pb2.Phase.Name(job.phase) == "COMPLETED", job.reason
    status = controller(cluster, "n2", "c10")
    assert not status.workload.running
    result = verify(cluster, "n2", "c10")
    assert result.ok and result.blocks_checked == 4 * MiB // 4096
    assert controller(cluster, "n2", "c10").workload.next_seq == status.workload.next_seq  # nothing written
