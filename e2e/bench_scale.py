"""Benchmark: the control plane at scale. One real orchestrator and one real etcd drive many
SIMULATED agents (e2e/sim_agents.py: fakes for the hosts we do not have, real AgentService, real
etcd registration) through many small migrations at once.

    python -m e2e.bench_scale --agents 1000 --migrations 500 --out /tmp/nvmigrate-bench/scale
    python -m e2e.bench_scale --agents 50 --migrations 20          # a quick run

What runs, in order, on one machine (etcd on tmpfs, every process stopped by pid at the end):
  1. etcd and the orchestrator (--max-concurrent = --migrations, production lease and call
     budgets), idle for --idle-s: the baseline of etcd's and the orchestrator's CPU;
  2. --agents simulated agents, --per-process to a process, registered under 5 s leases; idle again
     for --idle-s: what the agents' lease keepalives (and the leader's reconciler asking agents
     GetInfo, each at least once a minute) cost etcd and the orchestrator;
  3. the controllers, created through MigrationService.CreateController on their source nodes;
  4. --lone jobs one after another (each alone in the cluster): the lone switchover;
  5. --inflight jobs submitted at once: the switchover with that many in flight;
  6. --migrations jobs submitted at once (CreateMigration from --submit-threads threads), waited
     for until every one ended, was verified and its source released its copy.
Controller i lives on node i mod (agents/2) and moves to node agents/2 + i mod (agents/2).

What is measured (the JSON has every sample):
  - transition: the orchestrator's own time between two steps of a job, measured at the simulated
    agents: from the reply of one step call (PrepareDestination, StartPrecopy, DirtyRound,
    StopAndCopy, ResumeDestination) leaving the agent to the next step call of the same job
    arriving at an agent (CLOCK_MONOTONIC, shared by the processes of the machine). It holds what
    the orchestrator does between steps: the phase's etcd writes and reads, the convergence
    decision, the gRPC round trip, and any wait for its event loop. "start" is from the
    CreateMigration reply to the job's PrepareDestination arriving (dispatch, PENDING ->
    PREPARING, destination checks);
  - job end to end: COMPLETED's start minus the job's creation, from the job record;
  - switchover: the job's downtime_ms (the orchestrator's measure, from just before StopAndCopy is
    sent to ResumeDestination's reply: stop-and-copy, the COMMIT transaction, RESUMING, the
    destination's claim in etcd); no guest runs, so there is no guest blackout to report;
  - etcd writes per job: the etcd revision's growth over the batch (one revision per write
    transaction) divided by the jobs, and a watch on the cluster's prefix that sorts each
    revision by the keys it touched (job record, active marker, controller ownership, node record);
  - CPU seconds (/proc/PID/stat) of etcd, the orchestrator and the simulated agents in each window,
    peak RSS (VmHWM) of the orchestrator and etcd, etcd's own counters (/metrics) per window.
With --profile, py-spy samples the orchestrator during the batch (raw folded stacks in --out).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import itertools
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import grpc

from orchctl.localcluster import LocalCluster, Proc, wait_for
from proto.v1 import migration_pb2, migration_pb2_grpc

MiB = 1 << 20
TICKS = os.sysconf("SC_CLK_TCK")
TERMINAL = {migration_pb2.COMPLETED, migration_pb2.ROLLED_BACK, migration_pb2.FAILED, migration_pb2.CANCELLED}
STEPS = ("PrepareDestination", "StartPrecopy", "DirtyRound", "StopAndCopy", "ResumeDestination")
TARGET_TRANSITION_P99_MS = 250.0
# The API answers UNAVAILABLE when etcd did not answer it in time (a loaded machine): asked again.
RETRIED = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}
RETRIES = 5
CREATE_THREADS = 16
TARGET_WRITES_PER_JOB = 12.0
TARGET_SWITCHOVER_RATIO = 2.0
# etcd counters read per window: name -> label filter (substring) or "" for the sum of all series
ETCD_COUNTERS = {
    "etcd_mvcc_put_total": "", "etcd_mvcc_delete_total": "", "etcd_mvcc_txn_total": "",
    "etcd_mvcc_range_total": "", "etcd_server_proposals_committed_total": "",
    "etcd_disk_wal_fsync_duration_seconds_count": "",
    "grpc_server_msg_received_total": 'grpc_method="LeaseKeepAlive"',
    "grpc_server_started_total": 'grpc_method="LeaseKeepAlive"',
}


# ---- process figures ------------------------------------------------------------------------------

def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process and its threads so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


def etcd_counters(endpoint: str) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://{endpoint}/metrics", timeout=10).read().decode()
    totals: dict[str, float] = dict.fromkeys(ETCD_COUNTERS, 0.0)
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        name = line.split("{", 1)[0].split(" ", 1)[0]
        wanted = ETCD_COUNTERS.get(name)
        if wanted is None or (wanted and wanted not in line):
            continue
        totals[name] += float(line.rsplit(" ", 1)[1])
    return totals


def etcd_revision(endpoint: str) -> int:
    done = subprocess.run(["etcdctl", f"--endpoints={endpoint}", "get", "/nvmigrate-bench-none", "-w", "json"],
                          capture_output=True, text=True, timeout=30, check=True, env={"ETCDCTL_API": "3"})
    return int(json.loads(done.stdout)["header"]["revision"])


@dataclass
class Window:
    """CPU and etcd counters of the watched processes over one stretch of the run."""

    name: str
    wall_s: float = 0.0
    cpu_s: dict[str, float] = field(default_factory=dict)
    etcd: dict[str, float] = field(default_factory=dict)

    def cpu_percent(self, who: str) -> float:
        return 100.0 * self.cpu_s.get(who, 0.0) / self.wall_s if self.wall_s else float("nan")


class Meter:
    def __init__(self, endpoint: str, pids: Callable[[], dict[str, list[int]]]) -> None:
        self.endpoint = endpoint
        self.pids = pids

    def snapshot(self) -> tuple[float, dict[str, float], dict[str, float]]:
        cpu = {who: sum(cpu_s(p) for p in pids) for who, pids in self.pids().items()}
        return time.monotonic(), cpu, etcd_counters(self.endpoint)

    def window(self, name: str, start: tuple[float, dict[str, float], dict[str, float]]) -> Window:
        t1, cpu1, etcd1 = self.snapshot()
        t0, cpu0, etcd0 = start
        return Window(name, t1 - t0, {who: cpu1[who] - cpu0.get(who, 0.0) for who in cpu1},
                      {k: etcd1[k] - etcd0.get(k, 0.0) for k in etcd1})


# ---- statistics -----------------------------------------------------------------------------------

def pct(values: Sequence[float], q: float) -> float:
    """The q-th percentile (nearest rank); nan for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100.0 * len(ordered)) - 1))]


