"""Benchmark: evacuation makespan against the bandwidth bound of the evacuated node.

Starts its own LocalCluster (etcd, one orchestrator with the evacuation limits
--evacuation-max-parallel 5 --evacuation-outbound-per-node 2 --evacuation-inbound-per-node 2,
agents n1 plus --destinations others), creates --controllers controllers of --size-mib MiB on n1
(prefilled, each with a guest writing --write-iops), then in the same run:

1. the baseline: one lone migration of a controller of the same size off n1 (created beside the
   others, so n1 carries the same load), then `outbound-per-node` of them at once; each waits for
   the verification of the previous one so that they do not overlap;
2. the evacuation of n1 (EvacuateNode, what `orchctl evacuate node n1` sends), until it ends.

Makespan: from the evacuation request to the last controller running on its destination (the
start of its job's COMPLETED phase, when the destination has resumed it). The bound is the
best the source could do under its outbound limit at the data-plane rates measured here:

    best rate = max(size / lone job time, outbound * size / time of the concurrent batch)
    bound     = controllers * size / best rate

A job's time runs from its creation to COMPLETED (preparing, precopy, dirty rounds, switchover,
resume), so the per-migration fixed costs are part of the rate, and only the evacuation's own
scheduling (idle slots, the time to notice an end and start the next) comes on top. The target
is makespan <= 1.2 x bound.

Prints a table, writes bench_evacuation.json and bench_evacuation.png (a Gantt chart of every
migration's phases) to --out. Every process it starts is stopped by pid (LocalCluster.stop).

Usage: python e2e/bench_evacuation.py [--quick] [--controllers 32] [--size-mib 256] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import grpc

from orchctl.localcluster import ClusterError, LocalCluster, wait_for
from proto.v1 import agent_pb2, migration_pb2

MiB = 1 << 20
SOURCE = "n1"
TARGET_RATIO = 1.2
LIMITS = {"max_parallel": 5, "outbound_per_node": 2, "inbound_per_node": 2}
DEADLINE_S = 3600.0
# Phases drawn in the Gantt chart, and the colour of each.
PHASE_COLOURS = {
    "PENDING": "#bbbbbb", "PREPARING": "#8c6bb1", "PRECOPY": "#1f77b4", "DIRTY_ITERATION": "#17becf",
    "STOP_AND_COPY": "#d62728", "COMMIT": "#ff7f0e", "RESUMING": "#2ca02c",
}


@dataclass(frozen=True)
class JobTiming:
    """One migration as its job record tells it; times are seconds since the reference instant."""

    job_id: str
    controller_id: str
    destination: str
    created: float
    running: float  # COMPLETED began: the controller runs on its destination
    phases: list[tuple[str, float, float]]  # (phase, start, end)
    precopy_bytes: int
    precopy_s: float
    bytes_transferred: int
    verified: float  # when its verification verdict was written (the job's last update)

    @property
    def duration(self) -> float:
        return self.running - self.created


@dataclass
class Baseline:
    label: str = ""
    lone_s: float = 0.0
    lone_precopy_mb_per_s: float = 0.0
    batch_s: float = 0.0
    batch_size: int = 0
    lone_rate_mb_per_s: float = 0.0
    batch_rate_mb_per_s: float = 0.0
    best_rate_mb_per_s: float = 0.0
    jobs: list[dict[str, Any]] = field(default_factory=list)
    cpu: dict[str, float] = field(default_factory=dict)
    batch_cpu: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class CpuSample:
    """CPU seconds used so far: the whole machine (busy, all cores) and this cluster's processes."""

    wall: float
    machine_busy_s: float
    ours_s: float
    load_1m: float

    @classmethod
    def now(cls, pids: Sequence[int]) -> CpuSample:
        ticks = os.sysconf("SC_CLK_TCK")
        cpu = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
        idle = int(cpu[3]) + int(cpu[4])  # idle + iowait
        busy = sum(int(v) for v in cpu[:8]) - idle
        ours = 0
        for pid in pids:
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue  # exited meanwhile
            ours += int(fields[11]) + int(fields[12])  # utime, stime
        return cls(time.monotonic(), busy / ticks, ours / ticks, os.getloadavg()[0])


