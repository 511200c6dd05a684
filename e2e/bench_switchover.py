"""The switchover, measured: guest blackout and orchestrator switchover over many migrations, where
the blackout goes step by step, an idle migration's total time against its ideal, and a guest
that dirties faster than the bandwidth limit brought to converge by throttling.

    python -m e2e.bench_switchover [--quick] [--runs 30] [--namespace 1G] [--write-iops 5000] [--out DIR]

One LocalCluster (etcd, an orchestrator, agents n1 and n2 as real processes) serves every run;
each section creates its own controller on n1, migrates it between n1 and n2, and deletes it.
Sections:
- loaded: `--runs` migrations of a `--namespace` namespace, prefilled, with the guest writing
  `--block-bytes` random blocks at `--write-iops`, back and forth;
- state: `--runs` migrations of a tiny namespace with a slow guest, so the switchover carries
  little more than the controller and guest state;
- idle: a `--namespace` namespace, prefilled, no guest writes: the job's total time against the
  ideal (size / the precopy throughput that same migration measured);
- convergence: a guest writing faster than `--convergence-bandwidth` on a small namespace,
  policy THROTTLE: its time, rounds and the throttle it reached.
The breakdown comes from the switchover marks (`cluster.switchover_marks`) that the agents,
the orchestrator and the guest log, put on one time line per job.

A benchmark, not a test: the figures depend on the machine. Every process it starts is stopped by
pid (LocalCluster.cleanup) however it ends.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from pathlib import Path
from typing import Any

import grpc

from agent.main import parse_size
from cluster import switchover_marks
from orchctl import certs
from orchctl.localcluster import ClusterError, LocalCluster, wait_for
from proto.v1 import agent_pb2, migration_pb2

TERMINAL = {migration_pb2.COMPLETED, migration_pb2.ROLLED_BACK, migration_pb2.FAILED, migration_pb2.CANCELLED}
NODES = ("n1", "n2")
STATE_NAMESPACE = 4 << 20
STATE_WRITE_IOPS = 200

# The switchover's steps in the order they happen; each row of the breakdown is the time from the
# step before it (the guest's last write on the source opens the time line).
TIMELINE = (
    ("guest.last_write_source", "guest: last write completed on the source"),
    ("orch.stop_and_copy_sent", "orchestrator sends StopAndCopy"),
    ("src.stop_and_copy_started", "source: StopAndCopy starts"),
    ("src.pre_pause_sent", "source: changed blocks sent before the pause (guest running)"),
    ("src.guest_paused", "source: guest paused (parked)"),
    ("src.suspended", "source: controller suspended, dirty map taken"),
    ("src.final_delta_sent", "source: final delta sent"),
    ("src.state_saved", "source: controller + guest state saved"),
    ("dst.final_received", "destination: state frame in"),
    ("dst.state_loaded", "destination: state loaded (STOP)"),
    ("dst.state_file_written", "destination: state file written"),
    ("dst.loaded", "destination: LOADED (with a plan, the snapshot is taken alongside the commit)"),
    ("dst.etcd_checked", "destination: etcd answered (asked while loading)"),
    ("dst.adopted", "destination: hosting record written"),
    ("dst.committed", "destination: commit + RUNNING claim landed in etcd (one txn)"),
    ("dst.running", "destination: controller + guest running"),
    ("guest.first_write_destination", "guest: first write completed on the destination"),
    # Off the guest's path from here: the answers travel back while the guest runs.
    ("src.destination_loaded", "source: switchover acknowledged (after the guest resumed)"),
    ("src.closed", "source: data connection closed"),
    ("orch.stop_and_copy_returned", "orchestrator: StopAndCopy returned"),
    ("orch.resume_sent", "orchestrator sends ResumeDestination (confirms)"),
    ("orch.resume_returned", "orchestrator: ResumeDestination returned"),
)


def percentile(values: list[float], pct: float) -> float:
    """Linear interpolation between closest ranks (pct 0..100)."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * pct / 100.0
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def summary(values: list[float]) -> dict[str, float]:
    return {"n": len(values), "p50": percentile(values, 50), "p99": percentile(values, 99),
            "min": min(values, default=float("nan")), "max": max(values, default=float("nan"))}