def summary(values: Sequence[float]) -> dict[str, float]:
    return {"n": len(values), "p50": pct(values, 50), "p99": pct(values, 99),
            "max": max(values) if values else float("nan"),
            "mean": statistics.fmean(values) if values else float("nan")}


# ---- the cluster ----------------------------------------------------------------------------------

def node_name(i: int) -> str:
    return f"sim-{i:04d}"


def placement(i: int, agents: int) -> tuple[str, str]:
    half = agents // 2
    return node_name(i % half), node_name(half + i % half)


@dataclass
class Submitted:
    job_id: str
    controller_id: str
    submit_start: float  # monotonic, before CreateMigration was sent
    submit_end: float  # monotonic, its reply


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.out: Path = args.out
        self.cluster = LocalCluster(lease_ttl_s=5, agent_call_budget_s=15.0)
        self.sims: list[Proc] = []
        self.events_files: list[Path] = []
        self.watch: subprocess.Popen[bytes] | None = None
        self.profiler: subprocess.Popen[bytes] | None = None
        self._local = threading.local()
        self.retries: Counter[str] = Counter()  # API calls asked again after UNAVAILABLE

    # -- processes

    def start_core(self) -> None:
        c = self.cluster
        c.start_etcd()
        c.start_orchestrator(extra_args=["--max-concurrent", str(max(self.args.migrations, self.args.inflight)),
                                         "--log-level", "WARNING"])
        self.orch_pid = c.orchestrators[0].popen.pid
        self.etcd_pid = c.etcd_process.popen.pid

    def start_watch(self) -> None:
        self.watch_path = self.out / "etcd-watch.jsonl"
        with open(self.watch_path, "wb") as sink:
            self.watch = subprocess.Popen(["etcdctl", f"--endpoints={self.cluster.etcd_endpoint}", "watch",
                                           "--prefix", self.cluster.etcd_prefix, "-w", "json"],
                                          stdout=sink, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
                                          env={"ETCDCTL_API": "3"}, start_new_session=True)

    def start_sims(self) -> None:
        a = self.args
        for first in range(0, a.agents, a.per_process):
            count = min(a.per_process, a.agents - first)
            events = self.out / f"sim-events-{first:04d}.jsonl"
            self.events_files.append(events)
            argv = [sys.executable, "-m", "e2e.sim_agents", "--etcd", self.cluster.etcd_endpoint,
                    "--etcd-prefix", self.cluster.etcd_prefix, "--first", str(first), "--count", str(count),
                    "--lease-ttl-s", "5", "--precopy-delay-ms", str(a.precopy_delay_ms),
                    "--dirty-bytes", str(a.dirty_bytes), "--events", str(events)]
            self.sims.append(self.cluster._spawn(f"sim-agents-{first:04d}", argv))

    def stop(self) -> None:
        for proc in (self.profiler, self.watch):
            if proc is not None and proc.poll() is None:
                os.kill(proc.pid, signal.SIGINT)
                try:
                    proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    os.kill(proc.pid, signal.SIGKILL)
                    proc.wait()
        self.cluster.cleanup()

    def pids(self) -> dict[str, list[int]]:
        return {"etcd": [self.etcd_pid], "orchestrator": [self.orch_pid],
                "sim agents": [p.popen.pid for p in self.sims if p.popen.poll() is None]}

    # -- API

    def stub(self) -> migration_pb2_grpc.MigrationServiceStub:
        stub = getattr(self._local, "stub", None)
        if stub is None:
            channel = grpc.insecure_channel(self.cluster.orchestrator_address)
            stub = self._local.stub = migration_pb2_grpc.MigrationServiceStub(channel)
        return stub

    def live_nodes(self) -> int:
        try:
            nodes = self.stub().ListNodes(migration_pb2.ListNodesRequest(), timeout=30).nodes
        except grpc.RpcError:
            return 0
        return sum(1 for n in nodes if n.live)

    def create_controllers(self, count: int) -> None:
        def create(i: int) -> None:
            source, _ = placement(i, self.args.agents)
            request = migration_pb2.NewControllerRequest(controller_id=f"c{i:04d}",
                                                         namespace_bytes=self.args.namespace_mib * MiB, node=source)
            for attempt in range(RETRIES):
                try:
                    self.stub().CreateController(request, timeout=60)
                    return
                except grpc.RpcError as exc:
                    if exc.code() == grpc.StatusCode.ALREADY_EXISTS and f"on node '{source}'" in (exc.details() or ""):
                        return  # an attempt that timed out (ours, or the API's own retry) landed
                    # NOT_FOUND: the node's lease expired under load; it registers again within a TTL
                    if exc.code() not in {*RETRIED, grpc.StatusCode.NOT_FOUND} or attempt == RETRIES - 1:
                        raise
                    self.retries[f"CreateController {exc.code().name}"] += 1
                    time.sleep(1.0)  # back off: the node's next keepalive registers it again
        with ThreadPoolExecutor(min(self.args.submit_threads, CREATE_THREADS)) as pool:
            list(pool.map(create, range(count)))

    def submit(self, indices: Iterable[int]) -> list[Submitted]:
        def one(i: int) -> Submitted:
            _, dest = placement(i, self.args.agents)
            cid = f"c{i:04d}"
            started = time.monotonic()
            for attempt in range(RETRIES):
                try:
                    job = self.stub().CreateMigration(migration_pb2.CreateMigrationRequest(
                        controller_id=cid, destination_node=dest), timeout=120)
                    return Submitted(job.id, cid, started, time.monotonic())
                except grpc.RpcError as exc:
                    if attempt and exc.code() == grpc.StatusCode.FAILED_PRECONDITION:
                        # an earlier attempt that timed out landed: that is the job
                        active = self.stub().ListMigrations(migration_pb2.ListMigrationsRequest(
                            controller_id=cid), timeout=60).migrations
                        if active:
                            return Submitted(max(active, key=lambda m: m.created_at).id, cid, started,
                                             time.monotonic())
                    if exc.code() not in RETRIED or attempt == RETRIES - 1:
                        raise
                    self.retries[f"CreateMigration {exc.code().name}"] += 1
            raise AssertionError("unreachable")
        with ThreadPoolExecutor(self.args.submit_threads) as pool:
            return list(pool.map(one, indices))

    def jobs(self, ids: set[str]) -> dict[str, migration_pb2.Migration]:
        listed = self.stub().ListMigrations(migration_pb2.ListMigrationsRequest(), timeout=60).migrations
        return {m.id: m for m in listed if m.id in ids}

    def settle(self, batch: list[Submitted], timeout_s: float) -> dict[str, migration_pb2.Migration]:
        """Waits until every job ended, each COMPLETED one was verified and its source let its copy go."""
        ids = {s.job_id for s in batch}
        moved = {s.controller_id: placement(int(s.controller_id[1:]), self.args.agents)[0] for s in batch}

        def settled() -> dict[str, migration_pb2.Migration] | None:
            jobs = self.jobs(ids)
            if len(jobs) < len(ids) or any(j.phase not in TERMINAL for j in jobs.values()):
                return None
            if any(j.phase == migration_pb2.COMPLETED and j.verification == migration_pb2.VERIFICATION_PENDING
                   for j in jobs.values()):
                return None
            nodes = {n.name: set(n.controllers) for n in
                     self.stub().ListNodes(migration_pb2.ListNodesRequest(), timeout=60).nodes}
            completed = {j.controller_id for j in jobs.values() if j.phase == migration_pb2.COMPLETED}
            if any(cid in nodes.get(moved[cid], set()) for cid in completed):
                return None
            return jobs
        return wait_for(f"{len(ids)} jobs to end, be verified and release their sources", settled, timeout_s,
                        interval_s=1.0, alive=self._dead)

    def _dead(self) -> str | None:
        for proc in [*self.cluster.procs]:
            if (gone := proc.exited()) is not None:
                return gone
        return None

    def profile_start(self) -> None:
        spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        self.profile_path = self.out / "orchestrator-profile.txt"
        self.profiler = subprocess.Popen([spy, "record", "--pid", str(self.orch_pid), "--format", "raw",
                                          "--rate", "50", "-o", str(self.profile_path)],
                                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                         start_new_session=True)

    def profile_stop(self) -> None:
        if self.profiler is not None and self.profiler.poll() is None:
            os.kill(self.profiler.pid, signal.SIGINT)
            self.profiler.wait(timeout=120)