def cpu_use(start: CpuSample, end: CpuSample) -> dict[str, float]:
    """Cores busy on average between two samples: all of the machine, ours, everyone else's."""
    wall = max(end.wall - start.wall, 1e-9)
    machine = (end.machine_busy_s - start.machine_busy_s) / wall
    ours = (end.ours_s - start.ours_s) / wall
    return {"seconds": wall, "machine_cores_busy": machine, "cluster_cores_busy": ours,
            "other_cores_busy": max(0.0, machine - ours), "load_1m_at_end": end.load_1m,
            "cores": float(os.cpu_count() or 1)}


def phase_name(value: int) -> str:
    return migration_pb2.Phase.Name(value)


def timing(job: migration_pb2.Migration, reference: float) -> JobTiming:
    if job.phase != migration_pb2.COMPLETED:
        raise ClusterError(f"job {job.id} ({job.controller_id}) ended {phase_name(job.phase)}: {job.reason}")
    completed = next(p.started_at for p in job.phases if p.phase == migration_pb2.COMPLETED)
    spans = []
    for entry, following in zip(job.phases, job.phases[1:], strict=False):
        spans.append((phase_name(entry.phase), entry.started_at - reference, following.started_at - reference))
    precopy = [p for p in job.phases if p.phase == migration_pb2.PRECOPY]
    return JobTiming(job.id, job.controller_id, job.destination_node, job.created_at - reference,
                     completed - reference, spans, sum(p.bytes for p in precopy),
                     sum(p.duration_ms for p in precopy) / 1000.0, job.bytes_transferred, job.updated_at - reference)


