"""A busy or briefly unregistered node is not taken for a dead one: real etcd, orchestrator and
agents as processes.

- a busy agent (many guests writing) whose controllers all move away at once keeps its lease,
  and nothing is declared lost;
- a node record missing from etcd while its agent lives (its key deleted and held away for longer
  than the orchestrator's grace window, or its lease revoked as etcd expires it) fails no
  migration from that node, and the agent registers again.
The heavy version of the first (100 controllers, minutes) is `python -m e2e.busy_agent`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import pytest

from e2e import busy_agent
from orchctl.localcluster import LocalCluster, wait_for
from orchestrator.liveness import default_grace_s
from proto.v1 import migration_pb2
from tests.clusterprobe import TERMINAL, create_controller, etcd_json, migrate, wait_phase
from tests.conftest import etcdctl, unique_prefix

MiB = 1 << 20
BUSY_CONTROLLERS = 30


@pytest.fixture
def busy_cluster(request: pytest.FixtureRequest, shared_etcd: str) -> Iterator[LocalCluster]:
    """Agents n1, n2 with a 1 s lease (a stalled refresh shows soon) and an orchestrator that
    drives every migration at once."""
    prefix = unique_prefix(request.node.name)
    try:
        with LocalCluster(lease_ttl_s=1, agent_call_budget_s=15.0) as c:
            c.use_etcd(shared_etcd, prefix)
            c.start_orchestrator(extra_args=["--max-concurrent", str(BUSY_CONTROLLERS)])
            c.start_agents(["n1", "n2"], capacity="8G")
            yield c
    finally:
        etcdctl(shared_etcd, "del", "--prefix", prefix)


def test_busy_agent_moves_everything_away_without_being_declared_lost(busy_cluster: LocalCluster) -> None:
    outcome = busy_agent.run(busy_cluster, controllers=BUSY_CONTROLLERS, namespace_bytes=4 * MiB,
                             write_iops=100, timeout_s=300)
    report = outcome.render()
    assert outcome.ok, report
    assert outcome.phases == {"COMPLETED": BUSY_CONTROLLERS}, report
    assert outcome.lease_expiries == 0, report


def node_key(cluster: LocalCluster, name: str) -> str:
    return f"{cluster.etcd_prefix}nodes/{name}"


def node_lease(cluster: LocalCluster, name: str) -> int | None:
    got = json.loads(etcdctl(cluster.etcd_endpoint, "get", node_key(cluster, name), "-w", "json"))
    kvs = got.get("kvs") or []
    return int(kvs[0]["lease"]) if kvs else None


def slow_migration_in_precopy(cluster: LocalCluster, cid: str) -> str:
    """A migration n1 -> n2 slow enough (1 MiB/s over 16 MiB) to outlast the fault; in PRECOPY."""
    create_controller(cluster, "n1", cid, 16 * MiB, write_iops=200)
    job = migrate(cluster, cid, to="n2", bandwidth_bytes_per_s=1 * MiB)
    wait_phase(cluster, job.id, {migration_pb2.PRECOPY}, also=lambda j: j.bytes_transferred > 0)
    return job.id


def assert_completed_and_running_on_n2(cluster: LocalCluster, job_id: str, cid: str) -> None:
    job = wait_phase(cluster, job_id, TERMINAL, timeout_s=180)
    assert migration_pb2.Phase.Name(job.phase) == "COMPLETED", job.reason
    record = etcd_json(cluster, f"{cluster.etcd_prefix}controllers/{cid}")
    assert record is not None and record["node"] == "n2" and record["state"] == "RUNNING", record


def test_node_record_held_away_past_the_grace_window_fails_no_migration_from_it(cluster: LocalCluster) -> None:
    job_id = slow_migration_in_precopy(cluster, "lv1")
    # The record stays away for longer than the grace window and the runner's silence budget
    # (what an agent whose lease keeps expiring under load looked like): the source answers
    # pings all along, so it is not lost.
    hold_s = max(default_grace_s(cluster.lease_ttl_s), cluster.agent_call_budget_s) + 2.0
    deadline = time.monotonic() + hold_s
    while time.monotonic() < deadline:
        etcdctl(cluster.etcd_endpoint, "del", node_key(cluster, "n1"))
        job = wait_phase(cluster, job_id, set(migration_pb2.Phase.values()))
        assert job.phase != migration_pb2.FAILED, job.reason
    # the agent puts its record back by itself
    wait_for("n1 to be registered again", lambda: node_lease(cluster, "n1"), 30)
    assert_completed_and_running_on_n2(cluster, job_id, "lv1")


def test_revoked_node_lease_fails_no_migration_and_the_agent_registers_again(cluster: LocalCluster) -> None:
    job_id = slow_migration_in_precopy(cluster, "lv2")
    old_lease = node_lease(cluster, "n1")
    assert old_lease is not None
    # etcd drops the lease as it does when it expires (e.g. after etcd was frozen and thawed)
    etcdctl(cluster.etcd_endpoint, "lease", "revoke", f"{old_lease:x}")
    wait_for("n1 to register under a new lease",
             lambda: (lease := node_lease(cluster, "n1")) is not None and lease != old_lease, 30)
    assert_completed_and_running_on_n2(cluster, job_id, "lv2")
    assert "node lease expired" in cluster.agents["n1"].tail(200)