# ---- analysis -------------------------------------------------------------------------------------

def load_events(paths: Iterable[Path]) -> dict[str, list[dict[str, Any]]]:
    by_job: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for path in paths:
        if not path.exists():
            continue
        for line in path.read_text().splitlines():
            event = json.loads(line)
            by_job[event["job"]].append(event)
    for calls in by_job.values():
        calls.sort(key=lambda e: e["t_in"])
    return by_job


def transitions(batch: list[Submitted], events: dict[str, list[dict[str, Any]]]) -> dict[str, list[float]]:
    """Per transition kind, the orchestrator's time (ms) between one step's reply and the next
    step's arrival; 'start': CreateMigration's reply to PrepareDestination's arrival."""
    gaps: dict[str, list[float]] = defaultdict(list)
    for sub in batch:
        calls = [e for e in events.get(sub.job_id, []) if e["call"] in STEPS]
        if not calls:
            continue
        gaps["start"].append((calls[0]["t_in"] - sub.submit_end) * 1000.0)
        for before, after in itertools.pairwise(calls):
            gaps[f"{before['call']} -> {after['call']}"].append((after["t_in"] - before["t_out"]) * 1000.0)
    return gaps


def all_steps(gaps: dict[str, list[float]]) -> list[float]:
    return [g for kind, values in gaps.items() if kind != "start" for g in values]