class Bench:
    def __init__(self, cluster: LocalCluster, args: argparse.Namespace) -> None:
        self.cluster = cluster
        self.args = args
        self.size = args.size_mib * MiB

    def api(self, call: Callable[[Any], Any]) -> Any:
        channel, stub = self.cluster.migration_stub()
        with channel:
            return call(stub)

    def create_controllers(self, ids: Sequence[str]) -> None:
        channel, agent = self.cluster.agent_stub(SOURCE)
        workload = agent_pb2.WorkloadSpec(write_iops=self.args.write_iops, seed=7) if self.args.write_iops else None

        def create(cid: str) -> None:
            agent.CreateController(agent_pb2.CreateControllerRequest(
                controller_id=cid, namespace_bytes=self.size, prefill=True, workload=workload), timeout=600)

        with channel, ThreadPoolExecutor(2) as pool:  # two at a time: the machine has two cores
            list(pool.map(create, ids))

    def job(self, job_id: str) -> migration_pb2.Migration:
        return self.api(lambda s: s.GetMigration(migration_pb2.GetMigrationRequest(id=job_id), timeout=10))

    def wait_settled(self, job_ids: Sequence[str]) -> list[migration_pb2.Migration]:
        """Waits for the jobs to end and their verification verdicts (so that nothing of them
        still runs when the next measurement starts)."""
        def probe() -> list[migration_pb2.Migration] | None:
            try:
                jobs = [self.job(j) for j in job_ids]
            except grpc.RpcError:
                return None
            for job in jobs:
                if job.phase in (migration_pb2.ROLLED_BACK, migration_pb2.FAILED, migration_pb2.CANCELLED):
                    raise ClusterError(f"baseline job {job.id} ended {phase_name(job.phase)}: {job.reason}")
            done = all(j.phase == migration_pb2.COMPLETED and j.verification != migration_pb2.VERIFICATION_PENDING
                       for j in jobs)
            return jobs if done else None
        return wait_for(f"baseline jobs {', '.join(job_ids)}", probe, DEADLINE_S, interval_s=0.1)

    def migrate(self, cid: str, to: str) -> str:
        job = self.api(lambda s: s.CreateMigration(
            migration_pb2.CreateMigrationRequest(controller_id=cid, destination_node=to), timeout=30))
        return str(job.id)

    def cpu(self) -> CpuSample:
        return CpuSample.now([p.popen.pid for p in self.cluster.procs])

    def baseline(self, label: str, destinations: Sequence[str]) -> Baseline:
        batch = LIMITS["outbound_per_node"]
        lone_id, batch_ids = f"{label}-lone", [f"{label}-batch-{i}" for i in range(1, batch + 1)]
        print(f"baseline {label}: creating {1 + batch} more controllers of {self.args.size_mib} MiB on {SOURCE}",
              file=sys.stderr)
        self.create_controllers([lone_id, *batch_ids])
        base = Baseline(label=label, batch_size=batch)
        cpu_start = self.cpu()
        (lone,) = self.wait_settled([self.migrate(lone_id, destinations[0])])
        lone_t = timing(lone, lone.created_at)
        base.lone_s = lone_t.duration
        base.lone_rate_mb_per_s = self.size / lone_t.duration / 1e6
        base.lone_precopy_mb_per_s = lone_t.precopy_bytes / lone_t.precopy_s / 1e6 if lone_t.precopy_s else 0.0
        print(f"baseline {label}: lone migration {base.lone_s:.2f} s ({base.lone_rate_mb_per_s:.0f} MB/s)",
              file=sys.stderr)
        batch_cpu_start = self.cpu()
        ids = [self.migrate(cid, destinations[i % len(destinations)]) for i, cid in enumerate(batch_ids)]
        jobs = self.wait_settled(ids)
        # from the batch's start until it is verified, as the evacuation's window is taken
        base.batch_cpu = cpu_use(batch_cpu_start, self.cpu())
        first = min(j.created_at for j in jobs)
        batch_t = [timing(j, first) for j in jobs]
        base.batch_s = max(t.running for t in batch_t)
        base.batch_rate_mb_per_s = batch * self.size / base.batch_s / 1e6
        base.best_rate_mb_per_s = max(base.lone_rate_mb_per_s, base.batch_rate_mb_per_s)
        base.jobs = [asdict(lone_t), *(asdict(t) for t in batch_t)]
        base.cpu = cpu_use(cpu_start, self.cpu())
        print(f"baseline {label}: {batch} at once {base.batch_s:.2f} s ({base.batch_rate_mb_per_s:.0f} MB/s)",
              file=sys.stderr)
        return base

    def evacuate(self) -> tuple[float, migration_pb2.Evacuation]:
        requested = time.time()
        self.api(lambda s: s.EvacuateNode(migration_pb2.EvacuateNodeRequest(
            node=SOURCE, reason=migration_pb2.MANUAL, note="bench_evacuation"), timeout=30))

        def ended() -> migration_pb2.Evacuation | None:
            try:
                ev = self.api(lambda s: s.GetEvacuation(migration_pb2.GetEvacuationRequest(node=SOURCE), timeout=10))
            except grpc.RpcError:
                return None
            terminal = (migration_pb2.EVACUATION_DONE, migration_pb2.EVACUATION_FAILED,
                        migration_pb2.EVACUATION_CANCELLED)
            return ev if ev.state in terminal else None
        ev = wait_for(f"the evacuation of {SOURCE}", ended, DEADLINE_S, interval_s=0.2)
        if ev.state != migration_pb2.EVACUATION_DONE:
            raise ClusterError(f"the evacuation of {SOURCE} ended {migration_pb2.EvacuationState.Name(ev.state)}: "
                               f"{ev.failure}")
        return requested, ev

    def wait_verified(self, job_ids: Sequence[str]) -> dict[str, migration_pb2.Migration]:
        """The jobs once every completed one has its verification verdict."""
        def probe() -> dict[str, migration_pb2.Migration] | None:
            try:
                jobs = {j: self.job(j) for j in job_ids}
            except grpc.RpcError:
                return None
            pending = [j for j in jobs.values() if j.verification == migration_pb2.VERIFICATION_PENDING]
            return None if pending else jobs
        return wait_for("the evacuation's verifications", probe, DEADLINE_S, interval_s=0.2)


