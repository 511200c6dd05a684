"""Benchmark: the agent's NBD export against `qemu-nbd` serving a raw file, in the same run.

The fio matrix of e2e/perf_matrix.py (4 KiB randread and randwrite, numjobs 1 and 4, one NBD
connection per job, iodepth 1/4/16 in --quick) runs twice per cell, back to back: once against an
emulated controller's export in a real agent (LocalCluster: etcd, orchestrator, one agent), once
against `qemu-nbd -f raw` on a file of the same size in the same directory tree. Both files are
filled first, so reads hit data, and both live in the page cache: this compares the two servers'
I/O paths, not a disk. Figures on a shared machine are noisy; the ratio per cell (ours / qemu-nbd)
is the figure to read, since both sides of a cell ran seconds apart under the same load. With
--repeat N each cell alternates the two servers N times and keeps, for each, the run with the median
IOPS. CPU per I/O (the server process's user + system CPU time over the I/Os fio completed) is the
figure least bent by other load.

Prints a table, writes the numbers as JSON and a PNG chart to --out DIR. Every process it starts
(the cluster's, qemu-nbd) is stopped by pid before it returns.

Usage: python -m e2e.bench_nbd [--quick] [--out /tmp/nvmigrate-bench/nbd] [--runtime-s S] [--repeat N]
                              [--cells rw:jobs:qd,...]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from e2e.perf_matrix import FULL, PATTERNS, QUICK, MiB, Point, measure
from orchctl import fio
from orchctl.localcluster import ClusterError, LocalCluster
from proto.v1 import agent_pb2, migration_pb2

QEMU_EXPORT = "raw"
QEMU_READY_TIMEOUT_S = 15.0


@dataclass(frozen=True)
class Cell:
    """One cell of the matrix: our export and qemu-nbd's, measured back to back."""

    ours: Point
    qemu: Point

    @property
    def ratio(self) -> float:
        return self.ours.iops / self.qemu.iops if self.qemu.iops else 0.0


def cpu_us_per_io(point: Point, runtime_s: float, ramp_s: float) -> float:
    """The server's CPU time per I/O; perf_matrix averages it over the whole fio run, ramp included."""
    ios = point.iops * runtime_s
    cpu_s = (point.agent_usr_percent + point.agent_sys_percent) / 100.0 * (runtime_s + ramp_s)
    return 1e6 * cpu_s / ios if ios else 0.0


def median_run(points: list[Point]) -> Point:
    return sorted(points, key=lambda p: p.iops)[len(points) // 2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class QemuNbd:
    """`qemu-nbd` on a raw file: started by `start()`, stopped by pid in `stop()`."""

    def __init__(self, image: Path, port: int) -> None:
        self.image = image
        self.port = port
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def uri(self) -> str:
        return f"nbd://127.0.0.1:{self.port}/{QEMU_EXPORT}"

    def start(self) -> None:
        binary = shutil.which("qemu-nbd")
        if binary is None:
            raise ClusterError("qemu-nbd is not installed: `apt-get install qemu-utils` (Debian) provides it")
        # --shared: one connection per fio job (the default is one client at all).
        argv = [binary, "-f", "raw", "-x", QEMU_EXPORT, "-b", "127.0.0.1", "-p", str(self.port), "--persistent",
                "--shared=16", str(self.image)]
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE)
        deadline = time.monotonic() + QEMU_READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                raise ClusterError(f"qemu-nbd exited with {self.proc.returncode}: {err.strip()[-400:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.05)  # polling the listener with a deadline: qemu-nbd has no ready signal
        raise ClusterError(f"qemu-nbd did not listen on port {self.port} within {QEMU_READY_TIMEOUT_S:g} s")

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            os.kill(self.proc.pid, 15)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, 9)
                self.proc.wait(timeout=10)
        if self.proc.stderr is not None:
            self.proc.stderr.close()
        self.proc = None


def fill(uri: str, size: int) -> None:
    done = fio.run(fio.FioJob(uri=uri, size_bytes=size, rw="write", block_bytes=MiB, iodepth=4, verify="",
                              name="fill"), timeout_s=600)
    if not done.ok:
        raise fio.FioError(f"filling {uri} failed: {done.messages[-400:]}")