def job_figures(jobs: dict[str, migration_pb2.Migration]) -> dict[str, Any]:
    e2e: list[float] = []
    switchover: list[float] = []
    phases: Counter[str] = Counter()
    for job in jobs.values():
        phases[migration_pb2.Phase.Name(job.phase)] += 1
        if job.phase != migration_pb2.COMPLETED:
            continue
        completed = next(p for p in job.phases if p.phase == migration_pb2.COMPLETED)
        e2e.append((completed.started_at - job.created_at) * 1000.0)
        switchover.append(job.downtime_ms)
    return {"phases": dict(phases), "end_to_end_ms": e2e, "switchover_ms": switchover,
            "failures": sorted({j.reason for j in jobs.values() if j.phase != migration_pb2.COMPLETED})[:10]}


KEY_KINDS = ("jobs/", "active/", "controllers/", "nodes/")


def revision_kinds(watch_path: Path, prefix: str, first: int, last: int) -> Counter[str]:
    """Revisions in (first, last] sorted by the kinds of keys each wrote: 'jobs/+active/' etc."""
    touched: dict[int, set[str]] = defaultdict(set)
    for line in watch_path.read_text().splitlines():
        with contextlib.suppress(ValueError):
            reply = json.loads(line)
            for event in reply.get("Events") or []:
                kv = event["kv"]
                revision = int(kv.get("mod_revision", 0))
                if not first < revision <= last:
                    continue
                key = base64.b64decode(kv["key"]).decode()[len(prefix):]
                kind = next((k for k in KEY_KINDS if key.startswith(k)), "other")
                touched[revision].add(kind + ("delete" if event.get("type") == 1 else ""))
    return Counter("+".join(sorted(kinds)) for kinds in touched.values())