def slot_gaps(jobs: Sequence[JobTiming], slots: int) -> list[float]:
    """For each migration started after the first `slots`: how long after the end (COMPLETED) of
    the migration whose slot it took it was created. The k-th start after the first `slots` takes
    the slot freed by the k-th end."""
    starts = sorted(j.created for j in jobs)[slots:]
    ends = sorted(j.running for j in jobs)
    return [start - end for start, end in zip(starts, ends, strict=False)]


def analyse(requested: float, ev: migration_pb2.Evacuation, jobs_by_id: dict[str, migration_pb2.Migration],
            baselines: Sequence[Baseline], cpu: dict[str, float], args: argparse.Namespace) -> dict[str, Any]:
    # the record may say MOVED before its last attempt's outcome is written: ask the jobs
    completed_ids = [a.job_id for c in ev.controllers for a in c.attempts
                     if jobs_by_id[a.job_id].phase == migration_pb2.COMPLETED]
    attempts = sum(len(c.attempts) for c in ev.controllers)
    jobs = sorted((timing(jobs_by_id[j], requested) for j in completed_ids), key=lambda t: t.created)
    size = args.size_mib * MiB
    total = size * len(jobs)
    slots = LIMITS["outbound_per_node"]
    makespan = max(j.running for j in jobs)
    # the strictest bound: the best rate any baseline of this run reached
    best = max(baselines, key=lambda b: b.best_rate_mb_per_s)
    bound = total / (best.best_rate_mb_per_s * 1e6)
    lone_s = min(b.lone_s for b in baselines)
    # Other work on this machine takes CPU from the cluster unevenly: scale the batch rate by the
    # cores the cluster got during the evacuation over those it got during the batch. The
    # migrations are CPU-bound here (Python data plane), so this says what the evacuation would
    # have reached had it been served as the baseline was.
    adjusted = {b.label: b.batch_rate_mb_per_s * cpu["cluster_cores_busy"] / b.batch_cpu["cluster_cores_busy"]
                for b in baselines}
    cpu_s_per_gib = {b.label: b.batch_cpu["cluster_cores_busy"] * b.batch_cpu["seconds"] / (b.batch_size * size / 2**30)
                     for b in baselines}
    busy = sum(j.duration for j in jobs)
    gaps = slot_gaps(jobs, slots)
    mean_duration = busy / len(jobs)
    return {
        "makespan_s": makespan,
        "bound_s": bound,
        "ratio": makespan / bound,
        "bound_from": best.label,
        "best_rate_mb_per_s": best.best_rate_mb_per_s,
        "ratio_by_baseline": {b.label: makespan / (total / (b.best_rate_mb_per_s * 1e6)) for b in baselines},
        "target_ratio": TARGET_RATIO,
        "meets_target": makespan <= TARGET_RATIO * bound,
        "evacuation_done_s": ev.finished_at - requested,  # when the record said DONE
        "first_job_created_s": jobs[0].created,
        "total_bytes": total,
        "achieved_mb_per_s": total / makespan / 1e6,
        "attempts": attempts,
        "mean_job_s": mean_duration,
        "lone_job_s": lone_s,
        "job_slowdown_vs_lone": mean_duration / lone_s,
        # sum of job times over the source's slots: the makespan if no slot were ever idle
        "busy_over_slots_s": busy / slots,
        "verified_last_s": max(j.verified for j in jobs),
        "cpu_adjusted_ratio_by_baseline": {k: makespan / (total / (r * 1e6)) for k, r in adjusted.items()},
        "cluster_cpu_s_per_gib": {"evacuation": cpu["cluster_cores_busy"] * cpu["seconds"] / (total / 2**30),
                                  **{f"batch {k}": v for k, v in cpu_s_per_gib.items()}},
        "cpu": cpu,
        # busy slot-seconds over what `slots` slots offered from the request to the last end
        "slot_utilisation": busy / (slots * makespan),
        "slot_gap_mean_s": sum(gaps) / len(gaps) if gaps else 0.0,
        "slot_gap_max_s": max(gaps, default=0.0),
        "slot_gaps_s": gaps,
        "destinations": {d: sum(1 for j in jobs if j.destination == d) for d in sorted({j.destination for j in jobs})},
        "jobs": [asdict(j) for j in jobs],
    }


