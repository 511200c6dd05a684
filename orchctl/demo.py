"""`orchctl demo`: the whole product on one machine, in one command.

Starts etcd, an orchestrator and three agents, creates a controller with a prefilled namespace
and a running guest workload on n1, migrates it to whichever node the scheduler picks, and
prints the phase timeline, the guest-observed blackout and the verification of every
acknowledged write on the destination. `--json` prints the same as one JSON document.

`--workload fio` makes fio, over NBD, the guest whose data is checked: it writes a region with
crc32c-stamped blocks and checks it on the source, then writes a second region sequentially
while the controller migrates (it is cut off when the source releases the controller, as an NBD
client is), and on the destination `fio --verify_only` checks the first region and every write
of the second that fio had completed. The built-in guest keeps writing the namespace's first half
throughout, and `blackout_ms` is its measurement: fio's connection ends at the switchover, so
fio itself sees no completion across it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import grpc
from rich.console import Console
from rich.table import Table

from agent.main import parse_size
from orchctl import certs, fio
from orchctl.localcluster import ClusterError, LocalCluster, wait_for
from proto.v1 import agent_pb2, migration_pb2

TERMINAL = {migration_pb2.COMPLETED, migration_pb2.ROLLED_BACK, migration_pb2.FAILED, migration_pb2.CANCELLED}


def ensure_etcd(console: Console) -> None:
    if shutil.which("etcd"):
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise ClusterError("etcd is not installed; install the Debian package etcd-server "
                           "(apt-get install etcd-server) and run the demo again")
    console.print("etcd not found: installing the Debian package etcd-server ...")
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "etcd-server"]):
        done = subprocess.run(cmd, capture_output=True, text=True, check=False,
                              env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
        if done.returncode != 0:
            raise ClusterError(f"`{' '.join(cmd)}` failed: {done.stderr.strip()[-400:]}")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="orchctl demo", description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument("--namespace", type=parse_size, default=parse_size("256M"), help="namespace size")
    parser.add_argument("--write-iops", type=int, default=2000, help="guest writes per second (0: flat out)")
    parser.add_argument("--block-bytes", type=int, default=4096, help="guest write size")
    parser.add_argument("--pattern", default="random", choices=["random", "sequential", "hot"])
    parser.add_argument("--bandwidth", type=parse_size, default=0, help="migration bandwidth limit, bytes/s")
    parser.add_argument("--max-downtime-ms", type=int, default=50)
    parser.add_argument("--agents", type=int, default=3)
    parser.add_argument("--workload", choices=["builtin", "fio"], default="builtin",
                        help="whose writes are verified: the built-in guest, or fio over NBD")
    parser.add_argument("--tls", action=argparse.BooleanOptionalAction, default=None,
                        help="mutual TLS on every gRPC port and the data plane, from a CA made for the demo "
                             "(default: on; off with --workload fio, whose NBD client here speaks no TLS)")
    args = parser.parse_args(argv)
    if args.tls is None:
        args.tls = args.workload == "builtin"
    if args.tls and args.workload == "fio":
        parser.error("--tls with --workload fio: fio's NBD client here speaks no TLS; drop --tls")
    if args.namespace <= 0 or args.namespace % 4096:
        parser.error(f"--namespace {args.namespace} must be a positive multiple of 4096 bytes")
    if args.agents < 2:
        parser.error(f"--agents {args.agents}: a migration needs at least 2 agents")
    if args.max_downtime_ms <= 0:
        parser.error(f"--max-downtime-ms must be > 0, got {args.max_downtime_ms}")
    return args


def run_demo(argv: list[str]) -> int:
    args = parse_args(argv)
    console = Console(stderr=args.json)
    try:
        ensure_etcd(console)
        with LocalCluster() as cluster:
            if args.tls:
                certs.init_cluster(cluster.workdir / "pki", [f"n{i + 1}" for i in range(args.agents)], [],
                                   ["admin"], ["viewer"])
                cluster.tls_dir = cluster.workdir / "pki"
            result = _run(cluster, args, console)
            result["tls"] = args.tls
    except ClusterError as exc:
        console.print(f"[red]demo failed:[/red] {exc}")
        return 1
    except grpc.RpcError as exc:
        console.print(f"[red]demo failed:[/red] {exc.details()} ({exc.code().name})")  # type: ignore[attr-defined]
        return 1
    except fio.FioError as exc:
        console.print(f"[red]demo failed:[/red] {exc}")
        return 1
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        _print_result(console, result)
    return 0 if result["phase"] == "COMPLETED" and result["verified"] else 1


def _run(cluster: LocalCluster, args: argparse.Namespace, console: Console) -> dict[str, Any]:
    say = console.print
    say(f"starting etcd, an orchestrator and {args.agents} agents in {cluster.workdir}"
        + (" (mutual TLS on every gRPC port and the data plane)" if cluster.tls_dir else ""))
    cluster.start_etcd()
    cluster.start_orchestrator()
    names = [f"n{i + 1}" for i in range(args.agents)]
    cluster.start_agents(names, capacity=str(4 * args.namespace))
    fio_guest = FioGuest(cluster, args.namespace, say) if args.workload == "fio" else None
    spec = agent_pb2.WorkloadSpec(write_iops=args.write_iops, block_bytes=args.block_bytes, pattern=args.pattern)
    if fio_guest is None:
        say(f"creating controller c1 on n1: {args.namespace >> 20} MiB namespace, prefilled; guest writing "
            f"{args.write_iops or 'unlimited'} x {args.block_bytes} B/s ({args.pattern})")
    else:
        # Its own half for each writer: the built-in verifier checks every block the built-in
        # guest acknowledged (a prefill would be all of them), fio checks its own blocks.
        spec.pattern, spec.hot_fraction = "hot", 0.5
        say(f"creating controller c1 on n1: {args.namespace >> 20} MiB namespace, not prefilled; built-in guest "
            f"writing {args.write_iops or 'unlimited'} x {args.block_bytes} B/s into the first half, fio over NBD "
            "the second")
    channel, n1 = cluster.agent_stub("n1")
    with channel:
        n1.CreateController(agent_pb2.CreateControllerRequest(
            controller_id="c1", namespace_bytes=args.namespace, prefill=fio_guest is None, workload=spec),
            timeout=300)
        wait_for("the guest to complete writes", lambda: n1.GetController(
            agent_pb2.GetControllerRequest(controller_id="c1"), timeout=5).workload.acked_writes > 100, 30)
    if fio_guest is not None:
        fio_guest.before_migration()
    channel, api = cluster.migration_stub()
    with channel:
        policy = migration_pb2.ConvergencePolicy(max_downtime_ms=args.max_downtime_ms)
        if args.bandwidth:
            policy.bandwidth_bytes_per_s = args.bandwidth
        job = api.CreateMigration(migration_pb2.CreateMigrationRequest(controller_id="c1", policy=policy),
                                  timeout=10)
        say(f"migration {job.id} accepted; watching")
        last_phase = None
        for event in api.WatchMigration(migration_pb2.WatchMigrationRequest(id=job.id), timeout=600):
            job = event.migration
            if job.phase != last_phase:
                say(f"  {time.strftime('%H:%M:%S')} {migration_pb2.Phase.Name(job.phase):16} "
                    f"{job.bytes_transferred / 2**20:8.1f} MiB  rounds {job.rounds}")
                last_phase = job.phase
        job = api.GetMigration(migration_pb2.GetMigrationRequest(id=job.id), timeout=10)
        if job.phase == migration_pb2.COMPLETED:
            # Verification comes after COMPLETED (the guest already runs on the destination).
            job = wait_for("the migration's verification", lambda: (
                j if (j := api.GetMigration(migration_pb2.GetMigrationRequest(id=job.id), timeout=10)).verification
                != migration_pb2.VERIFICATION_PENDING else None), 600, interval_s=0.1)
        owner = {c.id: c.node for c in api.ListControllers(migration_pb2.ListControllersRequest(), timeout=10)
                 .controllers}["c1"]
    channel, where = cluster.agent_stub(owner)
    with channel:
        if owner != "n1":
            # let the guest run a little on the destination, then check everything it was told
            wait_for("the guest to continue on the destination", lambda: where.GetController(
                agent_pb2.GetControllerRequest(controller_id="c1"), timeout=5).workload.blackout_ms > 0, 30)
        verify = where.Verify(agent_pb2.VerifyRequest(controller_id="c1"), timeout=300)
    result = _summary(job, verify, owner)
    if fio_guest is not None:
        result["fio"] = fio_guest.after_migration(moved=owner != "n1")
        result["builtin_verified"] = result["verified"]
        result["verified"] = result["verified"] and result["fio"]["verified"]
        result["blackout_source"] = ("the built-in guest, which kept writing beside fio (fio's NBD connection "
                                     "ends at the switchover, so fio sees no completion across it)")
    return result


class FioGuest:
    """fio over NBD as the guest: a region written and checked before the migration, a sequential
    writer running through it, and both checked with `fio --verify_only` where c1 runs after."""

    RATE_IOPS = 500  # the writer across the migration: slow enough not to wrap its region for a while

    def __init__(self, cluster: LocalCluster, namespace_bytes: int, say: Callable[[str], None]) -> None:
        self.cluster = cluster
        self.say = say
        quarter = namespace_bytes // 4 // 4096 * 4096
        self.before = (2 * quarter, min(quarter, 64 << 20))  # (offset, size): written before the migration
        self.across = (3 * quarter, quarter)  # written sequentially while it migrates
        self.source_uri = ""
        self.writer: subprocess.Popen[str] | None = None
        self.written_before: fio.FioResult | None = None

    def _export(self) -> str:
        channel, api = self.cluster.migration_stub()
        with channel:
            return str(api.ExportController(migration_pb2.ExportControllerRequest(controller_id="c1"),
                                            timeout=15).uri)

    def _job(self, uri: str, region: tuple[int, int], **options: Any) -> fio.FioJob:
        return fio.FioJob(uri=uri, offset_bytes=region[0], size_bytes=region[1], **options)

    def _before_job(self, uri: str, **options: Any) -> fio.FioJob:
        return self._job(uri, self.before, rw="randwrite", iodepth=8, **options)

    def _across_job(self, uri: str, **options: Any) -> fio.FioJob:
        return self._job(uri, self.across, rw="write", iodepth=1, **options)

    def before_migration(self) -> None:
        self.source_uri = self._export()
        self.say(f"fio: writing {self.before[1] >> 20} MiB of random 4 KiB blocks with crc32c through "
                 f"{self.source_uri} and checking them")
        self.written_before = fio.run(self._before_job(self.source_uri), timeout_s=600)
        if not self.written_before.ok:
            raise fio.FioError(f"fio on the source failed: {self.written_before.messages[-400:]}")
        self.say(f"fio: {self.written_before.write.ios} writes checked on n1; starting a sequential writer "
                 f"({self.RATE_IOPS} IOPS) that runs through the migration")
        self.writer = fio.start(self._across_job(self.source_uri, do_verify=False, rate_iops=self.RATE_IOPS))
        # Migrate only once it writes: until then it would have nothing to carry across.
        probe = self.across[0] + 64 * 4096
        wait_for("fio to write through NBD", lambda: self._written(probe), 60, interval_s=0.1,
                 alive=lambda: None if self.writer is None or self.writer.poll() is None else "fio ended early")

    def _written(self, offset: int) -> bool:
        """Whether the block at `offset` holds anything but zeroes (qemu-io, a second client)."""
        done = subprocess.run(["qemu-io", "-f", "raw", self.source_uri, "-c", f"read -P 0 {offset} 4k"],
                              capture_output=True, text=True, timeout=30, check=False)
        return "Pattern verification failed" in done.stdout

    def after_migration(self, moved: bool) -> dict[str, Any]:
        assert self.writer is not None, "before_migration() starts the writer"
        if not moved:
            self.writer.terminate()  # rolled back: the source still serves it, end it here
        across = fio.finish(self.writer, timeout_s=600)
        completed = across.write.ok_bytes // 4096  # in order (iodepth 1): exactly the first ones
        uri = self._export()
        self.say(f"fio: the writer completed {completed} writes before "
                 f"{'its connection ended at the switchover' if moved else 'it was stopped'} "
                 f"({across.messages.splitlines()[-1] if across.messages else 'no message'}); checking on {uri}")
        first = fio.run(self._before_job(uri, verify_only=True), timeout_s=600)
        second = fio.run(self._across_job(uri, verify_only=True, number_ios=completed), timeout_s=600) \
            if completed else None
        ok = first.ok and (second is None or second.ok) and completed > 0
        return {
            "verified": ok, "source_uri": self.source_uri, "destination_uri": uri,
            "written_before_migration": {"writes": self.written_before.write.ios if self.written_before else 0,
                                         "verified": first.ok, "messages": first.messages[-400:]},
            "written_across_migration": {"writes_completed": completed, "ended_by": across.messages[-200:],
                                         "verified": second is not None and second.ok,
                                         "messages": second.messages[-400:] if second else ""},
        }


def _summary(job: migration_pb2.Migration, verify: agent_pb2.VerifyResponse, owner: str) -> dict[str, Any]:
    phases = [{"phase": migration_pb2.Phase.Name(p.phase), "duration_ms": round(p.duration_ms, 3),
               "bytes": p.bytes, "rounds": p.rounds, "note": p.note} for p in job.phases]
    precopy = next((p for p in job.phases if p.phase == migration_pb2.PRECOPY), None)
    throughput = precopy.bytes / (precopy.duration_ms / 1000.0) if precopy and precopy.duration_ms else 0.0
    workload = verify.controller.workload
    return {
        "job_id": job.id, "phase": migration_pb2.Phase.Name(job.phase), "reason": job.reason,
        "source": job.source_node, "destination": job.destination_node, "controller_now_on": owner,
        "verified": verify.ok, "blocks_checked": verify.blocks_checked, "mismatches": verify.mismatches,
        "first_mismatch": verify.first_mismatch,
        "blackout_ms": round(workload.blackout_ms, 3), "switchover_ms": round(job.downtime_ms, 3),
        "predicted_switchover_ms": round(job.predicted_downtime_ms, 3),
        "downtime_budget_ms": job.policy.max_downtime_ms,
        "over_budget": job.downtime_budget_exceeded or workload.blackout_ms > job.policy.max_downtime_ms,
        "acked_writes": workload.acked_writes,
        "bytes_transferred": job.bytes_transferred, "rounds": job.rounds,
        "precopy_throughput_bytes_per_s": round(throughput),
        "digests_equal": bool(job.source_digest) and job.source_digest == job.destination_digest,
        "verification": migration_pb2.Verification.Name(job.verification).removeprefix("VERIFICATION_"),
        "verification_note": job.verification_note,
        "phases": phases,
    }


def _print_result(console: Console, result: dict[str, Any]) -> None:
    table = Table(title=f"migration {result['job_id']}: {result['source']} -> {result['destination']}")
    for column in ("phase", "duration", "bytes", "rounds", "note"):
        table.add_column(column, justify="right" if column in ("duration", "bytes", "rounds") else "left")
    for p in result["phases"]:
        table.add_row(p["phase"], f"{p['duration_ms']:.1f} ms", f"{p['bytes'] / 2**20:.1f} MiB",
                      str(p["rounds"]), p["note"][:60])
    console.print(table)
    builtin_ok = result.get("builtin_verified", result["verified"])
    ok = "[green]verified[/green]" if builtin_ok else f"[red]FAILED[/red] {result['first_mismatch']}"
    console.print(f"outcome: {result['phase']} {result['reason']}")
    console.print("transport: " + ("mutual TLS on every gRPC port and the data plane" if result.get("tls")
                                   else "plaintext (--tls turns on mutual TLS)"))
    console.print(f"precopy throughput: {result['precopy_throughput_bytes_per_s'] / 1e6:.1f} MB/s; "
                  f"guest-observed blackout: {result['blackout_ms']:.1f} ms "
                  f"(orchestrator switchover {result['switchover_ms']:.1f} ms)")
    predicted = (f"predicted {result['predicted_switchover_ms']:.1f} ms"
                 if result["predicted_switchover_ms"] > 0 else "not predicted")
    verdict = "[red]over[/red]" if result["over_budget"] else "[green]within[/green]"
    console.print(f"downtime budget {result['downtime_budget_ms']} ms: {predicted}; measured {verdict} it")
    console.print(f"{result['blocks_checked']} acknowledged blocks on {result['controller_now_on']}: {ok}; "
                  f"namespace verification: {result['verification']}"
                  f"{' (' + result['verification_note'] + ')' if result['verification_note'] else ''}")
    if "fio" in result:
        f = result["fio"]
        before, across = f["written_before_migration"], f["written_across_migration"]
        console.print(f"fio over NBD on {result['controller_now_on']} ({f['destination_uri']}): "
                      f"{before['writes']} writes from before the migration "
                      f"{'[green]verified[/green]' if before['verified'] else '[red]FAILED[/red]'}, "
                      f"{across['writes_completed']} writes completed during it "
                      f"{'[green]verified[/green]' if across['verified'] else '[red]FAILED[/red]'}")
        console.print(f"the blackout above is measured by {result['blackout_source']}")


if __name__ == "__main__":
    sys.exit(run_demo(sys.argv[1:]))
