"""Faults at the switchover's commit, which the destination sends itself once it loaded the state
(agent.host.Host.switch_over): a commit that etcd refuses because the leader that planned it lost
its term, an etcd that goes silent as the commit goes out, and a destination that dies right after
its commit landed. Real agents and orchestrator as processes, and an etcd of each test's own (it
is frozen, or the leader's lease revoked under it); the agents take InjectFault to hold the commit
or to exit right after it.

The rules checked: the destination never runs the controller unless its commit landed; a refused
commit lets the source resume at once; an outcome nobody knows keeps both sides paused until etcd
says who owns the controller; afterwards the controller runs on its owner alone, with every
acknowledged write."""

from __future__ import annotations

import json
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
    etcd_json,
    migrate,
    owners,
    running_on,
    verify,
    wait_phase,
)
from tests.conftest import etcdctl

MiB = 1 << 20
NODES = ["n1", "n2"]
HOLD_MS = 3000  # long enough to act in, far below every deadline
WATCH_PAUSED_S = 3.0  # how long both sides must stay paused while the commit's outcome is unknown


def inject(cluster: LocalCluster, node: str, **fault: object) -> None:
    channel, stub = cluster.agent_stub(node)
    with channel:
        stub.InjectFault(agent_pb2.InjectFaultRequest(**fault), timeout=10)  # type: ignore[arg-type]


def logged(cluster: LocalCluster, node: str, text: str) -> bool:
    return text in cluster.agents[node].log_path.read_text(errors="replace")


def wait_logged(cluster: LocalCluster, node: str, text: str, timeout_s: float = 120) -> None:
    wait_for(f"{node} to log {text!r}", lambda: logged(cluster, node, text), timeout_s, interval_s=0.01)


def runs_at(address: str, cid: str) -> bool:
    """Asked of the agent at `address` straight: the orchestrator's node list reads etcd."""
    with grpc.insecure_channel(address) as channel:
        try:
            status = agent_pb2_grpc.AgentServiceStub(channel).GetController(
                agent_pb2.GetControllerRequest(controller_id=cid), timeout=5)
        except grpc.RpcError:
            return False
    return status.vfio_state in ("RUNNING", "PRE_COPY")


@pytest.fixture
def cluster() -> Iterator[LocalCluster]:
    # Leases far longer than an etcd freeze: these tests are about the commit, not about leases
    # running out while etcd sleeps (the revoke test revokes the leader's by hand).
    with LocalCluster(lease_ttl_s=60, allow_fault_injection=True) as c:
        c.start_etcd()
        c.start_with_agents(NODES)
        yield c


@pytest.fixture
def short_lease_cluster() -> Iterator[LocalCluster]:
    # Short leases: a killed agent's name is free again soon, for its restart.
    with LocalCluster(allow_fault_injection=True) as c:
        c.start_etcd()
        c.start_with_agents(NODES)
        yield c


def test_a_commit_refused_for_a_stale_leader_term_resumes_the_source_and_rolls_back(cluster: LocalCluster) -> None:
    create_controller(cluster, "n1", "c1", 4 * MiB, write_iops=150)
    inject(cluster, "n2", hold_commit_ms=HOLD_MS)
    job = migrate(cluster, "c1", to="n2", max_downtime_ms=5000)
    # The destination checked etcd (the planning leader's term was current) and holds its commit:
    # the leader loses its lease meanwhile, so the term the plan carries is stale when it goes out.
    wait_logged(cluster, "n2", f"job={job.id} step=dst.etcd_checked")
    got = json.loads(etcdctl(cluster.etcd_endpoint, "get", f"{cluster.etcd_prefix}leader", "-w", "json"))
    (leader,) = got["kvs"]
    etcdctl(cluster.etcd_endpoint, "lease", "revoke", format(int(leader["lease"]), "x"))

    ended = wait_phase(cluster, job.id, TERMINAL, timeout_s=120)
    assert migration_pb2.Phase.Name(ended.phase) == "ROLLED_BACK", ended.reason
    assert NOT_COMMITTED in ended.reason and "refused" in ended.reason, ended.reason
    # The source resumed on the destination's refusal, not on a later word of the orchestrator.
    assert logged(cluster, "n1", f"job={job.id} step=src.resumed_here")
    assert not logged(cluster, "n2", f"job={job.id} step=dst.committed")
    record = etcd_json(cluster, f"{cluster.etcd_prefix}controllers/c1")
    assert record is not None and (record["node"], record["state"]) == ("n1", "RUNNING"), record
    assert owners(cluster)["c1"] == "n1"
    assert running_on(cluster, "c1", NODES) == ["n1"]
    result = verify(cluster, "n1", "c1")
    assert result.ok, result.first_mismatch