def parse_cells(text: str) -> list[tuple[str, int, int]]:
    cells = []
    for item in text.split(","):
        parts = item.strip().split(":")
        if len(parts) != 3 or parts[0] not in PATTERNS or not parts[1].isdigit() or not parts[2].isdigit() \
                or int(parts[1]) <= 0 or int(parts[2]) <= 0:
            raise ValueError(f"cell {item!r} is not RW:JOBS:QD with RW one of {', '.join(PATTERNS)} "
                             "and JOBS, QD positive integers (e.g. randread:4:16)")
        cells.append((parts[0], int(parts[1]), int(parts[2])))
    return cells


def run(args: argparse.Namespace, cells: list[tuple[str, int, int]]) -> list[Cell]:
    size = args.namespace_mib * MiB
    results: list[Cell] = []
    with tempfile.TemporaryDirectory(prefix="bench-nbd-") as tmp, LocalCluster() as cluster:
        cluster.start_etcd()
        cluster.start_orchestrator()
        agent = cluster.start_agent("n1", capacity=str(2 * size))
        channel, n1 = cluster.agent_stub("n1")
        with channel:
            n1.CreateController(agent_pb2.CreateControllerRequest(controller_id="perf", namespace_bytes=size),
                                timeout=60)
        channel, api = cluster.migration_stub()
        with channel:
            ours_uri = api.ExportController(migration_pb2.ExportControllerRequest(controller_id="perf"),
                                            timeout=15).uri
        image = Path(tmp) / "raw.img"
        with open(image, "wb") as f:
            f.truncate(size)
        qemu = QemuNbd(image, free_port())
        try:
            qemu.start()
            assert qemu.proc is not None
            print(f"filling {args.namespace_mib} MiB through {ours_uri} and {qemu.uri} ...", file=sys.stderr)
            fill(ours_uri, size)
            fill(qemu.uri, size)
            for rw, numjobs, iodepth in cells:
                ours_runs, qemu_runs = [], []
                for _ in range(args.repeat):
                    ours_runs.append(measure(ours_uri, size, rw, numjobs, iodepth, args.runtime_s, args.ramp_s,
                                             agent.popen.pid))
                    qemu_runs.append(measure(qemu.uri, size, rw, numjobs, iodepth, args.runtime_s, args.ramp_s,
                                             qemu.proc.pid))
                ours, theirs = median_run(ours_runs), median_run(qemu_runs)
                cell = Cell(ours, theirs)
                print(f"  {rw:9} jobs {numjobs} qd {iodepth:2}: ours {ours.iops:8.0f} qemu-nbd {theirs.iops:8.0f} "
                      f"IOPS  ratio {cell.ratio:5.2f}", file=sys.stderr)
                results.append(cell)
        finally:
            qemu.stop()
    return results


def table(cells: list[Cell], runtime_s: float, ramp_s: float) -> str:
    header = (f"{'pattern':9} {'jobs':>4} {'qd':>3} {'ours IOPS':>10} {'qemu IOPS':>10} {'ratio':>6} "
              f"{'ours p99 us':>11} {'qemu p99 us':>11} {'ours cpu%':>9} {'qemu cpu%':>9} "
              f"{'ours us/IO':>10} {'qemu us/IO':>10}")
    lines = [header, "-" * len(header)]
    for c in cells:
        o, q = c.ours, c.qemu
        lines.append(f"{o.rw:9} {o.numjobs:>4} {o.iodepth:>3} {o.iops:>10.0f} {q.iops:>10.0f} {c.ratio:>6.2f} "
                     f"{o.clat_p99_us:>11.0f} {q.clat_p99_us:>11.0f} "
                     f"{o.agent_usr_percent + o.agent_sys_percent:>9.0f} "
                     f"{q.agent_usr_percent + q.agent_sys_percent:>9.0f} "
                     f"{cpu_us_per_io(o, runtime_s, ramp_s):>10.1f} {cpu_us_per_io(q, runtime_s, ramp_s):>10.1f}")
    return "\n".join(lines)


