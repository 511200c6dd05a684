"""Benchmark: does a migration leave a neighbour's I/O alone?

One source agent (n1) runs two controllers: the neighbour, read by fio over NBD (4 KiB random
reads), and the mover, whose namespace (1 GiB by default, filled) migrates to a second agent
(n2) with no bandwidth limit. The neighbour's latency is measured twice, with the same fio job:

  idle       no migration anywhere;
  migrating  while the mover's migration copies (from its PRECOPY to its STOP_AND_COPY phase).

fio logs every I/O's completion latency (`--write_lat_log`); each phase's p50 / p99 and IOPS
come from the I/Os that completed inside that phase's window, so the migrating figures cover the
copy and nothing else. The figure of merit is p99(migrating) / p99(idle): the target is <= 1.5.

With `--no-yield` the source agent runs with migration reads not yielding to guest I/O
(`--migration-yield off`), for the comparison.

Both agents, etcd and the orchestrator are processes of one LocalCluster on this machine, so the
destination's receive work competes for the same CPUs: a harder case than two hosts.

Usage: python -m e2e.bench_isolation [--out DIR] [--mover-mib 1024] [--idle-s 8] [--iodepth 1]
Writes DIR/bench_isolation.json and DIR/bench_isolation.png; stops every process it started.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from orchctl import fio
from orchctl.localcluster import ClusterError, LocalCluster, wait_for
from proto.v1 import migration_pb2

MiB = 1 << 20
TARGET_RATIO = 1.5
TERMINAL = {migration_pb2.COMPLETED, migration_pb2.ROLLED_BACK, migration_pb2.FAILED, migration_pb2.CANCELLED}
NEIGHBOUR_MIB = 256


@dataclass(frozen=True)
class Phase:
    name: str
    seconds: float  # the window the figures cover
    ios: int
    iops: float
    p50_us: float
    p99_us: float
    max_us: float


@dataclass(frozen=True)
class Migration:
    job_id: str
    phase: str
    copy_s: float  # PRECOPY start to STOP_AND_COPY start
    bytes: int
    mb_per_s: float


def percentile(sorted_values: list[float], q: float) -> float:
    """The nearest-rank percentile (fio's own definition) of an ascending list."""
    if not sorted_values:
        return 0.0
    rank = max(1, min(len(sorted_values), int(-(-q * len(sorted_values) // 100))))
    return sorted_values[rank - 1]


def read_lat_log(path: Path) -> list[tuple[float, float]]:
    """(completion time ms since fio's job start, completion latency us) of every I/O."""
    samples = []
    for line in path.read_text().splitlines():
        fields = [f.strip() for f in line.split(",")]
        if len(fields) >= 2 and fields[0].isdigit():
            samples.append((float(fields[0]), int(fields[1]) / 1000.0))
    return samples


def phase_of(name: str, samples: list[tuple[float, float]], start_ms: float, end_ms: float) -> Phase:
    inside = sorted(lat for t, lat in samples if start_ms <= t < end_ms)
    seconds = max((end_ms - start_ms) / 1000.0, 1e-9)
    return Phase(name, seconds, len(inside), len(inside) / seconds, percentile(inside, 50),
                 percentile(inside, 99), inside[-1] if inside else 0.0)


class Neighbour:
    """fio reading the neighbour at random, logging every I/O, until told to stop."""

    def __init__(self, uri: str, workdir: Path, name: str, iodepth: int) -> None:
        self.log_prefix = workdir / name
        job = fio.FioJob(uri=uri, size_bytes=NEIGHBOUR_MIB * MiB, rw="randread", iodepth=iodepth, verify="",
                         runtime_s=3600, name=name)
        argv = [*job.argv(), f"--write_lat_log={self.log_prefix}", "--log_avg_msec=0"]
        self.started = time.time()
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     stdin=subprocess.DEVNULL, start_new_session=True)

    def stop(self) -> tuple[fio.FioResult, list[tuple[float, float]], float]:
        """SIGINT: fio ends the job, writes its report and its logs. Returns them and the job's
        start on the wall clock (from the report)."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGINT)
        stdout, stderr = self.proc.communicate(timeout=60)
        result = fio.parse_report(self.proc.returncode, stdout, stderr)
        start = stdout.find("{")
        report = json.loads(stdout[start:])
        job_start_ms = float(report["jobs"][0].get("job_start", 0)) or self.started * 1000.0
        logs = sorted(self.log_prefix.parent.glob(f"{self.log_prefix.name}_clat.*.log"))
        if not logs:
            raise fio.FioError(f"fio wrote no completion-latency log beside {self.log_prefix}: "
                               f"{result.messages[-300:]}")
        samples = [s for log in logs for s in read_lat_log(log)]
        return result, samples, job_start_ms


def run(args: argparse.Namespace) -> dict[str, object]:
    with LocalCluster() as cluster:
        cluster.start_etcd()
        cluster.start_orchestrator()
        extra = ["--migration-yield", "off"] if args.no_yield else []
        cluster.start_agent("n1", capacity=f"{NEIGHBOUR_MIB + args.mover_mib + 64}M", extra_args=extra)
        cluster.start_agent("n2", capacity=f"{args.mover_mib + 64}M")
        channel, api = cluster.migration_stub()
        with channel:
            for cid, mib in (("neighbour", NEIGHBOUR_MIB), ("mover", args.mover_mib)):
                api.CreateController(migration_pb2.NewControllerRequest(
                    controller_id=cid, namespace_bytes=mib * MiB, node="n1"), timeout=60)
            uris = {cid: api.ExportController(migration_pb2.ExportControllerRequest(controller_id=cid),
                                              timeout=15).uri for cid in ("neighbour", "mover")}
        for cid, mib in (("neighbour", NEIGHBOUR_MIB), ("mover", args.mover_mib)):
            print(f"filling {cid} ({mib} MiB) through {uris[cid]} ...", file=sys.stderr)
            fill = fio.run(fio.FioJob(uri=uris[cid], size_bytes=mib * MiB, rw="write", block_bytes=MiB, iodepth=4,
                                      verify="", name=f"fill-{cid}"), timeout_s=600)
            if not fill.ok:
                raise fio.FioError(f"filling {cid} failed: {fill.messages[-400:]}")

        # Idle: the neighbour alone.
        print(f"neighbour idle for {args.idle_s:g} s ...", file=sys.stderr)
        reader = Neighbour(uris["neighbour"], cluster.workdir, "idle", args.iodepth)
        time.sleep(args.idle_s + args.ramp_s)  # a timed measurement: fio runs this long
        _, samples, _ = reader.stop()
        idle = phase_of("idle", samples, args.ramp_s * 1000.0, (args.idle_s + args.ramp_s) * 1000.0)

        # Migrating: the same reader, and the mover's migration started once it runs.
        print("neighbour while the mover migrates ...", file=sys.stderr)
        reader = Neighbour(uris["neighbour"], cluster.workdir, "migrating", args.iodepth)
        time.sleep(args.ramp_s)
        channel, api = cluster.migration_stub()
        with channel:
            job = api.CreateMigration(migration_pb2.CreateMigrationRequest(
                controller_id="mover", destination_node="n2"), timeout=10)
            job = wait_for(f"migration {job.id} to end", lambda: (
                j if (j := api.GetMigration(migration_pb2.GetMigrationRequest(id=job.id), timeout=10)).phase
                in TERMINAL else None), args.migration_timeout_s, interval_s=0.1)
        _, samples, job_start_ms = reader.stop()
        starts = {migration_pb2.Phase.Name(p.phase): p.started_at for p in job.phases}
        if "PRECOPY" not in starts or "STOP_AND_COPY" not in starts:
            raise ClusterError(f"migration {job.id} ended {migration_pb2.Phase.Name(job.phase)} without a copy: "
                               f"{job.reason}")
        window = ((starts["PRECOPY"] * 1000.0 - job_start_ms), (starts["STOP_AND_COPY"] * 1000.0 - job_start_ms))
        migrating = phase_of("migrating", samples, *window)
        copy_s = starts["STOP_AND_COPY"] - starts["PRECOPY"]
        moved = Migration(job.id, migration_pb2.Phase.Name(job.phase), copy_s, job.bytes_transferred,
                          job.bytes_transferred / copy_s / 1e6 if copy_s > 0 else 0.0)
        timeline = [(t / 1000.0 - window[0] / 1000.0, lat) for t, lat in samples]
    ratio = migrating.p99_us / idle.p99_us if idle.p99_us else float("inf")
    return {"idle": asdict(idle), "migrating": asdict(migrating), "migration": asdict(moved),
            "p99_ratio": ratio, "p50_ratio": migrating.p50_us / idle.p50_us if idle.p50_us else float("inf"),
            "target_ratio": TARGET_RATIO, "yield": not args.no_yield, "iodepth": args.iodepth,
            "mover_mib": args.mover_mib, "cpus": os.cpu_count(), "timeline": timeline}


def table(result: dict[str, object]) -> str:
    idle, migrating = result["idle"], result["migrating"]
    assert isinstance(idle, dict) and isinstance(migrating, dict)
    lines = [f"{'neighbour':10} {'seconds':>7} {'I/Os':>7} {'IOPS':>7} {'p50 us':>7} {'p99 us':>7} {'max us':>8}"]
    for p in (idle, migrating):
        lines.append(f"{p['name']:10} {p['seconds']:7.1f} {p['ios']:7d} {p['iops']:7.0f} {p['p50_us']:7.0f} "
                     f"{p['p99_us']:7.0f} {p['max_us']:8.0f}")
    moved = result["migration"]
    assert isinstance(moved, dict)
    lines.append(f"p99 ratio migrating/idle: {result['p99_ratio']:.2f} (target <= {TARGET_RATIO}); "
                 f"p50 ratio {result['p50_ratio']:.2f}")
    lines.append(f"migration {moved['job_id']} {moved['phase']}: {moved['bytes'] / MiB:.0f} MiB copied in "
                 f"{moved['copy_s']:.1f} s ({moved['mb_per_s']:.0f} MB/s), migration reads yield: {result['yield']}")
    return "\n".join(lines)


def chart(result: dict[str, object], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    timeline = result["timeline"]
    assert isinstance(timeline, list)
    moved = result["migration"]
    assert isinstance(moved, dict)
    fig, ax = plt.subplots(figsize=(11, 5))
    if timeline:
        ax.plot([t for t, _ in timeline], [lat for _, lat in timeline], ",", alpha=0.5, color="tab:blue",
                label="neighbour 4 KiB read latency (each I/O)")
    ax.axvspan(0, moved["copy_s"], color="tab:orange", alpha=0.15, label="mover's migration copying")
    for name, style in (("idle", ":"), ("migrating", "--")):
        phase = result[name]
        assert isinstance(phase, dict)
        ax.axhline(phase["p99_us"], linestyle=style, color="tab:red", label=f"p99 {name}: {phase['p99_us']:.0f} us")
    ax.set_yscale("log")
    ax.set_xlabel("seconds from the migration's start")
    ax.set_ylabel("completion latency (us)")
    ax.set_title(f"neighbour while another controller migrates ({result['mover_mib']} MiB, no bandwidth cap, "
                 f"yield {'on' if result['yield'] else 'off'}): p99 ratio {result['p99_ratio']:.2f}")
    ax.legend(fontsize=8, loc="upper right")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/nvmigrate-bench/isolation"), help="output directory")
    parser.add_argument("--mover-mib", type=int, default=1024, help="the migrating namespace, MiB (filled)")
    parser.add_argument("--idle-s", type=float, default=8.0, help="seconds of the idle measurement")
    parser.add_argument("--ramp-s", type=float, default=1.0, help="fio warm-up before each measurement")
    parser.add_argument("--iodepth", type=int, default=1, help="the neighbour's fio iodepth")
    parser.add_argument("--no-yield", action="store_true", help="migration reads do not yield to guest I/O")
    parser.add_argument("--migration-timeout-s", type=float, default=600.0)
    args = parser.parse_args(argv)
    if args.mover_mib <= 0 or args.idle_s <= 0 or args.ramp_s < 0 or args.iodepth <= 0:
        parser.error(f"--mover-mib ({args.mover_mib}), --idle-s ({args.idle_s}) and --iodepth ({args.iodepth}) "
                     f"must be > 0, --ramp-s ({args.ramp_s}) >= 0")
    try:
        result = run(args)
    except (ClusterError, fio.FioError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(table(result))
    args.out.mkdir(parents=True, exist_ok=True)
    chart(result, args.out / "bench_isolation.png")
    summary = {k: v for k, v in result.items() if k != "timeline"}
    (args.out / "bench_isolation.json").write_text(json.dumps(summary, indent=2))
    print(f"chart: {args.out / 'bench_isolation.png'}; numbers: {args.out / 'bench_isolation.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