class Bench:
    def __init__(self, cluster: LocalCluster, args: argparse.Namespace) -> None:
        self.cluster = cluster
        self.args = args

    def agent(self, node: str) -> Any:
        return self.cluster.agent_stub(node)

    def create(self, controller_id: str, namespace: int, write_iops: int | None, prefill: bool = True) -> None:
        channel, stub = self.agent("n1")
        with channel:
            request = agent_pb2.CreateControllerRequest(controller_id=controller_id, namespace_bytes=namespace,
                                                        prefill=prefill)
            if write_iops is not None:
                request.workload.CopyFrom(agent_pb2.WorkloadSpec(write_iops=write_iops,
                                                                 block_bytes=self.args.block_bytes,
                                                                 pattern="random"))
            stub.CreateController(request, timeout=600)
            if write_iops is not None:
                wait_for(f"{controller_id}'s guest to complete writes", lambda: stub.GetController(
                    agent_pb2.GetControllerRequest(controller_id=controller_id), timeout=5).workload.acked_writes > 100,
                    60)

    def delete(self, controller_id: str, node: str) -> None:
        channel, stub = self.agent(node)
        with channel:
            stub.DeleteController(agent_pb2.GetControllerRequest(controller_id=controller_id), timeout=60)

    def migrate(self, controller_id: str, destination: str, policy: migration_pb2.ConvergencePolicy,
                guest: bool) -> dict[str, Any]:
        channel, api = self.cluster.migration_stub()
        with channel:
            started = time.monotonic()
            job = api.CreateMigration(migration_pb2.CreateMigrationRequest(
                controller_id=controller_id, destination_node=destination, policy=policy), timeout=10)
            job = wait_for(f"migration {job.id} to end", lambda: (
                j if (j := api.GetMigration(migration_pb2.GetMigrationRequest(id=job.id), timeout=10)).phase
                in TERMINAL else None), 900, interval_s=0.05)
            ended = time.monotonic()
            if job.phase != migration_pb2.COMPLETED:
                raise ClusterError(f"migration {job.id} of {controller_id} ended {migration_pb2.Phase.Name(job.phase)}"
                                   f": {job.reason}")
            # The source is released after verification: the next migration back needs it done.
            job = wait_for(f"verification of {job.id}", lambda: (
                j if (j := api.GetMigration(migration_pb2.GetMigrationRequest(id=job.id), timeout=10)).verification
                != migration_pb2.VERIFICATION_PENDING else None), 600, interval_s=0.05)
        # ... and the next migration back needs the source to have let the controller go.
        channel, source = self.agent(job.source_node)

        def released() -> bool:
            try:
                info = source.GetInfo(agent_pb2.GetInfoRequest(), timeout=5)
            except grpc.RpcError:
                return False  # GetInfo fails while a controller is half released (an agent bug, see report)
            return controller_id not in {c.controller_id for c in info.controllers}
        with channel:
            wait_for(f"{job.source_node} to release {controller_id}", released, 120)
        blackout_ms = 0.0
        if guest:
            channel, stub = self.agent(destination)
            with channel:
                status = wait_for("the guest to write on the destination", lambda: (
                    s if (s := stub.GetController(agent_pb2.GetControllerRequest(controller_id=controller_id),
                                                  timeout=5)).workload.blackout_ms > 0 else None), 30)
                blackout_ms = status.workload.blackout_ms
        phases = {migration_pb2.Phase.Name(p.phase): p for p in job.phases}
        precopy = phases.get("PRECOPY")
        throughput = precopy.bytes / (precopy.duration_ms / 1000.0) if precopy and precopy.duration_ms else 0.0
        return {
            "job_id": job.id, "source": job.source_node, "destination": job.destination_node,
            "blackout_ms": blackout_ms, "switchover_ms": job.downtime_ms, "rounds": job.rounds,
            "throttle_percent": job.throttle_percent, "bytes_transferred": job.bytes_transferred,
            "verification": migration_pb2.Verification.Name(job.verification),
            "client_total_s": ended - started,
            "job_total_s": sum(p.duration_ms for p in job.phases) / 1000.0,
            "precopy_throughput_bytes_per_s": throughput,
            "phases": [{"phase": migration_pb2.Phase.Name(p.phase), "duration_ms": p.duration_ms, "bytes": p.bytes,
                        "rounds": p.rounds, "note": p.note} for p in job.phases],
        }

    def back_and_forth(self, label: str, controller_id: str, namespace: int, write_iops: int, runs: int
                       ) -> list[dict[str, Any]]:
        self.create(controller_id, namespace, write_iops)
        policy = migration_pb2.ConvergencePolicy(max_downtime_ms=self.args.max_downtime_ms)
        results = []
        here = "n1"
        for i in range(runs):
            there = NODES[1] if here == NODES[0] else NODES[0]
            result = self.migrate(controller_id, there, policy, guest=True)
            results.append(result)
            here = there
            print(f"{label:7} {i + 1:3}/{runs} {result['source']}->{result['destination']}: blackout "
                  f"{result['blackout_ms']:7.1f} ms  switchover {result['switchover_ms']:7.1f} ms  rounds "
                  f"{result['rounds']}", flush=True)
        self.delete(controller_id, here)
        return results

    def idle(self) -> dict[str, Any]:
        self.create("c-idle", self.args.namespace, None)
        result = self.migrate("c-idle", "n2", migration_pb2.ConvergencePolicy(
            max_downtime_ms=self.args.max_downtime_ms), guest=False)
        self.delete("c-idle", "n2")
        ideal_s = self.args.namespace / result["precopy_throughput_bytes_per_s"]
        result["ideal_s"] = ideal_s
        result["ratio"] = result["job_total_s"] / ideal_s
        print(f"idle    {self.args.namespace >> 20} MiB: job {result['job_total_s']:.2f} s, ideal {ideal_s:.2f} s "
              f"(precopy {result['precopy_throughput_bytes_per_s'] / 1e6:.0f} MB/s): {result['ratio']:.2f}x",
              flush=True)
        return result

    def convergence(self) -> dict[str, Any]:
        args = self.args
        write_iops = args.convergence_write_bytes_per_s // args.block_bytes
        self.create("c-conv", args.convergence_namespace, write_iops)
        policy = migration_pb2.ConvergencePolicy(max_downtime_ms=args.max_downtime_ms,
                                                 bandwidth_bytes_per_s=args.convergence_bandwidth,
                                                 on_no_convergence=migration_pb2.THROTTLE)
        result = self.migrate("c-conv", "n2", policy, guest=True)
        self.delete("c-conv", "n2")
        print(f"converge: COMPLETED in {result['client_total_s']:.1f} s, {result['rounds']} rounds, throttle "
              f"{result['throttle_percent']} %, blackout {result['blackout_ms']:.1f} ms", flush=True)
        return result


