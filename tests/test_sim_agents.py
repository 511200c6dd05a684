"""The simulated agents (e2e/sim_agents.py, fakes for hosts we do not have) stay usable as the
protocol evolves: a handful register as ordinary nodes, and one migration between two of them runs
to COMPLETED through a real orchestrator on real etcd, verified, with the source released."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from cluster.records import RUNNING
from orchctl.localcluster import LocalCluster, Proc, wait_for
from proto.v1 import migration_pb2

SIM_NODES = [f"sim-{i:04d}" for i in range(4)]


@pytest.fixture
def sim_cluster(shared_etcd: str, etcd_prefix: str, tmp_path: Path) -> Iterator[tuple[LocalCluster, Proc, Path]]:
    events = tmp_path / "events.jsonl"
    with LocalCluster() as c:
        c.use_etcd(shared_etcd, etcd_prefix)
        c.start_orchestrator()
        log_path = tmp_path / "sim.log"
        with open(log_path, "wb") as log:
            popen = subprocess.Popen(
                [sys.executable, "-m", "e2e.sim_agents", "--etcd", shared_etcd, "--etcd-prefix", etcd_prefix,
                 "--count", str(len(SIM_NODES)), "--lease-ttl-s", "2", "--precopy-delay-ms", "20",
                 "--events", str(events)], stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True)
        sim = Proc("sim-agents", popen, log_path)
        try:
            yield c, sim, events
        finally:
            sim.stop()


def test_sim_agents_register_and_one_migration_completes(sim_cluster: tuple[LocalCluster, Proc, Path]) -> None:
    c, sim, events = sim_cluster
    wait_for("the simulated agents to register",
             lambda: {n.name for n in c.nodes()} >= set(SIM_NODES), 20.0, alive=sim.exited)
    assert all(n.live for n in c.nodes())
    channel, stub = c.migration_stub()
    with channel:
        made = stub.CreateController(migration_pb2.NewControllerRequest(
            controller_id="c1", namespace_bytes=64 << 20, node="sim-0000"), timeout=10)
        assert (made.node, made.state) == ("sim-0000", RUNNING)
        job = stub.CreateMigration(migration_pb2.CreateMigrationRequest(controller_id="c1",
                                                                        destination_node="sim-0003"), timeout=10)

        def ended() -> migration_pb2.Migration | None:
            got = stub.GetMigration(migration_pb2.GetMigrationRequest(id=job.id), timeout=5)
            return got if got.phase in (migration_pb2.COMPLETED, migration_pb2.FAILED, migration_pb2.ROLLED_BACK,
                                        migration_pb2.CANCELLED) else None
        done = wait_for(f"job {job.id} to end", ended, 20.0, alive=sim.exited)
        assert migration_pb2.Phase.Name(done.phase) == "COMPLETED", done.reason
        phases = [migration_pb2.Phase.Name(p.phase) for p in done.phases]
        assert phases == ["PENDING", "PREPARING", "PRECOPY", "DIRTY_ITERATION", "STOP_AND_COPY", "COMMIT",
                          "RESUMING", "COMPLETED"]
        assert done.bytes_transferred >= 64 << 20
        # the destination's claim of RUNNING is what etcd holds now
        owner = next(ctrl for ctrl in stub.ListControllers(migration_pb2.ListControllersRequest(),
                                                            timeout=5).controllers if ctrl.id == "c1")
        assert (owner.node, owner.state) == ("sim-0003", RUNNING)

        def verified_and_released() -> bool:
            got = stub.GetMigration(migration_pb2.GetMigrationRequest(id=job.id), timeout=5)
            nodes = {n.name: n for n in stub.ListNodes(migration_pb2.ListNodesRequest(), timeout=5).nodes}
            return (got.verification == migration_pb2.VERIFICATION_PASSED
                    and "c1" not in nodes["sim-0000"].controllers and "c1" in nodes["sim-0003"].controllers)
        wait_for("verification and the source's release", verified_and_released, 20.0, alive=sim.exited)
        # A migration to a node that cannot take it is refused by the simulated agent as by a real one.
        with pytest.raises(grpc.RpcError) as refused:
            stub.CreateMigration(migration_pb2.CreateMigrationRequest(controller_id="c1",
                                                                      destination_node="sim-0003"), timeout=10)
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    sim.stop()
    calls = events.read_text().splitlines()
    assert any('"call": "ResumeDestination"' in line and job.id in line for line in calls)
