"""A busy agent's liveness: many busy guests on one agent, all migrated away at once.

Starts a local cluster (etcd of its own, one orchestrator, agents n1 and n2), creates
`--controllers` controllers on n1 whose guests write `--write-iops` times a second, then asks
for every one of them to move to n2 at the same time (the orchestrator drives them all
concurrently). A busy agent must not be taken for a dead one: the report counts the node-lease
expiries n1 logged, the jobs by outcome and the controllers marked LOST; the run fails when a
job FAILED or a controller is LOST.

Usage: python -m e2e.busy_agent [--controllers 30] [--namespace-mib 4] [--write-iops 100]
"""

from __future__ import annotations

import argparse
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from orchctl.localcluster import LocalCluster, wait_for
from proto.v1 import agent_pb2, migration_pb2

MiB = 1 << 20
LEASE_EXPIRED_LINE = "node lease expired"
TERMINAL = {migration_pb2.COMPLETED, migration_pb2.ROLLED_BACK, migration_pb2.FAILED, migration_pb2.CANCELLED}


@dataclass
class BusyOutcome:
    controllers: int
    lease_expiries: int  # "node lease expired" lines in the source agent's log
    phases: dict[str, int] = field(default_factory=dict)  # jobs by their terminal phase
    failed_reasons: list[str] = field(default_factory=list)
    lost_controllers: list[str] = field(default_factory=list)
    migrate_s: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.failed_reasons and not self.lost_controllers

    def render(self) -> str:
        lines = [f"controllers moved at once: {self.controllers}",
                 f"node lease expiries on the source: {self.lease_expiries}",
                 f"jobs by outcome: {dict(sorted(self.phases.items()))} in {self.migrate_s:.1f} s",
                 f"controllers LOST: {len(self.lost_controllers)} {self.lost_controllers[:5]}"]
        lines += [f"  FAILED: {reason}" for reason in self.failed_reasons[:5]]
        return "\n".join(lines)


def count_lease_expiries(log_path: Path) -> int:
    try:
        return log_path.read_text(errors="replace").count(LEASE_EXPIRED_LINE)
    except OSError:
        return 0


def create_busy_controllers(cluster: LocalCluster, node: str, ids: list[str], namespace_bytes: int,
                            write_iops: int) -> None:
    """Controllers with their guests writing, created a few at a time (each prefills its namespace)."""
    def create(cid: str) -> None:
        channel, stub = cluster.agent_stub(node)
        with channel:
            stub.CreateController(agent_pb2.CreateControllerRequest(
                controller_id=cid, namespace_bytes=namespace_bytes, prefill=True,
                workload=agent_pb2.WorkloadSpec(write_iops=write_iops, seed=7)), timeout=120)
    with ThreadPoolExecutor(max_workers=4) as pool:
        list(pool.map(create, ids))


def migrate_all_away(cluster: LocalCluster, ids: list[str], to: str, timeout_s: float) -> BusyOutcome:
    """Asks for every controller to move to `to` at once; waits for every job to end."""
    channel, api = cluster.migration_stub()
    with channel:
        started = time.monotonic()
        jobs = [api.CreateMigration(migration_pb2.CreateMigrationRequest(controller_id=cid, destination_node=to),
                                    timeout=30).id for cid in ids]
        ended: dict[str, migration_pb2.Migration] = {}

        def all_ended() -> bool:
            for job_id in jobs:
                if job_id not in ended:
                    job = api.GetMigration(migration_pb2.GetMigrationRequest(id=job_id), timeout=30)
                    if job.phase in TERMINAL:
                        ended[job_id] = job
            return len(ended) == len(jobs)

        wait_for(f"{len(jobs)} migrations to end", all_ended, timeout_s, interval_s=0.5)
        outcome = BusyOutcome(controllers=len(ids), lease_expiries=0, migrate_s=time.monotonic() - started)
        for job in ended.values():
            phase = migration_pb2.Phase.Name(job.phase)
            outcome.phases[phase] = outcome.phases.get(phase, 0) + 1
            if job.phase == migration_pb2.FAILED:
                outcome.failed_reasons.append(f"{job.controller_id}: {job.reason}")
        controllers = api.ListControllers(migration_pb2.ListControllersRequest(), timeout=30).controllers
        outcome.lost_controllers = sorted(c.id for c in controllers if c.state == "LOST")
    return outcome


def run(cluster: LocalCluster, *, controllers: int, namespace_bytes: int, write_iops: int,
        timeout_s: float = 600.0) -> BusyOutcome:
    """On a cluster with agents n1 and n2 (and an orchestrator that drives them all at once)."""
    ids = [f"busy{i:03d}" for i in range(controllers)]
    create_busy_controllers(cluster, "n1", ids, namespace_bytes, write_iops)
    outcome = migrate_all_away(cluster, ids, "n2", timeout_s)
    outcome.lease_expiries = count_lease_expiries(cluster.agents["n1"].log_path)
    return outcome


def start_cluster(cluster: LocalCluster, controllers: int, lease_ttl_s: int) -> None:
    cluster.lease_ttl_s = lease_ttl_s
    cluster.agent_call_budget_s = 15.0
    cluster.start_etcd()
    cluster.start_orchestrator(extra_args=["--max-concurrent", str(controllers)])
    cluster.start_agents(["n1", "n2"], capacity="8G")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--controllers", type=int, default=30)
    parser.add_argument("--namespace-mib", type=int, default=4)
    parser.add_argument("--write-iops", type=int, default=100, help="writes a second of each guest")
    parser.add_argument("--lease-ttl-s", type=int, default=2, help="the agents' (and leader's) lease TTL")
    parser.add_argument("--keep", action="store_true", help="keep the cluster's logs (their folder is printed)")
    args = parser.parse_args(argv)
    with LocalCluster(_owns_workdir=not args.keep) as cluster:
        start_cluster(cluster, args.controllers, args.lease_ttl_s)
        outcome = run(cluster, controllers=args.controllers, namespace_bytes=args.namespace_mib * MiB,
                      write_iops=args.write_iops)
        print(outcome.render())
        if args.keep:
            print(f"logs: {cluster.workdir}")
    return 0 if outcome.ok else 1


if __name__ == "__main__":
    sys.exit(main())
