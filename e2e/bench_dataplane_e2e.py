"""Benchmark: one namespace file to another over the migration data plane, against
``iperf3 -F`` (file to file, one stream) on loopback, measured in the same run.

Each run copies the whole of a source namespace file (random data, ``--mib`` MiB) to an empty
destination namespace through the code a migration uses: the source process runs a
``SourceSession`` over an ``EmulatedController`` (its precopy: ``DataSender.send_ranges``, whose
worker thread reads the namespace file, checksums and sends), and a separate destination process runs a
``DataReceiver`` with a ``DestinationSession`` over ``EmulatedController.for_resuming``, which
writes every extent into its namespace file. The time is from the start of the precopy to the ACK
of its round, i.e. until every byte was checksummed and written on the destination. Then the
destination file is compared with the source.

The baseline is ``iperf3 -s -F DEST`` and ``iperf3 -c -F SRC -n SIZE`` (one TCP stream, file
read on the client, file written on the server): its receiver throughput from ``--json``.
Variants: plaintext (checksums on, the normal path) and TLS 1.3 (certificates made the way
``orchctl certs`` does). Runs are interleaved so a noisy neighbour hurts every variant alike;
the ratio is ours / iperf3 per run, the table shows medians. "CPU s/GiB" is the user + system
time both ends spent per GiB moved (for iperf3 its client and server; for ours the source
process during the precopy and what the destination process reports for its session): on a
shared, busy machine it says more about the data plane's cost than the wall-clock rate does.

The namespace files live in ``--dir`` (default: a fresh directory under /dev/shm, so the
page cache and not this machine's disk is measured; pass a directory on a disk to include it).

Usage: python -m e2e.bench_dataplane_e2e [--mib 1024] [--repeat 3] [--out /tmp/nvmigrate-bench/dataplane_e2e]
       [--variants iperf3,plain,tls] [--dir DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agent.dataplane.receiver import DataReceiver
from agent.emulated.controller import EmulatedController
from agent.sessions import DestinationSession, SourceSession
from cluster.grpc_tls import TlsFiles
from cluster.identity import Identity, Role

REPO = Path(__file__).resolve().parent.parent
MiB = 1 << 20
GiB = 1 << 30
VARIANTS = ("iperf3", "plain", "tls")
SOURCE_NODE, DESTINATION_NODE = "bench-src", "bench-dst"
RUN_TIMEOUT_S = 600.0


@dataclass
class Run:
    variant: str
    repeat: int
    seconds: float
    mb_per_s: float
    cpu_seconds: float  # user + system, both ends, for the transfer alone


def cpu_self() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def cpu_children() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


# ---- certificates -------------------------------------------------------------------------------


def make_certs(directory: Path) -> dict[str, Path]:
    """A CA and two agent certificates, made as `orchctl certs` makes them."""
    from orchctl.certs import init_ca, issue

    init_ca(directory)
    files: dict[str, Path] = {"ca": directory / "ca.pem"}
    for node in (SOURCE_NODE, DESTINATION_NODE):
        issued = issue(directory, Identity(Role.AGENT, node), ("127.0.0.1",))
        files[f"{node}.cert"], files[f"{node}.key"] = issued.cert, issued.key
    return files


def tls_files(ca: Path, cert: Path, key: Path) -> TlsFiles:
    return TlsFiles(ca.read_bytes(), cert.read_bytes(), key.read_bytes(), cert_file=cert, key_file=key)


# ---- the destination process --------------------------------------------------------------------


async def destination_main(args: argparse.Namespace) -> int:
    """Receives one job into a new namespace file; prints its address, then its outcome."""
    tls = tls_files(Path(args.ca), Path(args.cert), Path(args.key)) if args.ca else None
    receiver = DataReceiver("127.0.0.1", ssl=tls.ssl_context(server=True) if tls else None)
    await receiver.start()
    controller = EmulatedController.for_resuming("bench", Path(args.namespace), args.bytes)
    session = DestinationSession(job_id=args.job, epoch=1, controller_id="bench", controller=controller,
                                 token=args.token, backend="emulated")
    receiver.register(args.job, args.token, session, source_node=SOURCE_NODE if tls else "")
    print(f"address {receiver.address}", flush=True)
    cpu_before = cpu_self()
    try:
        # The source ends with ABORT once it has its ACK: the session then ends.
        stats = await asyncio.wait_for(receiver.wait_session_end(args.job), RUN_TIMEOUT_S)
    finally:
        await receiver.close()
        controller.close()
    print(f"received {stats.bytes_received} cpu {cpu_self() - cpu_before:.3f} error {stats.last_error}", flush=True)
    return 0


# ---- one run of ours ----------------------------------------------------------------------------


async def run_ours(source_path: Path, nbytes: int, workdir: Path, *, certs: dict[str, Path] | None,
                   label: str) -> tuple[float, float]:
    """Seconds for a precopy of the whole namespace to a destination process, and the CPU
    seconds both ends spent on it."""
    dest_path = workdir / f"dest-{label}.ns"
    dest_path.unlink(missing_ok=True)
    job, token = f"bench-{label}", secrets.token_hex(8)
    cmd = [sys.executable, "-m", "e2e.bench_dataplane_e2e", "--destination", "--namespace", str(dest_path),
           "--bytes", str(nbytes), "--job", job, "--token", token]
    if certs is not None:
        cmd += ["--ca", str(certs["ca"]), "--cert", str(certs[f"{DESTINATION_NODE}.cert"]),
                "--key", str(certs[f"{DESTINATION_NODE}.key"])]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    stderr_path = workdir / f"dest-{label}.stderr"
    with stderr_path.open("wb") as stderr:
        proc = await asyncio.create_subprocess_exec(*cmd, stdout=asyncio.subprocess.PIPE, stderr=stderr, env=env)
    source = EmulatedController("bench", source_path, nbytes, create=False)
    outbound: SourceSession | None = None
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode().strip()
        if not line.startswith("address "):
            raise RuntimeError(f"destination process did not start: {line!r} {stderr_path.read_text()[-2000:]}")
        address = line.split()[1]
        data_ssl = None
        if certs is not None:
            tls = tls_files(certs["ca"], certs[f"{SOURCE_NODE}.cert"], certs[f"{SOURCE_NODE}.key"])
            data_ssl = tls.ssl_context(server=False)
        outbound = SourceSession(job_id=job, epoch=1, controller_id="bench", controller=source, token=token,
                                 data_ssl=data_ssl)
        started, cpu_before = time.perf_counter(), cpu_self()
        facts = await outbound.start_precopy(address, token, 0, destination_node=DESTINATION_NODE)
        elapsed, cpu = time.perf_counter() - started, cpu_self() - cpu_before
        if facts.bytes_sent != nbytes:
            raise RuntimeError(f"precopy sent {facts.bytes_sent} bytes, expected {nbytes}")
        await outbound.abort("benchmark run done")
        outbound = None
        tail = (await asyncio.wait_for(proc.stdout.read(), 60)).decode()
        await asyncio.wait_for(proc.wait(), 60)
        if f"received {nbytes} " not in tail:
            raise RuntimeError(f"destination reports {tail.strip()!r}, expected {nbytes} bytes received; its "
                               f"stderr: {stderr_path.read_text()[-2000:]}")
        same = await asyncio.to_thread(files_equal, source_path, dest_path)
        if not same:
            raise RuntimeError(f"destination namespace {dest_path} differs from the source {source_path}")
        return elapsed, cpu + float(tail.split(" cpu ")[1].split()[0])
    finally:
        if outbound is not None:
            with contextlib.suppress(Exception):
                await outbound.abort("benchmark failed")
        source.close()
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        dest_path.unlink(missing_ok=True)
        stderr_path.unlink(missing_ok=True)


def files_equal(a: Path, b: Path) -> bool:
    return subprocess.run(["cmp", "-s", str(a), str(b)], check=False).returncode == 0


# ---- one run of iperf3 --------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_iperf3(source_path: Path, nbytes: int, workdir: Path) -> tuple[float, float]:
    """Seconds iperf3 takes for the same bytes, file to file, one stream (its receiver's figure),
    and the CPU seconds of its client and server."""
    cpu_before = cpu_children()
    dest_path = workdir / "iperf3-dest.bin"
    dest_path.unlink(missing_ok=True)
    port = free_port()
    server = subprocess.Popen(["iperf3", "-s", "-1", "-B", "127.0.0.1", "-p", str(port), "-F", str(dest_path)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        client = None
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # retry the connect until the server listens (slow on a busy host)
            client = subprocess.run(["iperf3", "-c", "127.0.0.1", "-p", str(port), "-F", str(source_path),
                                     "-n", str(nbytes), "--json"], capture_output=True, text=True,
                                    timeout=RUN_TIMEOUT_S, check=False)
            # (with --json iperf3 exits 0 even when it could not connect: the reason is in the JSON)
            if "Connection refused" not in client.stdout + client.stderr:
                break
            time.sleep(0.05)
        assert client is not None
        if client.returncode != 0:
            raise RuntimeError(f"iperf3 client failed: {client.stdout[-500:]} {client.stderr[-500:]}")
        report = json.loads(client.stdout)
        received = report.get("end", {}).get("sum_received")
        if received is None:
            raise RuntimeError(f"iperf3 reports no received sum: {report.get('error', client.stdout[-500:])}")
        # An iperf3 server with -F ends the test when the client says it is done sending, and
        # drops what is still in its socket (often 5-15 % of the bytes): its rate is what it
        # wrote in the time it took, which is what we compare with.
        if int(received["bytes"]) < nbytes // 2:
            raise RuntimeError(f"iperf3 moved {received['bytes']} bytes of {nbytes}")
        seconds = float(received["seconds"]) * nbytes / float(received["bytes"])
    finally:
        if server.poll() is None:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(10)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
        dest_path.unlink(missing_ok=True)
    return seconds, cpu_children() - cpu_before


# ---- the benchmark ------------------------------------------------------------------------------


def make_source(path: Path, nbytes: int) -> None:
    """Random data (a 64 MiB random block repeated: TCP does not compress, and urandom is slow)."""
    block = os.urandom(min(nbytes, 64 * MiB))
    with path.open("wb") as f:
        written = 0
        while written < nbytes:
            n = min(len(block), nbytes - written)
            f.write(block[:n])
            written += n


def plot(runs: list[Run], summary: dict[str, dict[str, float]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summary)
    fig, ax = plt.subplots(figsize=(7, 4))
    bars = ax.bar(names, [summary[n]["median_mb_per_s"] for n in names], color=["#888", "#2a7", "#27a", "#a72"][
        : len(names)])
    for name, bar in zip(names, bars, strict=True):
        ratio = summary[name].get("median_ratio")
        if ratio is not None:
            ax.annotate(f"{ratio:.2f}x iperf3", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        ha="center", va="bottom")
    for i, name in enumerate(names):
        ax.scatter([i] * len([r for r in runs if r.variant == name]),
                   [r.mb_per_s for r in runs if r.variant == name], color="k", s=10, zorder=3)
    ax.set_ylabel("MB/s (file to file, loopback)")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


async def bench(args: argparse.Namespace, base: Path | None, out: Path) -> int:
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or not variants:
        print(f"--variants {args.variants!r}: choose from {', '.join(VARIANTS)}", file=sys.stderr)
        return 2
    if args.mib <= 0 or args.repeat <= 0:
        print(f"--mib {args.mib} and --repeat {args.repeat} must be positive", file=sys.stderr)
        return 2
    if "iperf3" in variants and shutil.which("iperf3") is None:
        print("iperf3 is not installed; install it or leave it out of --variants", file=sys.stderr)
        return 2
    nbytes = args.mib * MiB
    workdir = Path(tempfile.mkdtemp(prefix="nvmigrate-bench-dp-", dir=base))
    runs: list[Run] = []
    try:
        source_path = workdir / "source.ns"
        await asyncio.to_thread(make_source, source_path, nbytes)
        certs = make_certs(workdir / "pki") if "tls" in variants else None
        for i in range(args.repeat):
            for variant in variants:
                if variant == "iperf3":
                    seconds, cpu = await asyncio.to_thread(run_iperf3, source_path, nbytes, workdir)
                else:
                    seconds, cpu = await run_ours(source_path, nbytes, workdir,
                                                  certs=certs if variant == "tls" else None, label=f"{variant}-{i}")
                runs.append(Run(variant, i, seconds, nbytes / seconds / 1e6, cpu))
                print(f"  run {i} {variant:7s} {nbytes / seconds / 1e6:8.0f} MB/s  cpu {cpu * GiB / nbytes:6.2f} s/GiB",
                      flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    summary: dict[str, dict[str, float]] = {}
    for variant in variants:
        mine = [r for r in runs if r.variant == variant]
        entry = {"median_mb_per_s": statistics.median(r.mb_per_s for r in mine),
                 "best_mb_per_s": max(r.mb_per_s for r in mine),
                 "median_cpu_s_per_gib": statistics.median(r.cpu_seconds * GiB / nbytes for r in mine)}
        if variant != "iperf3" and "iperf3" in variants:
            ratios = [r.mb_per_s / next(b.mb_per_s for b in runs if b.variant == "iperf3" and b.repeat == r.repeat)
                      for r in mine]
            entry["median_ratio"] = statistics.median(ratios)
        summary[variant] = entry
    title = f"{args.mib} MiB namespace file to file, {args.repeat} runs"
    print(f"\n{title} (medians; ratio = ours / iperf3 -F in the same repeat)")
    print(f"  {'variant':8s} {'MB/s':>8s} {'best':>8s} {'ratio':>7s} {'CPU s/GiB':>10s}")
    for variant, entry in summary.items():
        ratio = f"{entry['median_ratio']:.2f}" if "median_ratio" in entry else "-"
        print(f"  {variant:8s} {entry['median_mb_per_s']:8.0f} {entry['best_mb_per_s']:8.0f} {ratio:>7s} "
              f"{entry['median_cpu_s_per_gib']:10.2f}")
    report = {"mib": args.mib, "repeat": args.repeat, "dir": str(base or tempfile.gettempdir()),
              "runs": [asdict(r) for r in runs], "summary": summary}
    (out / "bench_dataplane_e2e.json").write_text(json.dumps(report, indent=2))
    plot(runs, summary, out / "bench_dataplane_e2e.png", title)
    print(f"wrote {out / 'bench_dataplane_e2e.json'} and {out / 'bench_dataplane_e2e.png'}")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mib", type=int, default=1024, help="namespace size in MiB (default 1024)")
    ap.add_argument("--repeat", type=int, default=3, help="runs per variant (default 3)")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated: iperf3,plain,tls")
    ap.add_argument("--dir", default="", help="where the namespace files go (default a directory in /dev/shm)")
    ap.add_argument("--out", default="/tmp/nvmigrate-bench/dataplane_e2e", help="JSON and PNG go here")
    # The destination process (started by the benchmark itself).
    ap.add_argument("--destination", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--namespace", help=argparse.SUPPRESS)
    ap.add_argument("--bytes", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--job", help=argparse.SUPPRESS)
    ap.add_argument("--token", help=argparse.SUPPRESS)
    ap.add_argument("--ca", default="", help=argparse.SUPPRESS)
    ap.add_argument("--cert", default="", help=argparse.SUPPRESS)
    ap.add_argument("--key", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.destination:
        return asyncio.run(destination_main(args))
    base = Path(args.dir) if args.dir else (Path("/dev/shm") if Path("/dev/shm").is_dir() else None)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    return asyncio.run(bench(args, base, out))


if __name__ == "__main__":
    sys.exit(main())