# ---- report -----------------------------------------------------------------------------------------

def fmt(v: float) -> str:
    return "-" if v != v else f"{v:.1f}"


def render(result: dict[str, Any]) -> str:
    lines = [f"control plane at scale: {result['agents']} simulated agents, {result['migrations']} migrations at "
             f"once on one orchestrator (+{result['lone']} lone, +{result['inflight']} at once)", ""]
    lines.append(f"{'transition (ms, batch of ' + str(result['migrations']) + ')':44} {'n':>6} {'p50':>8} "
                 f"{'p99':>8} {'max':>8}")
    for kind, s in result["transitions"].items():
        lines.append(f"{kind:44} {s['n']:6d} {fmt(s['p50']):>8} {fmt(s['p99']):>8} {fmt(s['max']):>8}")
    lines.append("")
    lines.append(f"{'job figures (ms)':44} {'n':>6} {'p50':>8} {'p99':>8} {'max':>8}")
    for name in ("lone", "inflight", "batch"):
        for figure in ("end_to_end_ms", "switchover_ms"):
            s = result["jobs"][name][figure]
            lines.append(f"{name + ' ' + figure:44} {s['n']:6d} {fmt(s['p50']):>8} {fmt(s['p99']):>8} "
                         f"{fmt(s['max']):>8}")
    for name in ("lone", "inflight", "batch"):
        lines.append(f"{name} outcomes: {result['jobs'][name]['phases']}"
                     + (f"  reasons: {result['jobs'][name]['failures']}" if result['jobs'][name]['failures'] else ""))
    lines.append("")
    w = result["writes"]
    lines.append(f"etcd writes per job (batch): {w['revisions_per_job']:.2f} revisions "
                 f"({w['revisions']} over {w['jobs']} jobs); by keys written, per job:")
    for kind, n in sorted(w["by_keys"].items(), key=lambda kv: -kv[1]):
        lines.append(f"    {kind:40} {n / max(w['jobs'], 1):6.2f}")
    lines.append("")
    lines.append(f"{'window':28} {'wall s':>7} {'etcd CPU%':>10} {'orch CPU%':>10} {'sims CPU%':>10} "
                 f"{'keepalives/s':>13} {'ranges/s':>9} {'txns/s':>8}")
    for win in result["windows"]:
        wall = win["wall_s"]
        lines.append(f"{win['name']:28} {wall:7.1f} {win['cpu_percent']['etcd']:10.1f} "
                     f"{win['cpu_percent']['orchestrator']:10.1f} {win['cpu_percent'].get('sim agents', 0.0):10.1f} "
                     f"{win['etcd']['grpc_server_msg_received_total'] / wall:13.1f} "
                     f"{win['etcd']['etcd_mvcc_range_total'] / wall:9.1f} "
                     f"{win['etcd']['etcd_mvcc_txn_total'] / wall:8.1f}")
    lines.append(f"API calls asked again after UNAVAILABLE: {result['api_retries'] or 'none'}; the batch was "
                 f"submitted in {result['submit_s']:.1f} s")
    lines.append(f"orchestrator: {result['orchestrator']['batch_cpu_s']:.1f} CPU s over the batch, "
                 f"{result['orchestrator']['batch_cpu_s_per_job'] * 1000:.1f} CPU ms per job, peak RSS "
                 f"{result['orchestrator']['peak_rss_mib']:.0f} MiB; etcd peak RSS "
                 f"{result['etcd_peak_rss_mib']:.0f} MiB")
    lines.append("")
    t = result["targets"]
    lines.append(f"targets: p99 transition {fmt(t['transition_p99_ms'])} ms (<= {TARGET_TRANSITION_P99_MS:.0f}): "
                 f"{'met' if t['transition_met'] else 'MISSED'}; writes/job {t['writes_per_job']:.2f} "
                 f"(<= {TARGET_WRITES_PER_JOB:.0f}): {'met' if t['writes_met'] else 'MISSED'}; switchover p99 with "
                 f"{result['inflight']} in flight / lone p99 = {fmt(t['switchover_ratio'])} (<= "
                 f"{TARGET_SWITCHOVER_RATIO:.0f}): {'met' if t['switchover_met'] else 'MISSED'}")
    return "\n".join(lines)


