"""etcd writes per migration job against the job's length: jobs of growing namespace size at one
bandwidth cap, each on its own controller with a guest writing, run one after another on one
local cluster (its own etcd, an orchestrator, agents n1 and n2); the writes each caused are read
back from etcd's history (e2e/etcd_writes.py).

    python -m e2e.bench_etcd_writes [--sizes-mib 4,16,32,64] [--bandwidth-mib 8] [--out DIR]

Prints a table, and writes results.json and writes.png to --out. Columns: the job's transactions
on its own keys (its record, its controller's active marker and ownership record: the figure
issue 13 bounds), their key events, the job record's puts, and the agents' node-record puts
seen meanwhile (free-space and health republishes: not the job's keys, counted apart).
A benchmark, not a test: durations depend on the machine.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from e2e.etcd_writes import JobWrites, WriteRecorder
from orchctl.localcluster import LocalCluster, wait_for
from proto.v1 import agent_pb2, migration_pb2

MiB = 1 << 20
TERMINAL = {migration_pb2.COMPLETED, migration_pb2.ROLLED_BACK, migration_pb2.FAILED, migration_pb2.CANCELLED}
DEFAULT_OUT = Path("/tmp/nvmigrate-bench/etcd-writes")


def _sizes(text: str) -> list[int]:
    try:
        sizes = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--sizes-mib {text!r}: give whole MiB, comma-separated, e.g. 4,16,32") \
            from None
    if not sizes or any(s < 1 or s > 4096 for s in sizes):
        raise argparse.ArgumentTypeError(f"--sizes-mib {text!r}: each size must be 1 to 4096 MiB")
    return sizes


def _get(cluster: LocalCluster, job_id: str) -> migration_pb2.Migration:
    channel, api = cluster.migration_stub()
    with channel:
        return api.GetMigration(migration_pb2.GetMigrationRequest(id=job_id), timeout=10)


def run_job(cluster: LocalCluster, cid: str, size_mib: int, bandwidth: int, write_iops: int) -> dict[str, Any]:
    channel, n1 = cluster.agent_stub("n1")
    with channel:
        n1.CreateController(agent_pb2.CreateControllerRequest(
            controller_id=cid, namespace_bytes=size_mib * MiB, prefill=True,
            workload=agent_pb2.WorkloadSpec(write_iops=write_iops, seed=7)), timeout=300)
    recorder = WriteRecorder(cluster.etcd_endpoint, cluster.etcd_prefix)
    started = time.monotonic()
    channel, api = cluster.migration_stub()
    with channel:
        job = api.CreateMigration(migration_pb2.CreateMigrationRequest(
            controller_id=cid, destination_node="n2", policy=migration_pb2.ConvergencePolicy(
                bandwidth_bytes_per_s=bandwidth, max_rounds=6, on_no_convergence=migration_pb2.FORCE)), timeout=10)
    ended = wait_for(f"job {job.id} to end", lambda: (lambda j: j if j.phase in TERMINAL else None)(
        _get(cluster, job.id)), 600, interval_s=0.1)
    duration_s = time.monotonic() - started
    if ended.phase == migration_pb2.COMPLETED:  # the verifier's verdict is the job's last write
        wait_for(f"job {job.id}'s verdict", lambda: _get(cluster, job.id).verification
                 != migration_pb2.VERIFICATION_PENDING, 120, interval_s=0.1)
    writes = JobWrites.of(recorder.collect(), job.id, cid)
    by_key = writes.by_key()
    return {"size_mib": size_mib, "job_id": job.id, "outcome": migration_pb2.Phase.Name(ended.phase),
            "duration_s": round(duration_s, 2), "rounds": ended.rounds, "bytes": ended.bytes_transferred,
            "transactions": writes.revisions, "key_events": len(writes.writes),
            "job_record_puts": by_key.get("jobs/ put", 0), "by_key": by_key,
            "node_record_puts": writes.other_by_key().get("nodes/ put", 0), "writes": writes.describe()}


def plot(results: list[dict[str, Any]], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    durations = [r["duration_s"] for r in results]
    ax.plot(durations, [r["transactions"] for r in results], "o-", label="job's transactions (its keys)")
    ax.plot(durations, [r["node_record_puts"] for r in results], "s--", label="node-record puts meanwhile")
    for r in results:
        ax.annotate(f"{r['size_mib']} MiB", (r["duration_s"], r["transactions"]), textcoords="offset points",
                    xytext=(4, 4), fontsize=8)
    ax.axhline(12, color="grey", linewidth=0.8, linestyle=":", label="budget: 12 per job")
    ax.set_xlabel("job duration (s)")
    ax.set_ylabel("etcd writes")
    ax.set_title("etcd writes per migration job")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m e2e.bench_etcd_writes", description=__doc__.splitlines()[0])
    parser.add_argument("--sizes-mib", type=_sizes, default=[4, 16, 32, 64], help="namespace sizes, MiB")
    parser.add_argument("--bandwidth-mib", type=int, default=8, help="the jobs' bandwidth cap, MiB/s")
    parser.add_argument("--write-iops", type=int, default=200, help="each guest's writes per second")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"results dir (default {DEFAULT_OUT})")
    args = parser.parse_args(argv)
    if not 1 <= args.bandwidth_mib <= 10_000:
        parser.error(f"--bandwidth-mib must be 1 to 10000, got {args.bandwidth_mib}")
    if not 0 <= args.write_iops <= 100_000:
        parser.error(f"--write-iops must be 0 to 100000, got {args.write_iops}")
    args.out.mkdir(parents=True, exist_ok=True)
    results = []
    with LocalCluster() as cluster:
        cluster.start_etcd()
        cluster.start_with_agents(["n1", "n2"])
        print(f"{'size':>8} {'outcome':>10} {'duration':>9} {'rounds':>6} {'txns':>5} {'keys':>5} "
              f"{'job puts':>8} {'node puts':>9}", flush=True)
        for i, size in enumerate(args.sizes_mib):
            r = run_job(cluster, f"bench{i}", size, args.bandwidth_mib * MiB, args.write_iops)
            results.append(r)
            print(f"{size:>5} MiB {r['outcome']:>10} {r['duration_s']:>7.1f} s {r['rounds']:>6} {r['transactions']:>5} "
                  f"{r['key_events']:>5} {r['job_record_puts']:>8} {r['node_record_puts']:>9}", flush=True)
    (args.out / "results.json").write_text(json.dumps({"bandwidth_mib": args.bandwidth_mib,
                                                       "write_iops": args.write_iops, "jobs": results}, indent=2))
    plot(results, args.out / "writes.png")
    print(f"wrote {args.out / 'results.json'} and {args.out / 'writes.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