def test_etcd_silent_at_the_commit_keeps_both_sides_paused_until_etcd_says_who_owns_it(
        cluster: LocalCluster) -> None:
    create_controller(cluster, "n1", "c1", 4 * MiB, write_iops=150)
    inject(cluster, "n2", hold_commit_ms=HOLD_MS)
    job = migrate(cluster, "c1", to="n2", max_downtime_ms=5000)
    addresses = {}
    for name in NODES:
        node = cluster.node(name)
        assert node is not None
        addresses[name] = node.address
    wait_logged(cluster, "n2", f"job={job.id} step=dst.etcd_checked")
    # etcd answered the destination's check; it goes silent before the held commit goes out.
    cluster.freeze_etcd()
    try:
        wait_logged(cluster, "n2", "etcd did not confirm the switchover's commit", HOLD_MS / 1000 + 30)
        # Nobody knows whether the commit landed: neither side may run the controller.
        until = time.monotonic() + WATCH_PAUSED_S
        while time.monotonic() < until:
            assert not runs_at(addresses["n1"], "c1"), "the source resumed while the commit's outcome was unknown"
            assert not runs_at(addresses["n2"], "c1"), "the destination ran it while the commit's outcome was unknown"
            time.sleep(0.05)  # sampling the window, not waiting for anything
    finally:
        cluster.thaw_etcd()

    ended = wait_phase(cluster, job.id, TERMINAL, timeout_s=180)
    phase = migration_pb2.Phase.Name(ended.phase)
    assert phase in ("COMPLETED", "ROLLED_BACK"), ended.reason
    record = etcd_json(cluster, f"{cluster.etcd_prefix}controllers/c1")
    assert record is not None and record["state"] == "RUNNING", record
    owner = str(record["node"])
    assert owner == ("n2" if phase == "COMPLETED" else "n1"), (phase, record)
    wait_for(f"c1 to run on {owner} alone", lambda: running_on(cluster, "c1", NODES) == [owner], 60)
    result = verify(cluster, owner, "c1")
    assert result.ok, result.first_mismatch


def test_a_destination_killed_right_after_its_commit_leaves_the_controller_to_it_alone(
        short_lease_cluster: LocalCluster) -> None:
    cluster = short_lease_cluster
    create_controller(cluster, "n1", "c1", 4 * MiB, write_iops=150)
    inject(cluster, "n2", exit_after_commit=True)
    job = migrate(cluster, "c1", to="n2", max_downtime_ms=5000)
    wait_for("n2 to exit after its commit", lambda: cluster.agents["n2"].exited() is not None, 120)

    # The commit landed: the switchover happened, though nobody saw the destination run it.
    ended = wait_phase(cluster, job.id, TERMINAL, timeout_s=120)
    assert migration_pb2.Phase.Name(ended.phase) == "COMPLETED", ended.reason
    record = etcd_json(cluster, f"{cluster.etcd_prefix}controllers/c1")
    assert record is not None and (record["node"], record["state"]) == ("n2", "RUNNING"), record
    # The source keeps its copy suspended: it never runs it again.
    assert controller(cluster, "n1", "c1").vfio_state not in ("RUNNING", "PRE_COPY")

    # The destination, restarted, runs the controller it committed: on it alone.
    cluster.start_agent("n2")
    wait_for("c1 to run on n2 alone", lambda: running_on(cluster, "c1", NODES) == ["n2"], 60)
    assert owners(cluster)["c1"] == "n2"
