"""What mutual TLS costs the guest: `orchctl demo` with TLS and without, in interleaved pairs on
the same machine in the same sitting, and the medians of the guest-observed blackout, the
orchestrator's switchover and the precopy throughput of each, with their ratios.

    python -m e2e.bench_tls_blackout --pairs 8 [--json out.json] [demo options, e.g. --namespace 256M]

A benchmark, not a test: its figures depend on the machine; the README and the notes quote them
with the command that gave them.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

FIGURES = ("blackout_ms", "switchover_ms", "precopy_throughput_bytes_per_s")


def run_demo(tls: bool, demo_args: list[str]) -> dict[str, Any]:
    done = subprocess.run([sys.executable, "-m", "orchctl.cli", "demo", "--json", "--tls" if tls else "--no-tls",
                           *demo_args], capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        raise SystemExit(f"demo ({'TLS' if tls else 'plaintext'}) failed with {done.returncode}:\n"
                         f"{done.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m e2e.bench_tls_blackout", description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=8, help="demo runs of each kind, interleaved")
    parser.add_argument("--json", type=Path, default=None, help="write every run and the medians here")
    args, demo_args = parser.parse_known_args(argv)
    if args.pairs < 1:
        parser.error(f"--pairs must be at least 1, got {args.pairs}")
    runs: dict[str, list[dict[str, Any]]] = {"plaintext": [], "tls": []}
    for i in range(args.pairs):
        # alternate which goes first, so a drift of the machine's load does not favour one
        for tls in ((False, True) if i % 2 == 0 else (True, False)):
            result = run_demo(tls, demo_args)
            runs["tls" if tls else "plaintext"].append(result)
            kind = "tls" if tls else "plaintext"
            print(f"pair {i + 1}/{args.pairs} {kind:9}: blackout {result['blackout_ms']:7.1f} ms"
                  f"  switchover {result['switchover_ms']:7.1f} ms  precopy "
                  f"{result['precopy_throughput_bytes_per_s'] / 1e6:6.1f} MB/s  {result['phase']}", flush=True)
    medians = {kind: {f: statistics.median(r[f] for r in results) for f in FIGURES} for kind, results in runs.items()}
    print(f"\n{'median of ' + str(args.pairs):16} {'plaintext':>12} {'TLS':>12} {'TLS / plaintext':>16}")
    for figure in FIGURES:
        plain, tls = medians["plaintext"][figure], medians["tls"][figure]
        print(f"{figure:32} {plain:12.1f} {tls:12.1f} {tls / plain if plain else float('nan'):16.2f}")
    if args.json is not None:
        args.json.write_text(json.dumps({"runs": runs, "medians": medians}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
