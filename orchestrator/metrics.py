"""Prometheus metrics of the orchestrator, served on /metrics by `orchestrator.web`.

Two kinds:
- events counted by the leader that drove them (jobs finished by outcome, phase durations,
  blackout and downtime, bytes moved, dirty rounds, evacuations): counters and histograms of this
  process, fed by `job_written` after every etcd write of a job;
- the state of the cluster, read from etcd at each scrape (jobs by phase, live agents, nodes,
  the progress of each active job, who leads): the same on every replica, so a dashboard takes
  `max` across replicas instead of trusting whichever one leads right now.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from cluster.node_cache import NodeSource
from cluster.records import NodeRecord
from cluster.store import EtcdError, EtcdStore
from orchestrator.evacuation import MOVED, Evacuation, EvacuationState
from orchestrator.jobs import TERMINAL, Job, LiveJob, Phase, Verification, shown

log = logging.getLogger(__name__)

REGISTRY = CollectorRegistry()

JOBS_FINISHED = Counter("nvmigrate_jobs_finished", "Jobs this orchestrator drove to an end, by outcome",
                        ["outcome"], registry=REGISTRY)
PHASE_DURATION = Histogram("nvmigrate_phase_duration_seconds", "Time a job spent in a phase", ["phase"],
                           buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800),
                           registry=REGISTRY)
GUEST_BLACKOUT = Histogram("nvmigrate_guest_blackout_seconds",
                           "Longest gap between guest I/O completions across the switchover, as the guest saw it",
                           buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
                           registry=REGISTRY)
SWITCHOVER_DOWNTIME = Histogram("nvmigrate_switchover_downtime_seconds",
                                "Orchestrator-side switchover time: source suspended to destination running",
                                buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
                                registry=REGISTRY)
SWITCHOVER_OVER_BUDGET = Counter("nvmigrate_switchover_over_budget", "Completed jobs whose measured switchover or "
                                 "guest blackout exceeded their downtime budget", registry=REGISTRY)
SWITCHOVER_FIXED_COST = Gauge("nvmigrate_switchover_fixed_cost_seconds", "The fixed part of a switchover as fitted "
                              "to measured switchovers (what the convergence policy predicts with)", registry=REGISTRY)
SWITCHOVER_OVER_PREDICTION = Histogram("nvmigrate_switchover_over_prediction_seconds",
                                       "How much longer a switchover took than the policy predicted (0 when it "
                                       "took no longer)", buckets=(0, 0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1),
                                       registry=REGISTRY)
BYTES_MOVED = Counter("nvmigrate_bytes_moved", "Migration bytes sent between agents (data and controller state)",
                      registry=REGISTRY)
DIRTY_ROUNDS = Counter("nvmigrate_dirty_rounds", "Dirty-iteration rounds completed", registry=REGISTRY)
VERIFICATIONS = Counter("nvmigrate_verifications", "Completed migrations checked against the source's switchover "
                        "image, by outcome (FAILED is an alarm: the source copy is kept)", ["outcome"],
                        registry=REGISTRY)
JOB_FAILURES = Counter("nvmigrate_job_failures", "Jobs that ended other than COMPLETED, by end phase and cause "
                       "(a small fixed set read off the reason; the job's reason has the full text)",
                       ["phase", "cause"], registry=REGISTRY)
# Causes, first match wins: (cause, words in the job's reason).
_FAILURE_CAUSES = (
    ("cancelled", ("cancelled by operator",)),
    ("source_busy", ("too busy to answer",)),
    ("source_lost", ("source", "lost")),
    ("no_space", ("no space left",)),
    ("etcd_unavailable", ("etcd did not answer",)),
    ("deadline", ("deadline",)),
    ("no_convergence", ("converge",)),
    ("destination_lost", ("destination",)),
)


def failure_cause(reason: str) -> str:
    """A job's end reason, reduced to a label of bounded cardinality."""
    text = reason.lower()
    for cause, words in _FAILURE_CAUSES:
        if all(word in text for word in words):
            return cause
    return "other"


JOBS_DELETED = Counter("nvmigrate_jobs_deleted", "Finished jobs this orchestrator deleted from etcd (past "
                       "--job-retention-s, or beyond --job-retention-count), by outcome", ["outcome"],
                       registry=REGISTRY)

# ---- evacuations (counted by the leader that drove them; see orchestrator/evacuator.py) ----
EVACUATIONS = Counter("nvmigrate_evacuations", "Node evacuations started", registry=REGISTRY)
TRIGGERS_FIRED = Counter("nvmigrate_evacuation_triggers_fired", "Automatic evacuations started because a node's "
                         "drive predicts a failure (the health policy)", registry=REGISTRY)
