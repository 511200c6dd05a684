"""A source too busy to answer, but alive, keeps its controller: the job rolls back, nothing is
marked lost. Real processes; the agent's event loop is stalled through its fault hook while its
lease thread keeps the node registered (what a host loaded past answering looks like)."""

from __future__ import annotations

import grpc

from orchctl.localcluster import LocalCluster, wait_for
from proto.v1 import agent_pb2, migration_pb2
from tests.clusterprobe import (
    TERMINAL,
    controller,
    create_controller,
    etcd_json,
    migrate,
    owners,
    running_on,
    verify,
    wait_phase,
)

MiB = 1 << 20
ALL = ["n1", "n2", "n3"]
STALL_S = 60.0  # past two of the transfer call's 20 s deadlines (its silence is judged between them)


def test_a_source_too_busy_to_answer_keeps_its_controller_and_the_job_rolls_back(cluster: LocalCluster) -> None:
    create_controller(cluster, "n1", "b1", 16 * MiB, write_iops=200)
    job = migrate(cluster, "b1", to="n2", bandwidth_bytes_per_s=1 * MiB)
    wait_phase(cluster, job.id, {migration_pb2.PRECOPY}, also=lambda j: j.bytes_transferred > 0)
    channel, stub = cluster.agent_stub("n1")
    with channel:
        stub.InjectFault(agent_pb2.InjectFaultRequest(stall_event_loop_ms=int(STALL_S * 1000)), timeout=5)

    job = wait_phase(cluster, job.id, TERMINAL, timeout_s=180)
    assert migration_pb2.Phase.Name(job.phase) == "ROLLED_BACK", job.reason
    assert "too busy to answer" in job.reason and "marked lost" not in job.reason
    record = etcd_json(cluster, f"{cluster.etcd_prefix}controllers/b1")
    assert record is not None and record["node"] == "n1" and record["state"] == "RUNNING"
    # Once n1 answers again, the reconciler finishes the abort: the guest runs on n1 only.
    def runs_on_n1() -> bool:
        try:
            return controller(cluster, "n1", "b1").vfio_state == "RUNNING"
        except grpc.RpcError:  # still stalled
            return False
    wait_for("b1 to run on n1 again", runs_on_n1, 120)
    assert owners(cluster)["b1"] == "n1"
    assert running_on(cluster, "b1", ALL) == ["n1"]
    result = verify(cluster, "n1", "b1")
    assert result.ok, result.first_mismatch