def chart(cells: list[Cell], out: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display: render straight to the file
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    colors = {("randread", 1): "tab:blue", ("randread", 4): "tab:cyan",
              ("randwrite", 1): "tab:red", ("randwrite", 4): "tab:orange"}
    for (rw, numjobs), color in colors.items():
        series = sorted((c for c in cells if c.ours.rw == rw and c.ours.numjobs == numjobs),
                        key=lambda c: c.ours.iodepth)
        if not series:
            continue
        depths = [c.ours.iodepth for c in series]
        label = f"4k {rw} numjobs={numjobs}"
        axes[0].plot(depths, [c.ours.iops for c in series], marker="o", color=color, label=f"ours {label}")
        axes[0].plot(depths, [c.qemu.iops for c in series], marker="x", linestyle="--", color=color,
                     label=f"qemu-nbd {label}")
        axes[1].plot(depths, [c.ratio for c in series], marker="o", color=color, label=label)
    axes[1].axhline(0.5, color="gray", linestyle=":", label="target 0.5")
    for ax, name in ((axes[0], "IOPS: ours solid, qemu-nbd dashed"), (axes[1], "ours / qemu-nbd IOPS")):
        ax.set_xscale("log", base=2)
        ax.set_xticks([1, 2, 4, 8, 16], labels=["1", "2", "4", "8", "16"])
        ax.set_xlabel("iodepth (per job)")
        ax.set_title(name)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="iodepth 1/4/16 only, 2 s per point")
    parser.add_argument("--out", type=Path, default=Path("/tmp/nvmigrate-bench/nbd"), help="output directory")
    parser.add_argument("--runtime-s", type=float, default=None, help="seconds per point (default 10, quick 2)")
    parser.add_argument("--ramp-s", type=float, default=None, help="warm-up seconds per point (default 2, quick 0.5)")
    parser.add_argument("--namespace-mib", type=int, default=None, help="namespace size (default 1024, quick 256)")
    parser.add_argument("--repeat", type=int, default=1, help="runs per server and cell, the median kept")
    parser.add_argument("--cells", default="", help="only these cells, e.g. randread:4:16,randwrite:1:1")
    args = parser.parse_args(argv)
    args.runtime_s = args.runtime_s or (2.0 if args.quick else 10.0)
    args.ramp_s = args.ramp_s if args.ramp_s is not None else (0.5 if args.quick else 2.0)
    args.namespace_mib = args.namespace_mib or (256 if args.quick else 1024)
    if args.runtime_s <= 0 or args.ramp_s < 0 or args.namespace_mib <= 0 or args.repeat <= 0:
        parser.error(f"--runtime-s ({args.runtime_s}), --namespace-mib ({args.namespace_mib}) and --repeat "
                     f"({args.repeat}) must be > 0, --ramp-s ({args.ramp_s}) >= 0")
    if args.cells:
        try:
            cells = parse_cells(args.cells)
        except ValueError as exc:
            parser.error(str(exc))
    else:
        grid = QUICK if args.quick else FULL
        cells = [(rw, j, qd) for rw in PATTERNS for j in grid["numjobs"] for qd in grid["iodepth"]]
    try:
        results = run(args, cells)
    except (ClusterError, fio.FioError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(table(results, args.runtime_s, args.ramp_s))
    args.out.mkdir(parents=True, exist_ok=True)
    png, js = args.out / "bench_nbd.png", args.out / "bench_nbd.json"
    title = (f"fio over NBD: agent (emulated NVMe) vs qemu-nbd raw file; 4 KiB, {args.runtime_s:g} s per point, "
             f"{os.cpu_count()} CPUs{' (quick)' if args.quick else ''}")
    chart(results, png, title)
    js.write_text(json.dumps([{"ours": asdict(c.ours), "qemu_nbd": asdict(c.qemu), "ratio": c.ratio,
                               "ours_cpu_us_per_io": cpu_us_per_io(c.ours, args.runtime_s, args.ramp_s),
                               "qemu_nbd_cpu_us_per_io": cpu_us_per_io(c.qemu, args.runtime_s, args.ramp_s)}
                              for c in results], indent=2))
    print(f"chart: {png}; numbers: {js}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