EVACUATIONS_FINISHED = Counter("nvmigrate_evacuations_finished", "Node evacuations ended, by outcome (DONE, FAILED, "
                               "CANCELLED)", ["outcome"], registry=REGISTRY)
CONTROLLERS_EVACUATED = Counter("nvmigrate_controllers_evacuated", "Controllers moved off a node by an evacuation",
                                registry=REGISTRY)
EVACUATION_MAKESPAN = Histogram("nvmigrate_evacuation_makespan_seconds",
                                "Time from an evacuation's creation to its end (every controller moved, or given up)",
                                buckets=(1, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 7200, 21600),
                                registry=REGISTRY)
ProcessCollector(registry=REGISTRY)

# Every phase shows up in nvmigrate_jobs, at 0 when no job is in it, so panels need no `or vector(0)`.
_ALL_PHASES = tuple(Phase)


def job_progressed(old: Job, new: Job) -> None:
    """Counts the bytes and rounds between two states of a job this process drives (written or not)."""
    moved = new.bytes_transferred - old.bytes_transferred
    if moved > 0:
        BYTES_MOVED.inc(moved)
    if new.rounds > old.rounds:
        DIRTY_ROUNDS.inc(new.rounds - old.rounds)


def job_written(old: Job, new: Job) -> None:
    """Counts what changed between two consecutive states of a job this process wrote: `old` the
    one it held before the write (with any progress not written yet, already counted)."""
    job_progressed(old, new)
    for index in range(max(len(old.phases) - 1, 0), len(new.phases) - 1):
        entry = new.phases[index]
        PHASE_DURATION.labels(entry.phase.value).observe(entry.duration_ms / 1000.0)
    if new.verification is not old.verification and new.verification in (Verification.PASSED, Verification.FAILED):
        VERIFICATIONS.labels(new.verification.value).inc()
    if new.terminal and not old.terminal:
        JOBS_FINISHED.labels(new.phase.value).inc()
        if new.phase is not Phase.COMPLETED:
            JOB_FAILURES.labels(new.phase.value, failure_cause(new.reason)).inc()
        if new.phase is Phase.COMPLETED:
            # 0 means "not measured" (no guest workload; a leader change lost the suspend time).
            if new.guest_blackout_ms > 0:
                GUEST_BLACKOUT.observe(new.guest_blackout_ms / 1000.0)
            if new.downtime_ms > 0:
                SWITCHOVER_DOWNTIME.observe(new.downtime_ms / 1000.0)
                if new.predicted_downtime_ms > 0:
                    SWITCHOVER_OVER_PREDICTION.observe(max(0.0, new.downtime_ms - new.predicted_downtime_ms) / 1000.0)
            if new.downtime_budget_exceeded:
                SWITCHOVER_OVER_BUDGET.inc()


def automatic_evacuation_triggered(node: str) -> None:
    TRIGGERS_FIRED.inc()


def evacuation_written(old: Evacuation, new: Evacuation) -> None:
    """Counts what changed between two consecutive records of an evacuation this process wrote."""
    if old.state is EvacuationState.PLANNED and new.state is not EvacuationState.PLANNED:
        EVACUATIONS.inc()
    before = {m.controller_id: m.result for m in old.moves}
    moved = sum(1 for m in new.moves if m.result == MOVED and before.get(m.controller_id) != MOVED)
    if moved:
        CONTROLLERS_EVACUATED.inc(moved)
    if new.ended and not old.ended:
        EVACUATIONS_FINISHED.labels(new.state.value).inc()
        EVACUATION_MAKESPAN.observe(max(0.0, new.finished_at - new.created_at))


@dataclass
class ClusterSnapshot:
    jobs: list[Job] = field(default_factory=list)
    nodes: list[NodeRecord] = field(default_factory=list)
    leading: bool = False
    etcd_up: bool = False


