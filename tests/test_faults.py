"""Faults during a migration, against real processes: agents killed and restarted, stale epochs.

The full fault x phase matrix lives in e2e/; these are the product behaviours it relies on.
"""

from __future__ import annotations

import grpc
import pytest

from orchctl.localcluster import LocalCluster, wait_for
from proto.v1 import agent_pb2, migration_pb2
from tests.clusterprobe import (
    TERMINAL,
    controller,
    controller_missing,
    create_controller,
    etcd_json,
    migrate,
    owners,
    running_on,
    verify,
    wait_phase,
    wait_verified,
)

MiB = 1 << 20
ALL = ["n1", "n2", "n3"]


def phase_names(job: migration_pb2.Migration) -> list[str]:
    return [migration_pb2.Phase.Name(p.phase) for p in job.phases]


def test_destination_killed_in_precopy_the_job_moves_to_another_destination(cluster: LocalCluster) -> None:
    create_controller(cluster, "n1", "f1", 16 * MiB, write_iops=300)
    job = migrate(cluster, "f1", bandwidth_bytes_per_s=4 * MiB)
    first = wait_phase(cluster, job.id, {migration_pb2.PRECOPY}, also=lambda j: j.bytes_transferred > 0)
    lost = first.destination_node
    cluster.agents[lost].kill()
    job = wait_phase(cluster, job.id, TERMINAL, timeout_s=180)
    assert migration_pb2.Phase.Name(job.phase) == "COMPLETED", job.reason
    assert job.destination_node not in (lost, "n1")
    assert phase_names(job).count("PREPARING") == 2
    assert any(f"destination {lost} lost" in p.note for p in job.phases)
    alive = [n for n in ALL if n != lost]
    assert owners(cluster)["f1"] == job.destination_node
    assert running_on(cluster, "f1", alive) == [job.destination_node]
    result = verify(cluster, job.destination_node, "f1")
    assert result.ok, result.first_mismatch


def test_source_killed_in_precopy_fails_and_the_controller_is_marked_lost_not_resumed(
        cluster: LocalCluster) -> None:
    create_controller(cluster, "n1", "f2", 16 * MiB, write_iops=300)
    job = migrate(cluster, "f2", to="n2", bandwidth_bytes_per_s=4 * MiB)
    wait_phase(cluster, job.id, {migration_pb2.PRECOPY}, also=lambda j: j.bytes_transferred > 0)
    cluster.agents["n1"].kill()
    job = wait_phase(cluster, job.id, TERMINAL, timeout_s=120)
    assert migration_pb2.Phase.Name(job.phase) == "FAILED", job.reason
    assert "marked lost" in job.reason
    record = etcd_json(cluster, f"{cluster.etcd_prefix}controllers/f2")
    assert record is not None and record["state"] == "LOST" and record["node"] == "n1"
    assert controller_missing(cluster, "n2", "f2")
    assert not list((cluster.workdir / "n2").glob("f2*")), "destination kept a copy"

    # the source comes back: it recovers the namespace but does not run it without an operator
    cluster.start_agent("n1")
    assert controller(cluster, "n1", "f2").vfio_state == "STOP"
    assert running_on(cluster, "f2", ALL) == []


def test_agent_restart_recovers_its_controllers_and_they_still_migrate(cluster: LocalCluster) -> None:
    create_controller(cluster, "n3", "f3", 8 * MiB, write_iops=200)
    cluster.agents["n3"].kill()
    cluster.start_agent("n3")
    status = controller(cluster, "n3", "f3")
    assert status.vfio_state == "RUNNING" and status.namespace_bytes == 8 * MiB
    node = cluster.node("n3")
    assert node is not None and list(node.controllers) == ["f3"]
    job = migrate(cluster, "f3", to="n1")
    job = wait_phase(cluster, job.id, TERMINAL)
    assert migration_pb2.Phase.Name(job.phase) == "COMPLETED", job.reason
    job = wait_verified(cluster, job.id)
    assert job.verification == migration_pb2.VERIFICATION_PASSED, job.verification_note
    assert job.source_digest and job.source_digest == job.destination_digest
    assert running_on(cluster, "f3", ALL) == ["n1"]