def breakdown(marks: dict[str, dict[str, float]], job_ids: list[str]) -> list[dict[str, Any]]:
    """Per step of TIMELINE: the time from the step before it (ms), over the jobs that logged both."""
    rows = []
    for i, (step, what) in enumerate(TIMELINE):
        deltas, since_pause = [], []
        for job in job_ids:
            m = marks.get(job, {})
            if step not in m:
                continue
            previous = next((m[s] for s, _ in reversed(TIMELINE[:i]) if s in m), None)
            if previous is not None:
                deltas.append((m[step] - previous) * 1000.0)
            if "guest.last_write_source" in m:
                since_pause.append((m[step] - m["guest.last_write_source"]) * 1000.0)
        rows.append({"step": step, "what": what, "from_previous_ms": summary(deltas),
                     "since_last_source_write_ms": summary(since_pause)})
    return rows


def read_marks(cluster: LocalCluster) -> dict[str, dict[str, float]]:
    lines: list[str] = []
    for log_path in cluster.workdir.glob("*.log"):
        lines += log_path.read_text(errors="replace").splitlines()
    return switchover_marks.parse(lines)


def print_tables(report: dict[str, Any]) -> None:
    print(f"\n{'':24} {'n':>4} {'p50 ms':>9} {'p99 ms':>9} {'min':>8} {'max':>8}")
    for section in ("loaded", "state"):
        if section not in report:
            continue
        for figure in ("blackout_ms", "switchover_ms"):
            s = report[section]["summary"][figure]
            print(f"{section + ' ' + figure:24} {s['n']:4d} {s['p50']:9.1f} {s['p99']:9.1f} {s['min']:8.1f} "
                  f"{s['max']:8.1f}")
    for section in ("loaded", "state"):
        if section not in report:
            continue
        print(f"\nbreakdown ({section}): time from the step before, ms")
        print(f"{'step':52} {'p50':>7} {'p99':>7} {'at p50':>7}")
        for row in report[section]["breakdown"]:
            d, t = row["from_previous_ms"], row["since_last_source_write_ms"]
            if not d["n"] and not t["n"]:
                continue
            print(f"{row['what']:52} {d['p50']:7.2f} {d['p99']:7.2f} {t['p50']:7.1f}")
    if "idle" in report:
        r = report["idle"]
        print(f"\nidle {report['config']['namespace'] >> 20} MiB: job total {r['job_total_s']:.2f} s, ideal "
              f"{r['ideal_s']:.2f} s at {r['precopy_throughput_bytes_per_s'] / 1e6:.0f} MB/s -> ratio "
              f"{r['ratio']:.2f}x (target <= 1.25x); phases: "
              + ", ".join(f"{p['phase']} {p['duration_ms']:.0f} ms" for p in r["phases"]))
    if "convergence" in report:
        r = report["convergence"]
        print(f"convergence: {r['client_total_s']:.1f} s, {r['rounds']} rounds, throttle reached "
              f"{r['throttle_percent']} %, blackout {r['blackout_ms']:.1f} ms, switchover {r['switchover_ms']:.1f} ms")


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sections = [s for s in ("loaded", "state") if s in report]
    fig, axes = plt.subplots(1, 1 + len(sections), figsize=(6 + 6 * len(sections), 5))
    ax = axes[0]
    for section in sections:
        runs = report[section]["runs"]
        ax.plot([r["blackout_ms"] for r in runs], "o-", label=f"{section} guest blackout")
        ax.plot([r["switchover_ms"] for r in runs], "x--", label=f"{section} switchover")
    ax.axhline(10, color="green", lw=0.8, ls=":", label="p50 target 10 ms")
    ax.axhline(30, color="red", lw=0.8, ls=":", label="p99 target 30 ms")
    ax.set_xlabel("migration #")
    ax.set_ylabel("ms")
    ax.set_title("switchover per migration")
    ax.legend(fontsize=7)
    for ax, section in zip(axes[1:], sections, strict=True):
        rows = [r for r in report[section]["breakdown"] if r["from_previous_ms"]["n"]]
        ax.barh([r["step"] for r in rows], [r["from_previous_ms"]["p50"] for r in rows])
        ax.invert_yaxis()
        ax.set_xlabel("ms from the step before (p50)")
        ax.set_title(f"where the blackout goes ({section})")
        ax.tick_params(axis="y", labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m e2e.bench_switchover", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="for development: 64 MiB namespaces, 6 runs, a smaller convergence case")
    parser.add_argument("--runs", type=int, default=None, help="migrations per section (default 30, quick 6)")
    parser.add_argument("--namespace", type=parse_size, default=None, help="namespace size (default 1G, quick 64M)")
    parser.add_argument("--write-iops", type=int, default=5000, help="the loaded guest's writes per second")
    parser.add_argument("--block-bytes", type=int, default=4096)
    parser.add_argument("--max-downtime-ms", type=int, default=50, help="the jobs' policy (the demo's default)")
    parser.add_argument("--convergence-namespace", type=parse_size, default=None,
                        help="default 256M (quick 64M)")
    parser.add_argument("--convergence-bandwidth", type=parse_size, default=parse_size("8M"))
    parser.add_argument("--convergence-write-bytes-per-s", type=parse_size, default=parse_size("16M"))
    parser.add_argument("--sections", default="loaded,state,idle,convergence",
                        help="comma-separated subset of loaded,state,idle,convergence")
    parser.add_argument("--tls", action=argparse.BooleanOptionalAction, default=True,
                        help="mutual TLS on gRPC and the data plane, as `orchctl demo` (default on)")
    parser.add_argument("--out", type=Path, default=Path("/tmp/nvmigrate-bench/switchover"))
    args = parser.parse_args(argv)
    args.runs = args.runs if args.runs is not None else (6 if args.quick else 30)
    args.namespace = args.namespace or parse_size("64M" if args.quick else "1G")
    args.convergence_namespace = args.convergence_namespace or parse_size("64M" if args.quick else "256M")
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = [s for s in sections if s not in ("loaded", "state", "idle", "convergence")]
    if unknown:
        parser.error(f"--sections {args.sections!r}: unknown {', '.join(unknown)}")
    args.sections = sections
    if args.runs < 1:
        parser.error(f"--runs must be at least 1, got {args.runs}")
    for name in ("namespace", "convergence_namespace"):
        value = getattr(args, name)
        if value <= 0 or value % 4096:
            parser.error(f"--{name.replace('_', '-')} {value} must be a positive multiple of 4096 bytes")
    if args.write_iops < 1:
        parser.error(f"--write-iops must be at least 1, got {args.write_iops}")
    return args


def _stop_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(f"stopped by signal {signum}")  # unwinds through the cleanup below


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    args.out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                              "command": " ".join(["python -m e2e.bench_switchover", *(argv or sys.argv[1:])])}
    cluster = LocalCluster()
    try:
        if args.tls:
            certs.init_cluster(cluster.workdir / "pki", list(NODES), [], ["admin"], ["viewer"])
            cluster.tls_dir = cluster.workdir / "pki"
        cluster.start_etcd()
        cluster.start_with_agents(list(NODES), capacity=str(4 * max(args.namespace, args.convergence_namespace)))
        bench = Bench(cluster, args)
        if "loaded" in args.sections:
            report["loaded"] = {"runs": bench.back_and_forth("loaded", "c-load", args.namespace, args.write_iops,
                                                             args.runs)}
        if "state" in args.sections:
            report["state"] = {"runs": bench.back_and_forth("state", "c-state", STATE_NAMESPACE, STATE_WRITE_IOPS,
                                                            args.runs)}
        if "idle" in args.sections:
            report["idle"] = bench.idle()
        if "convergence" in args.sections:
            report["convergence"] = bench.convergence()
        marks = read_marks(cluster)
    except (ClusterError, grpc.RpcError) as exc:
        detail = exc.details() if isinstance(exc, grpc.RpcError) else str(exc)  # type: ignore[attr-defined]
        cluster.stop()  # every process, by pid; the logs stay for a look
        print(f"bench failed: {detail}; the processes' logs are in {cluster.workdir}", file=sys.stderr)
        return 1
    except BaseException:
        cluster.cleanup()
        raise
    cluster.cleanup()
    for section in ("loaded", "state"):
        if section in report:
            runs = report[section]["runs"]
            report[section]["summary"] = {f: summary([r[f] for r in runs]) for f in ("blackout_ms", "switchover_ms")}
            report[section]["breakdown"] = breakdown(marks, [r["job_id"] for r in runs])
    print_tables(report)
    (args.out / "bench_switchover.json").write_text(json.dumps(report, indent=2))
    plot(report, args.out / "bench_switchover.png")
    print(f"\nwrote {args.out / 'bench_switchover.json'} and {args.out / 'bench_switchover.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