class ClusterState(Collector):
    """The etcd-derived gauges: `refresh()` (async, before a scrape) reads etcd, `collect()`
    (sync, called by the exposition code) reports the last snapshot."""

    def __init__(self, name: str, live_job: LiveJob | None = None) -> None:
        self.name = name
        self.live_job = live_job  # the leader's jobs with progress not yet written to etcd
        self.snapshot = ClusterSnapshot()
        # Its own registry, so several (in tests, one per server) never clash in REGISTRY.
        self.registry = CollectorRegistry()
        self.registry.register(self)

    def exposition(self) -> bytes:
        """The whole /metrics body: this process's events, then the cluster gauges."""
        return generate_latest(REGISTRY) + generate_latest(self.registry)

    async def refresh(self, store: EtcdStore, node_source: NodeSource | None = None) -> None:
        try:
            jobs = [shown(Job.from_bytes(v.value), v.mod_revision, self.live_job) for v in await store.list_jobs()]
            nodes = await (node_source or store).list_nodes()
            leader = await store.leader()
        except EtcdError as exc:
            log.warning("metrics: etcd unavailable, cluster gauges not refreshed: %s", exc)
            self.snapshot = ClusterSnapshot()
            return
        self.snapshot = ClusterSnapshot(jobs, nodes, leader == self.name, True)

    def describe(self) -> Iterable[Metric]:
        return list(self._families(ClusterSnapshot()))

    def collect(self) -> Iterable[Metric]:
        return list(self._families(self.snapshot))

    def _families(self, snap: ClusterSnapshot) -> Iterator[Metric]:
        up = GaugeMetricFamily("nvmigrate_etcd_up", "1 if the last scrape could read etcd")
        up.add_metric([], 1.0 if snap.etcd_up else 0.0)
        yield up
        leading = GaugeMetricFamily("nvmigrate_is_leader", "1 if this orchestrator holds the leader lease")
        leading.add_metric([], 1.0 if snap.leading else 0.0)
        yield leading

        by_phase = GaugeMetricFamily("nvmigrate_jobs", "Jobs in etcd by current phase (terminal phases are "
                                     "outcomes)", labels=["phase"])
        counts = {phase: 0 for phase in _ALL_PHASES}
        for job in snap.jobs:
            counts[job.phase] += 1
        if snap.etcd_up:
            for phase, count in counts.items():
                by_phase.add_metric([phase.value], float(count))
        yield by_phase

        agents = GaugeMetricFamily("nvmigrate_live_agents", "Agents registered in etcd (their lease is alive)")
        if snap.etcd_up:
            agents.add_metric([], float(len(snap.nodes)))
        yield agents

        capacity = GaugeMetricFamily("nvmigrate_node_capacity_bytes", "Namespace bytes a node may hold",
                                     labels=["node"])
        allocated = GaugeMetricFamily("nvmigrate_node_allocated_bytes", "Namespace bytes allocated on a node",
                                      labels=["node"])
        controllers = GaugeMetricFamily("nvmigrate_node_controllers", "Controllers running on a node (an "
                                        "evacuated node drains to 0)", labels=["node"])
        for node in snap.nodes:
            capacity.add_metric([node.name], float(node.capacity_bytes))
            allocated.add_metric([node.name], float(node.allocated_bytes))
            controllers.add_metric([node.name], float(len(node.controllers)))
        yield from (capacity, allocated, controllers)

        labels = ["job_id", "controller", "phase"]
        sent = GaugeMetricFamily("nvmigrate_job_bytes_transferred", "Bytes an active job has sent so far",
                                 labels=labels)
        size = GaugeMetricFamily("nvmigrate_job_namespace_bytes", "Namespace size of an active job's controller",
                                 labels=labels)
        rate = GaugeMetricFamily("nvmigrate_job_dirty_rate_bytes_per_second",
                                 "Rate at which the guest dirties data, last measured by an active job",
                                 labels=labels)
        throttle = GaugeMetricFamily("nvmigrate_job_throttle_percent", "Guest throttle an active job applies "
                                     "(auto-converge)", labels=labels)
        rounds = GaugeMetricFamily("nvmigrate_job_rounds", "Dirty rounds an active job has run", labels=labels)
        remaining = GaugeMetricFamily("nvmigrate_job_remaining_bytes", "Dirty bytes an active job's source still had "
                                      "to send after its last step, as measured (absent before the first)",
                                      labels=labels)
        for job in snap.jobs:
            if job.phase in TERMINAL:
                continue
            values = [job.id, job.controller_id, job.phase.value]
            sent.add_metric(values, float(job.bytes_transferred))
            size.add_metric(values, float(job.namespace_bytes))
            rate.add_metric(values, job.dirty_rate_bytes_per_s)
            throttle.add_metric(values, float(job.throttle_percent))
            rounds.add_metric(values, float(job.rounds))
            if job.remaining_bytes >= 0:
                remaining.add_metric(values, float(job.remaining_bytes))
        yield from (sent, size, rate, throttle, rounds, remaining)
