"""etcd frozen (SIGSTOP) while the guest is paused for stop-and-copy, before the destination sent
its commit: the destination's check right before the commit finds etcd silent and refuses the
switchover, so the source resumes at once and the guest's blackout stays far below the outage;
the job ends ROLLED_BACK once etcd is back, the controller runs on the source alone, and every
acknowledged write reads back.

This test freezes an etcd of its own (the shared one serves every other test)."""

from __future__ import annotations

import time
from collections.abc import Iterator

import grpc
import pytest

from orchctl.localcluster import LocalCluster, wait_for
from orchestrator.runner import NOT_COMMITTED
from proto.v1 import agent_pb2, agent_pb2_grpc, migration_pb2
from tests.clusterprobe import (
    TERMINAL,
    controller,
    create_controller,
    migrate,
    owners,
    running_on,
    verify,
    wait_phase,
)

MiB = 1 << 20
FREEZE_S = 10.0
NODES = ["n1", "n2"]


@pytest.fixture
def own_etcd_cluster() -> Iterator[LocalCluster]:
    # Leases far longer than the freeze: this test is about the switchover, not about leases
    # expiring while etcd sleeps (a leader change is covered by the fault matrix).
    with LocalCluster(lease_ttl_s=60) as c:
        c.start_etcd()
        c.start_with_agents(NODES)
        yield c


def test_etcd_frozen_during_the_pause_resumes_the_source_at_once(own_etcd_cluster: LocalCluster) -> None:
    cluster = own_etcd_cluster
    create_controller(cluster, "n1", "o1", 4 * MiB, write_iops=150)
    # A slow link and a generous downtime budget: the last copy, with the guest paused, lasts
    # long enough (about a second) to freeze etcd inside it.
    job = migrate(cluster, "o1", to="n2", bandwidth_bytes_per_s=MiB // 2, max_downtime_ms=3000)
    wait_phase(cluster, job.id, {migration_pb2.DIRTY_ITERATION, migration_pb2.STOP_AND_COPY}, timeout_s=120)

    source = cluster.node("n1")
    assert source is not None
    # Asked of the agent straight: the orchestrator's node list reads etcd, which will be frozen.
    source_channel = grpc.insecure_channel(source.address)
    source_stub = agent_pb2_grpc.AgentServiceStub(source_channel)

    def paused() -> bool:
        status = source_stub.GetController(agent_pb2.GetControllerRequest(controller_id="o1"), timeout=5)
        return status.vfio_state not in ("RUNNING", "PRE_COPY")
    wait_for("the guest to pause for stop-and-copy", paused, 120, interval_s=0.005)
    cluster.freeze_etcd()
    frozen_at = time.monotonic()
    try:
        # The guest runs again on the source while etcd is still frozen.
        wait_for("the source to resume while etcd is frozen", lambda: not paused(), FREEZE_S - 1, interval_s=0.05)
        resumed_after_s = time.monotonic() - frozen_at
        assert resumed_after_s < FREEZE_S / 2
        wait_for("the rest of the freeze", lambda: time.monotonic() - frozen_at >= FREEZE_S, FREEZE_S + 1)
    finally:
        cluster.thaw_etcd()
        source_channel.close()

    ended = wait_phase(cluster, job.id, TERMINAL, timeout_s=120)
    assert migration_pb2.Phase.Name(ended.phase) == "ROLLED_BACK", ended.reason
    assert ended.reason.startswith(NOT_COMMITTED), ended.reason
    assert "etcd did not answer" in ended.reason, ended.reason
    workload = controller(cluster, "n1", "o1").workload
    assert workload.pauses >= 1
    # The guest's own measure: its longest gap between completions, far below the freeze.
    assert workload.max_gap_ms < FREEZE_S * 1000 / 2, workload
    assert owners(cluster)["o1"] == "n1"
    assert running_on(cluster, "o1", NODES) == ["n1"]
    result = verify(cluster, "n1", "o1")
    assert result.ok, result.first_mismatch
