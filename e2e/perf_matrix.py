"""Benchmark: the NVMe live-migration panel's performance matrix, run with fio over NBD against
an emulated controller in a real agent.

4 KiB random read and 4 KiB random write, numjobs 1 and 4 (one NBD connection each), iodepth
1/2/4/8/16. For every point: IOPS, bandwidth, latency (mean of submission to completion, and
the 99th percentile of completion latency), and CPU as usr/sys percent of one core, both for
fio (the client) and for the agent process (NBD server + controller model, all its threads).

It starts its own LocalCluster (etcd, an orchestrator, one agent), creates a controller, fills
its namespace through NBD so reads hit data, runs the matrix, stops the cluster, prints a table,
and writes a PNG chart (plus the numbers as JSON beside it). The namespace lives in a file the
page cache holds, so this measures the agent's I/O path, not a disk.

Usage: python e2e/perf_matrix.py [--quick] [--out artifacts/perf_matrix.png] [--runtime-s 10]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from orchctl import fio
from orchctl.localcluster import ClusterError, LocalCluster
from proto.v1 import agent_pb2, migration_pb2

MiB = 1 << 20
PATTERNS = ("randread", "randwrite")
FULL = {"numjobs": (1, 4), "iodepth": (1, 2, 4, 8, 16)}
QUICK = {"numjobs": (1, 4), "iodepth": (1, 4, 16)}


@dataclass(frozen=True)
class Point:
    rw: str
    numjobs: int
    iodepth: int
    iops: float
    bw_mb_per_s: float
    lat_mean_us: float
    clat_p99_us: float
    fio_usr_percent: float
    fio_sys_percent: float
    agent_usr_percent: float
    agent_sys_percent: float


def cpu_seconds(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of a process, all its threads, from /proc/PID/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / ticks, int(fields[12]) / ticks  # utime, stime (fields 14 and 15)


def measure(uri: str, size_bytes: int, rw: str, numjobs: int, iodepth: int, runtime_s: float, ramp_s: float,
            agent_pid: int) -> Point:
    job = fio.FioJob(uri=uri, size_bytes=size_bytes, rw=rw, iodepth=iodepth, numjobs=numjobs, verify="",
                     runtime_s=runtime_s, ramp_s=ramp_s, name=f"{rw}-j{numjobs}-qd{iodepth}")
    usr0, sys0 = cpu_seconds(agent_pid)
    started = time.monotonic()
    result = fio.run(job, timeout_s=runtime_s + ramp_s + 120)
    elapsed = time.monotonic() - started
    usr1, sys1 = cpu_seconds(agent_pid)
    if not result.ok:
        raise fio.FioError(f"fio {job.name} failed (exit {result.returncode}, errno {result.error}): "
                           f"{result.messages[-400:]}")
    io = result.read if rw == "randread" else result.write
    # The agent's CPU is averaged over the whole fio run (ramp and connection set-up included).
    return Point(rw, numjobs, iodepth, io.iops, io.bw_bytes_per_s / 1e6, io.lat_mean_us, io.clat_p99_us,
                 result.cpu_usr_percent, result.cpu_sys_percent,
                 100.0 * (usr1 - usr0) / elapsed, 100.0 * (sys1 - sys0) / elapsed)


def run_matrix(args: argparse.Namespace) -> list[Point]:
    grid = QUICK if args.quick else FULL
    points: list[Point] = []
    with LocalCluster() as cluster:
        cluster.start_etcd()
        cluster.start_orchestrator()
        agent = cluster.start_agent("n1", capacity=str(2 * args.namespace_mib * MiB))
        channel, n1 = cluster.agent_stub("n1")
        with channel:
            n1.CreateController(agent_pb2.CreateControllerRequest(
                controller_id="perf", namespace_bytes=args.namespace_mib * MiB), timeout=60)
        channel, api = cluster.migration_stub()
        with channel:
            uri = api.ExportController(migration_pb2.ExportControllerRequest(controller_id="perf"), timeout=15).uri
        size = args.namespace_mib * MiB
        print(f"filling {args.namespace_mib} MiB through {uri} ...", file=sys.stderr)
        fill = fio.run(fio.FioJob(uri=uri, size_bytes=size, rw="write", block_bytes=MiB, iodepth=4, verify="",
                                  name="fill"), timeout_s=600)
        if not fill.ok:
            raise fio.FioError(f"filling the namespace failed: {fill.messages[-400:]}")
        for rw in PATTERNS:
            for numjobs in grid["numjobs"]:
                for iodepth in grid["iodepth"]:
                    point = measure(uri, size, rw, numjobs, iodepth, args.runtime_s, args.ramp_s, agent.popen.pid)
                    print(f"  {rw:9} jobs {numjobs} qd {iodepth:2}: {point.iops:9.0f} IOPS "
                          f"p99 {point.clat_p99_us:8.0f} us", file=sys.stderr)
                    points.append(point)
    return points


def table(points: list[Point]) -> str:
    header = (f"{'pattern':9} {'jobs':>4} {'qd':>3} {'IOPS':>9} {'MB/s':>7} {'lat mean us':>11} "
              f"{'clat p99 us':>11} {'fio usr%':>8} {'fio sys%':>8} {'agent usr%':>10} {'agent sys%':>10}")
    lines = [header, "-" * len(header)]
    for p in points:
        lines.append(f"{p.rw:9} {p.numjobs:>4} {p.iodepth:>3} {p.iops:>9.0f} {p.bw_mb_per_s:>7.1f} "
                     f"{p.lat_mean_us:>11.0f} {p.clat_p99_us:>11.0f} {p.fio_usr_percent:>8.1f} "
                     f"{p.fio_sys_percent:>8.1f} {p.agent_usr_percent:>10.1f} {p.agent_sys_percent:>10.1f}")
    return "\n".join(lines)


def chart(points: list[Point], out: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display: render straight to the file
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    panels = [
        (axes[0][0], "IOPS", lambda p: p.iops, False),
        (axes[0][1], "bandwidth (MB/s)", lambda p: p.bw_mb_per_s, False),
        (axes[1][0], "latency (us): mean solid, p99 dashed", lambda p: p.lat_mean_us, True),
        (axes[1][1], "agent CPU (% of one core): usr solid, sys dashed", lambda p: p.agent_usr_percent, False),
    ]
    colors = {("randread", 1): "tab:blue", ("randread", 4): "tab:cyan",
              ("randwrite", 1): "tab:red", ("randwrite", 4): "tab:orange"}
    for ax, label, value, log_scale in panels:
        for (rw, numjobs), color in colors.items():
            series = sorted((p for p in points if p.rw == rw and p.numjobs == numjobs), key=lambda p: p.iodepth)
            if not series:
                continue
            depths = [p.iodepth for p in series]
            ax.plot(depths, [value(p) for p in series], marker="o", color=color,
                    label=f"4k {rw} numjobs={numjobs}")
            if label.startswith("latency"):
                ax.plot(depths, [p.clat_p99_us for p in series], marker="x", linestyle="--", color=color)
            if label.startswith("agent CPU"):
                ax.plot(depths, [p.agent_sys_percent for p in series], marker="x", linestyle="--", color=color)
        ax.set_xscale("log", base=2)
        ax.set_xticks([1, 2, 4, 8, 16], labels=["1", "2", "4", "8", "16"])
        if log_scale:
            ax.set_yscale("log")
        ax.set_xlabel("iodepth (per job)")
        ax.set_title(label)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="iodepth 1/4/16 only, 2 s per point")
    parser.add_argument("--out", type=Path, default=Path("artifacts/perf_matrix.png"), help="PNG chart path")
    parser.add_argument("--runtime-s", type=float, default=None, help="seconds per point (default 10, quick 2)")
    parser.add_argument("--ramp-s", type=float, default=None, help="warm-up seconds per point (default 2, quick 0.5)")
    parser.add_argument("--namespace-mib", type=int, default=None, help="namespace size (default 1024, quick 256)")
    args = parser.parse_args(argv)
    args.runtime_s = args.runtime_s or (2.0 if args.quick else 10.0)
    args.ramp_s = args.ramp_s if args.ramp_s is not None else (0.5 if args.quick else 2.0)
    args.namespace_mib = args.namespace_mib or (256 if args.quick else 1024)
    if args.runtime_s <= 0 or args.ramp_s < 0 or args.namespace_mib <= 0:
        parser.error(f"--runtime-s ({args.runtime_s}) and --namespace-mib ({args.namespace_mib}) must be > 0, "
                     f"--ramp-s ({args.ramp_s}) >= 0")
    try:
        points = run_matrix(args)
    except (ClusterError, fio.FioError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(table(points))
    title = (f"fio over NBD -> agent NBD server -> emulated NVMe controller; 4 KiB, {args.runtime_s:g} s per point, "
             f"{os.cpu_count()} CPUs{' (quick)' if args.quick else ''}")
    chart(points, args.out, title)
    args.out.with_suffix(".json").write_text(json.dumps([asdict(p) for p in points], indent=2))
    print(f"chart: {args.out}; numbers: {args.out.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
