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
HOLD_FINAL_S = 2.0
NODES = ["n1", "n2"]


@pytest.fixture
def own_etcd_cluster() -> Iterator[LocalCluster]:
    # Leases far longer than the freeze: this test is about the switchover, not about leases
    # expiring while etcd sleeps (a leader change is covered by the fault matrix).
    with LocalCluster(lease_ttl_s=60, allow_fault_injection=True) as c:
        c.start_etcd()
        c.start_with_agents(NODES)
        yield c


def test_etcd_frozen_during_the_pause_resumes_the_source_at_once(own_etcd_cluster: LocalCluster) -> None:
    cluster = own_etcd_cluster
    create_controller(cluster, "n1", "o1", 4 * MiB, write_iops=150)
    # The destination holds FINAL before it loads it and asks etcd: with the guest paused, a
    # window to freeze etcd in that does not depend on how fast the last blocks go (the last
    # copy ignores the bandwidth cap, and took milliseconds, sometimes less than the poll below).
    channel, stub = cluster.agent_stub("n2")
    with channel:
        stub.InjectFault(agent_pb2.InjectFaultRequest(hold_final_ms=int(HOLD_FINAL_S * 1000)), timeout=10)
    job = migrate(cluster, "o1", to="n2")

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
        # The hold, then the destination's etcd check (1 s) refuses: far less than the freeze.
        assert resumed_after_s < HOLD_FINAL_S + FREEZE_S / 2
        wait_for("the rest of the freeze", lambda: time.monotonic() - frozen_at >= FREEZE_S, FREEZE_S + 1)
    finally:
        cluster.thaw_etcd()
        source_channel.close()

    ended = wait_phase(cluster, job.id, TERMINAL, timeout_s=120)
    assert migration_pb2.Phase.Name(ended.phase) == "ROLLED_BACK", ended.reason
    assert ended.reason.startswith(NOT_COMMITTED), ended.reason
    assert "etcd did not answer" in ended.reason, ended.reason
    assert "holding FINAL" in cluster.agents["n2"].log_path.read_text(errors="replace")
    workload = controller(cluster, "n1", "o1").workload
    assert workload.pauses >= 1
    # The guest's own measure: its longest gap between completions (the hold, then the check)
    # stays well below the hold plus the freeze.
    assert workload.max_gap_ms < (HOLD_FINAL_S + FREEZE_S / 2) * 1000, workload
    assert owners(cluster)["o1"] == "n1"
    assert running_on(cluster, "o1", NODES) == ["n1"]
    result = verify(cluster, "n1", "o1")
    assert result.ok, result.first_mismatch