def cpu_text(cpu: dict[str, float]) -> str:
    return (f"machine {cpu['machine_cores_busy']:.2f} of {cpu['cores']:.0f} cores busy: this cluster "
            f"{cpu['cluster_cores_busy']:.2f}, others {cpu['other_cores_busy']:.2f}; load {cpu['load_1m_at_end']:.1f}")


def table(result: dict[str, Any]) -> str:
    ev, cfg = result["evacuation"], result["config"]
    rows = [
        ("controllers x size", f"{cfg['controllers']} x {cfg['size_mib']} MiB on {SOURCE}, guest "
                               f"{cfg['write_iops']} write IOPS each, {len(cfg['destinations'])} destinations"),
        ("limits", f"max-parallel {LIMITS['max_parallel']}, outbound/node {LIMITS['outbound_per_node']}, "
                   f"inbound/node {LIMITS['inbound_per_node']}"),
    ]
    for base in result["baselines"]:
        name = f"baseline {base['label']}"
        rows += [
            (f"{name}: lone", f"{base['lone_s']:.2f} s = {base['lone_rate_mb_per_s']:.0f} MB/s "
                              f"(precopy {base['lone_precopy_mb_per_s']:.0f} MB/s)"),
            (f"{name}: {base['batch_size']} at once", f"{base['batch_s']:.2f} s = "
                                                      f"{base['batch_rate_mb_per_s']:.0f} MB/s aggregate"),
            (f"{name}: cpu", cpu_text(base["cpu"])),
            (f"{name}: batch cpu", cpu_text(base["batch_cpu"])),
        ]
    rows += [
        ("best rate (bound's)", f"{ev['best_rate_mb_per_s']:.0f} MB/s (baseline {ev['bound_from']})"),
        ("bound", f"{ev['bound_s']:.2f} s = {ev['total_bytes'] / MiB:.0f} MiB / best rate"),
        ("makespan", f"{ev['makespan_s']:.2f} s (request -> last controller running on its destination)"),
        ("makespan / bound", f"{ev['ratio']:.3f} (target <= {TARGET_RATIO}): "
                             f"{'MET' if ev['meets_target'] else 'MISSED'}; against each baseline: "
                             + ", ".join(f"{k} {v:.2f}" for k, v in ev["ratio_by_baseline"].items())),
        ("cpu-adjusted ratio", ", ".join(f"{k} {v:.2f}" for k, v in ev["cpu_adjusted_ratio_by_baseline"].items())
                               + " (the batch rate scaled by the cluster's CPU share during the evacuation)"),
        ("cluster cpu s / GiB", ", ".join(f"{k} {v:.1f}" for k, v in ev["cluster_cpu_s_per_gib"].items())),
        ("achieved rate", f"{ev['achieved_mb_per_s']:.0f} MB/s"),
        ("evacuation DONE at", f"{ev['evacuation_done_s']:.2f} s"),
        ("first job created", f"{ev['first_job_created_s'] * 1000:.0f} ms after the request"),
        ("mean job time", f"{ev['mean_job_s']:.2f} s ({ev['job_slowdown_vs_lone']:.2f}x the faster lone one)"),
        ("job time / slots", f"{ev['busy_over_slots_s']:.2f} s (the makespan had no slot been idle)"),
        ("slot utilisation", f"{ev['slot_utilisation'] * 100:.1f} % of {LIMITS['outbound_per_node']} "
                             "outbound slots busy"),
        ("end -> next start", f"mean {ev['slot_gap_mean_s'] * 1000:.0f} ms, max {ev['slot_gap_max_s'] * 1000:.0f} ms"),
        ("evacuation cpu", cpu_text(ev["cpu"])),
        ("last verification", f"{ev['verified_last_s']:.2f} s"),
        ("attempts", f"{ev['attempts']} for {cfg['controllers']} controllers; per destination "
                     + ", ".join(f"{d}: {n}" for d, n in ev["destinations"].items())),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def chart(result: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display: render straight to the file
    import matplotlib.pyplot as plt
    from matplotlib.artist import Artist
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    ev = result["evacuation"]
    jobs = ev["jobs"]
    fig, (gantt, level) = plt.subplots(2, 1, figsize=(13, 3 + 0.22 * len(jobs)), sharex=True,
                                       gridspec_kw={"height_ratios": [4, 1]})
    for row, job in enumerate(jobs):
        for phase, start, end in job["phases"]:
            gantt.barh(row, end - start, left=start, height=0.7, color=PHASE_COLOURS.get(phase, "#000000"))
        # after COMPLETED: until the verification verdict (digests on both sides, then the source's release)
        gantt.plot([job["running"], job["verified"]], [row, row], color="black", linewidth=0.6)
        gantt.text(job["running"] + 0.05, row - 0.15, job["destination"], va="bottom", fontsize=6)
    gantt.set_yticks(range(len(jobs)), [j["controller_id"] for j in jobs], fontsize=6)
    gantt.invert_yaxis()
    gantt.axvline(ev["bound_s"], color="black", linestyle="--")
    gantt.axvline(ev["bound_s"] * TARGET_RATIO, color="grey", linestyle=":")
    gantt.axvline(ev["makespan_s"], color="red")
    handles: list[Artist] = [Patch(color=c, label=p) for p, c in PHASE_COLOURS.items()]
    handles += [Line2D([], [], color="black", linewidth=0.6, label="verifying (after COMPLETED)"),
                Line2D([], [], color="black", linestyle="--", label=f"bound {ev['bound_s']:.1f} s"),
                Line2D([], [], color="grey", linestyle=":", label=f"{TARGET_RATIO} x bound"),
                Line2D([], [], color="red", label=f"makespan {ev['makespan_s']:.1f} s")]
    gantt.legend(handles=handles, fontsize=7, loc="lower left", ncol=2)
    gantt.set_title(f"evacuation of {SOURCE}: {len(jobs)} x {result['config']['size_mib']} MiB, "
                    f"makespan / bound = {ev['ratio']:.2f}")
    # migrations in flight from the source over time
    events = sorted([(j["created"], 1) for j in jobs] + [(j["running"], -1) for j in jobs])
    times, levels, current = [0.0], [0], 0
    for t, delta in events:
        current += delta
        times.append(t)
        levels.append(current)
    level.step(times, levels, where="post")
    level.axhline(LIMITS["outbound_per_node"], color="grey", linestyle=":")
    level.set_ylabel("in flight")
    level.set_xlabel("seconds since the evacuation request")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def run(args: argparse.Namespace) -> dict[str, Any]:
    destinations = [f"n{i}" for i in range(2, 2 + args.destinations)]
    ids = [f"c{i:02d}" for i in range(1, args.controllers + 1)]
    # every destination can take the whole lot (the scheduler spreads them anyway)
    capacity = f"{(args.controllers + 4) * args.size_mib * 2}M"
    limit_args = ["--evacuation-max-parallel", str(LIMITS["max_parallel"]),
                  "--evacuation-outbound-per-node", str(LIMITS["outbound_per_node"]),
                  "--evacuation-inbound-per-node", str(LIMITS["inbound_per_node"]),
                  # the dispatcher's own limit must not bind before the evacuation's
                  "--max-concurrent", str(LIMITS["max_parallel"] + 3)]
    with LocalCluster() as cluster:
        cluster.start_etcd()
        cluster.start_orchestrator("orch-1", extra_args=limit_args)
        cluster.start_agents([SOURCE, *destinations], capacity=capacity)
        bench = Bench(cluster, args)
        started = time.monotonic()
        print(f"creating {args.controllers} controllers of {args.size_mib} MiB on {SOURCE}", file=sys.stderr)
        bench.create_controllers(ids)
        print(f"created in {time.monotonic() - started:.1f} s", file=sys.stderr)
        before = bench.baseline("before", destinations)
        print(f"evacuating {SOURCE}", file=sys.stderr)
        cpu_start = bench.cpu()
        requested, ev = bench.evacuate()
        jobs = bench.wait_verified([a.job_id for c in ev.controllers for a in c.attempts])
        cpu = cpu_use(cpu_start, bench.cpu())  # until the last verification, as the baselines' windows
        # once more after it (n1 is cordoned: it takes no migrations, but controllers can still be
        # created on it and moved off), so that a change of the machine's load shows
        after = bench.baseline("after", destinations) if args.baseline_after else None
        baselines = [before, *([after] if after is not None else [])]
        orchestrator_log = cluster.orchestrators[0].log_path.read_text(errors="replace")
    result = {
        "config": {"controllers": args.controllers, "size_mib": args.size_mib, "write_iops": args.write_iops,
                   "destinations": destinations, "limits": LIMITS, "quick": args.quick, "cpus": os.cpu_count()},
        "bound_definition": (
            "bound = controllers * size / best rate, best rate = max(size / T_lone, outbound_per_node * size / "
            "T_batch), where T_lone is the time of one lone migration of a controller of the same size off the "
            "same source (job created -> COMPLETED, i.e. running on its destination) and T_batch the time from "
            "the first creation to the last COMPLETED of outbound_per_node such migrations started together; "
            "both measured in this run on the same loaded source (n1 holding the controllers to evacuate), just "
            "before the evacuation and again just after it; each baseline migration waits for the previous "
            "one's verification. The bound takes the best rate of any baseline (the strictest). makespan = "
            "evacuation request -> last COMPLETED of its jobs."),
        "baselines": [asdict(b) for b in baselines],
        "evacuation": analyse(requested, ev, jobs, baselines, cpu, args),
    }
    result["orchestrator_warnings"] = [line for line in orchestrator_log.splitlines()
                                       if " WARNING " in line or " ERROR " in line][-20:]
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="8 controllers of 32 MiB (unless given)")
    parser.add_argument("--controllers", type=int, default=None, help="controllers on n1 (default 32, quick 8)")
    parser.add_argument("--size-mib", type=int, default=None, help="namespace size (default 256, quick 32)")
    parser.add_argument("--destinations", type=int, default=4, help="agents besides n1 (default 4)")
    parser.add_argument("--write-iops", type=int, default=20, help="each guest's writes per second (0: idle)")
    parser.add_argument("--no-baseline-after", dest="baseline_after", action="store_false",
                        help="measure the baseline only before the evacuation")
    parser.add_argument("--out", type=Path, default=Path("/tmp/nvmigrate-bench/evacuation"), help="output directory")
    args = parser.parse_args(argv)
    args.controllers = args.controllers if args.controllers is not None else (8 if args.quick else 32)
    args.size_mib = args.size_mib if args.size_mib is not None else (32 if args.quick else 256)
    for name in ("controllers", "size_mib", "destinations"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.write_iops < 0:
        parser.error(f"--write-iops must be >= 0, got {args.write_iops}")
    try:
        result = run(args)
    except (ClusterError, grpc.RpcError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    args.out.mkdir(parents=True, exist_ok=True)
    text = table(result)
    print(text)
    (args.out / "bench_evacuation.json").write_text(json.dumps(result, indent=2))
    (args.out / "bench_evacuation.txt").write_text(text + "\n")
    chart(result, args.out / "bench_evacuation.png")
    print(f"json: {args.out / 'bench_evacuation.json'}; chart: {args.out / 'bench_evacuation.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