def test_commands_with_a_stale_epoch_are_refused(cluster: LocalCluster) -> None:
    create_controller(cluster, "n1", "f4", 4 * MiB, write_iops=100)
    job = wait_phase(cluster, migrate(cluster, "f4", to="n2").id, TERMINAL)
    assert migration_pb2.Phase.Name(job.phase) == "COMPLETED", job.reason
    channel, n2 = cluster.agent_stub("n2")
    with channel, pytest.raises(grpc.RpcError) as caught:
        n2.AbortMigration(agent_pb2.MigrationRef(job_id=job.id, epoch=job.epoch - 1, controller_id="f4"),
                          timeout=10)
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION  # type: ignore[attr-defined]
    assert "stale epoch" in caught.value.details()  # type: ignore[attr-defined]
    # and a current-epoch abort after COMMIT is refused too: the destination runs it now
    channel, n2 = cluster.agent_stub("n2")
    with channel, pytest.raises(grpc.RpcError) as caught:
        n2.AbortMigration(agent_pb2.MigrationRef(job_id=job.id, epoch=job.epoch, controller_id="f4"), timeout=10)
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION  # type: ignore[attr-defined]
    assert running_on(cluster, "f4", ALL) == ["n2"]


def test_cordoned_nodes_are_never_chosen(cluster: LocalCluster) -> None:
    create_controller(cluster, "n1", "f5", 4 * MiB, write_iops=100)
    channel, api = cluster.migration_stub()
    with channel:
        node = api.CordonNode(migration_pb2.CordonNodeRequest(name="n2"), timeout=10)
        assert node.cordoned
        with pytest.raises(grpc.RpcError) as caught:
            api.CreateMigration(migration_pb2.CreateMigrationRequest(controller_id="f5", destination_node="n2"),
                                timeout=10)
        assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION  # type: ignore[attr-defined]
        assert "'n2' is cordoned" in caught.value.details()  # type: ignore[attr-defined]
        job = api.CreateMigration(migration_pb2.CreateMigrationRequest(controller_id="f5"), timeout=10)
        # the destination is chosen in PREPARING: keep n2 cordoned until then
        job = wait_phase(cluster, job.id, {migration_pb2.PRECOPY, *TERMINAL}, also=lambda j: j.destination_node)
        assert job.destination_node == "n3"
        listed = {n.name: n.cordoned for n in api.ListNodes(migration_pb2.ListNodesRequest(), timeout=10).nodes}
        assert listed == {"n1": False, "n2": True, "n3": False}
        api.UncordonNode(migration_pb2.CordonNodeRequest(name="n2"), timeout=10)
        assert not any(n.cordoned for n in api.ListNodes(migration_pb2.ListNodesRequest(), timeout=10).nodes)
    job = wait_phase(cluster, job.id, TERMINAL)
    assert migration_pb2.Phase.Name(job.phase) == "COMPLETED" and job.destination_node == "n3"


def test_orphaned_source_session_is_aborted_by_the_reconciler(cluster: LocalCluster) -> None:
    # A session for a job etcd never heard of (a stale orchestrator's): the leader's reconciler
    # finds it in the agent's report and aborts it, and the controller keeps running.
    create_controller(cluster, "n1", "f6", 4 * MiB, write_iops=100)
    channel, n1 = cluster.agent_stub("n1")
    with channel:
        n2 = cluster.node("n2")
        assert n2 is not None
        ghost = agent_pb2.MigrationRef(job_id="mig-00000000dead", epoch=1, controller_id="f6")
        with pytest.raises(grpc.RpcError):
            n1.StartPrecopy(agent_pb2.StartPrecopyRequest(ref=ghost, destination_data_address=n2.data_address,
                                                          token="not-a-token"), timeout=10)

        def aborted() -> bool:
            info = n1.GetInfo(agent_pb2.GetInfoRequest(), timeout=5)
            return any(s.job_id == ghost.job_id and s.stage == "aborted" for s in info.sessions)

        wait_for("the reconciler to abort the orphaned session", aborted, 30)
    status = controller(cluster, "n1", "f6")
    assert status.vfio_state == "RUNNING" and status.workload.running