def plot(result: dict[str, Any], gaps: dict[str, list[float]], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    ax = axes[0][0]
    for kind, values in sorted(gaps.items()):
        ordered = sorted(values)
        ax.plot(ordered, [(i + 1) / len(ordered) for i in range(len(ordered))], label=kind)
    ax.axvline(TARGET_TRANSITION_P99_MS, color="grey", linestyle=":", label="target p99")
    ax.set_xscale("log")
    ax.set_xlabel("ms (log)")
    ax.set_ylabel("fraction of transitions")
    ax.set_title(f"orchestrator time between steps, {result['migrations']} at once")
    ax.legend(fontsize=7)
    ax = axes[0][1]
    for name in ("lone", "inflight", "batch"):
        ordered = sorted(result["samples"][name]["end_to_end_ms"])
        if ordered:
            ax.plot(ordered, [(i + 1) / len(ordered) for i in range(len(ordered))], label=name)
    ax.set_xlabel("ms")
    ax.set_title("job end to end")
    ax.legend()
    ax = axes[1][0]
    names = ["lone", "inflight", "batch"]
    p50 = [result["jobs"][n]["switchover_ms"]["p50"] for n in names]
    p99 = [result["jobs"][n]["switchover_ms"]["p99"] for n in names]
    xs = range(len(names))
    ax.bar([x - 0.2 for x in xs], p50, width=0.4, label="p50")
    ax.bar([x + 0.2 for x in xs], p99, width=0.4, label="p99")
    ax.set_xticks(list(xs), ["lone", f"{result['inflight']} at once", f"{result['migrations']} at once"])
    ax.set_ylabel("switchover ms")
    ax.set_title("switchover (downtime_ms)")
    ax.legend()
    ax = axes[1][1]
    windows = result["windows"]
    for i, who in enumerate(("etcd", "orchestrator", "sim agents")):
        ax.bar([j + (i - 1) * 0.27 for j in range(len(windows))], [w["cpu_percent"].get(who, 0.0) for w in windows],
               width=0.27, label=who)
    ax.set_xticks(range(len(windows)), [w["name"] for w in windows], fontsize=7)
    ax.set_ylabel("CPU % (100 = one core)")
    ax.set_title("CPU by window")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


# ---- main -------------------------------------------------------------------------------------------

def run(args: argparse.Namespace) -> dict[str, Any]:
    bench = Bench(args)
    try:
        return _run(bench, args)
    finally:
        bench.stop()


def _said(window: Window) -> Window:
    """Printed as soon as measured: a run that fails later still shows it."""
    cpu = {k: round(v, 2) for k, v in window.cpu_s.items()}
    print(f"  window {window.name!r}: {window.wall_s:.1f} s, CPU s {cpu}, "
          f"LeaseKeepAlive msgs {window.etcd['grpc_server_msg_received_total']:.0f}, ranges "
          f"{window.etcd['etcd_mvcc_range_total']:.0f}, txns {window.etcd['etcd_mvcc_txn_total']:.0f}", flush=True)
    return window


def _run(bench: Bench, args: argparse.Namespace) -> dict[str, Any]:
    windows: list[Window] = []
    bench.start_core()
    meter = Meter(bench.cluster.etcd_endpoint, bench.pids)
    bench.start_watch()
    start = meter.snapshot()
    time.sleep(args.idle_s)  # the idle window being measured, not a wait for a condition
    windows.append(_said(meter.window("idle, no agents", start)))
    print(f"starting {args.agents} simulated agents ...", flush=True)
    started = time.monotonic()
    bench.start_sims()
    wait_for(f"{args.agents} simulated agents to register", lambda: bench.live_nodes() >= args.agents,
             args.timeout_s, interval_s=1.0, alive=bench._dead)
    print(f"  registered in {time.monotonic() - started:.1f} s", flush=True)
    start = meter.snapshot()
    time.sleep(args.idle_s)  # the idle window being measured
    windows.append(_said(meter.window(f"idle, {args.agents} agents", start)))
    total = args.lone + args.inflight + args.migrations
    print(f"creating {total} controllers ...", flush=True)
    bench.create_controllers(total)
    lone: list[Submitted] = []
    lone_jobs: dict[str, migration_pb2.Migration] = {}
    for i in range(args.lone):
        batch = bench.submit([i])
        lone += batch
        lone_jobs.update(bench.settle(batch, args.timeout_s))
    print(f"{args.inflight} at once ...", flush=True)
    inflight = bench.submit(range(args.lone, args.lone + args.inflight))
    inflight_jobs = bench.settle(inflight, args.timeout_s)
    print(f"{args.migrations} at once ...", flush=True)
    if args.profile:
        bench.profile_start()
    first_rev = etcd_revision(bench.cluster.etcd_endpoint)
    rss_before = peak_rss_mib(bench.orch_pid)
    start = meter.snapshot()
    batch = bench.submit(range(args.lone + args.inflight, total))
    submitted_in = time.monotonic() - start[0]
    batch_jobs = bench.settle(batch, args.timeout_s)
    windows.append(_said(meter.window(f"{args.migrations} migrations", start)))
    last_rev = etcd_revision(bench.cluster.etcd_endpoint)
    bench.profile_stop()
    orch_peak = peak_rss_mib(bench.orch_pid)
    etcd_peak = peak_rss_mib(bench.etcd_pid)
    print(f"  submitted in {submitted_in:.1f} s, settled in {windows[-1].wall_s:.1f} s", flush=True)
    bench.stop()  # the simulated agents write their call records as they stop
    events = load_events(bench.events_files)
    gaps = transitions(batch, events)
    by_keys = revision_kinds(bench.watch_path, bench.cluster.etcd_prefix, first_rev, last_rev)
    figures = {"lone": job_figures(lone_jobs), "inflight": job_figures(inflight_jobs), "batch": job_figures(batch_jobs)}
    steps = all_steps(gaps)
    revisions = last_rev - first_rev
    batch_window = windows[-1]
    result: dict[str, Any] = {
        "agents": args.agents, "migrations": args.migrations, "lone": args.lone, "inflight": args.inflight,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "transitions": {"all steps": summary(steps), **{k: summary(v) for k, v in sorted(gaps.items())}},
        "jobs": {name: {"phases": f["phases"], "failures": f["failures"],
                        "end_to_end_ms": summary(f["end_to_end_ms"]), "switchover_ms": summary(f["switchover_ms"])}
                 for name, f in figures.items()},
        "samples": {name: {"end_to_end_ms": f["end_to_end_ms"], "switchover_ms": f["switchover_ms"]}
                    for name, f in figures.items()},
        "transition_samples": gaps,
        "writes": {"revisions": revisions, "jobs": len(batch), "revisions_per_job": revisions / max(len(batch), 1),
                   "by_keys": dict(by_keys)},
        "windows": [{"name": w.name, "wall_s": w.wall_s, "cpu_s": w.cpu_s,
                     "cpu_percent": {who: w.cpu_percent(who) for who in w.cpu_s}, "etcd": w.etcd} for w in windows],
        "orchestrator": {"batch_cpu_s": batch_window.cpu_s["orchestrator"],
                         "batch_cpu_s_per_job": batch_window.cpu_s["orchestrator"] / max(len(batch), 1),
                         "peak_rss_mib": orch_peak, "peak_rss_mib_before_batch": rss_before},
        "etcd_peak_rss_mib": etcd_peak,
        "submit_s": submitted_in,
        "api_retries": dict(bench.retries),
    }
    lone_p99 = result["jobs"]["lone"]["switchover_ms"]["p99"]
    inflight_p99 = result["jobs"]["inflight"]["switchover_ms"]["p99"]
    ratio = inflight_p99 / lone_p99 if lone_p99 and lone_p99 == lone_p99 else float("nan")
    result["targets"] = {
        "transition_p99_ms": result["transitions"]["all steps"]["p99"],
        "transition_met": result["transitions"]["all steps"]["p99"] <= TARGET_TRANSITION_P99_MS,
        "writes_per_job": result["writes"]["revisions_per_job"],
        "writes_met": result["writes"]["revisions_per_job"] <= TARGET_WRITES_PER_JOB,
        "switchover_ratio": ratio, "switchover_met": ratio <= TARGET_SWITCHOVER_RATIO,
    }
    (args.out / "bench_scale.json").write_text(json.dumps(result, indent=1))
    plot(result, gaps, args.out / "bench_scale.png")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m e2e.bench_scale", description=__doc__.splitlines()[0])
    parser.add_argument("--agents", type=int, default=1000, help="simulated agents (at least 2)")
    parser.add_argument("--migrations", type=int, default=500, help="migrations submitted at once")
    parser.add_argument("--inflight", type=int, default=40, help="the smaller batch whose switchover is compared "
                                                                 "with a lone job's")
    parser.add_argument("--lone", type=int, default=20,
                        help="jobs run one at a time first: the baseline the in-flight switchover is compared with "
                             "(its p99 of 5 was their maximum, and one slow job moved the ratio 3x)")
    parser.add_argument("--per-process", type=int, default=250, help="simulated agents per process")
    parser.add_argument("--namespace-mib", type=int, default=64)
    parser.add_argument("--precopy-delay-ms", type=float, default=50.0, help="how long a simulated precopy takes")
    parser.add_argument("--dirty-bytes", type=int, default=1 << 20, help="left changed by precopy: one dirty round")
    parser.add_argument("--idle-s", type=float, default=10.0, help="length of each idle window measured")
    parser.add_argument("--submit-threads", type=int, default=64)
    parser.add_argument("--timeout-s", type=float, default=900.0, help="for each wait")
    parser.add_argument("--profile", action="store_true", help="py-spy samples the orchestrator during the batch")
    parser.add_argument("--out", type=Path, default=Path("/tmp/nvmigrate-bench/scale"))
    args = parser.parse_args(argv)
    if args.agents < 2:
        parser.error(f"--agents must be at least 2, got {args.agents}")
    for flag in ("migrations", "inflight", "per_process", "namespace_mib", "submit_threads"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    for flag in ("lone", "precopy_delay_ms", "dirty_bytes", "idle_s"):
        if getattr(args, flag) < 0:
            parser.error(f"--{flag.replace('_', '-')} must be 0 or more, got {getattr(args, flag)}")
    if args.timeout_s <= 0:
        parser.error(f"--timeout-s must be greater than 0, got {args.timeout_s}")
    if shutil.which("etcdctl") is None:
        parser.error("etcdctl is not installed (apt-get install etcd-client)")
    args.out.mkdir(parents=True, exist_ok=True)
    result = run(args)
    print(render(result))
    print(f"\nwrote {args.out / 'bench_scale.json'} and {args.out / 'bench_scale.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
