"""Observability of real runs: the trace a migration exports over OTLP (also across a leader
failover), the metrics scraped from /metrics, the Grafana dashboards' queries, `orchctl trace`,
and the orchestrator's web page in headless Chromium.

Real processes throughout: etcd, orchestrators and agents export to an OTLP/gRPC collector the
test runs (tests/otlp_collector.py); waits are on conditions with deadlines.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from orchctl.localcluster import LocalCluster, Proc, wait_for
from orchestrator import metrics
from proto.v1 import agent_pb2, migration_pb2
from tests.clusterprobe import TERMINAL, create_controller, migrate, replace_orchestrator, wait_phase, wait_verified
from tests.otlp_collector import OtlpCollector, ReceivedSpan

MiB = 1 << 20
ROOT = Path(__file__).resolve().parent.parent
DASHBOARDS = ROOT / "charts" / "nvmigrate" / "dashboards"
ARTIFACTS = ROOT / "artifacts"
PHASES = ["PENDING", "PREPARING", "PRECOPY", "DIRTY_ITERATION", "STOP_AND_COPY", "COMMIT", "RESUMING"]
SPAN_KIND_SERVER, SPAN_KIND_CLIENT = 2, 3  # OTLP's SpanKind numbers
STATUS_ERROR = 2


def tracing_env(collector: OtlpCollector) -> dict[str, str]:
    # A short batch delay so spans arrive while the test waits, not only at process exit.
    return {"OTEL_EXPORTER_OTLP_ENDPOINT": collector.endpoint, "OTEL_BSP_SCHEDULE_DELAY": "100"}


def of_trace(spans: list[ReceivedSpan], trace_id: str) -> list[ReceivedSpan]:
    return [s for s in spans if s.trace_id == trace_id]


def client_span_ids(spans: list[ReceivedSpan]) -> set[str]:
    """The orchestrator's CLIENT spans of agent calls."""
    return {s.span_id for s in spans if s.kind == SPAN_KIND_CLIENT and s.service == "nvmigrate-orchestrator"}


def linked_ids(spans: list[ReceivedSpan]) -> set[str]:
    return {link for s in spans for link in s.links}


def missing_parents(spans: list[ReceivedSpan]) -> list[str]:
    """Spans of one trace whose parent never arrived: 'NAME (SERVICE INSTANCE)'."""
    ids = {s.span_id for s in spans}
    return [f"{s.name} ({s.service} {s.instance})" for s in spans if s.parent_span_id and s.parent_span_id not in ids]


def has_root(trace_id: str) -> Callable[[list[ReceivedSpan]], bool]:
    return lambda spans: any(s.name == "migration" and s.parent_span_id == "" for s in of_trace(spans, trace_id))


def scrape(proc: Proc) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of /metrics, keyed by (sample name, sorted labels)."""
    with urllib.request.urlopen(f"http://{proc.http_address}/metrics", timeout=10) as reply:
        assert reply.headers["Content-Type"].startswith("text/plain")
        text = reply.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


@dataclass
class TracedRun:
    cluster: LocalCluster
    collector: OtlpCollector
    job: migration_pb2.Migration
    during: dict[tuple[str, tuple[tuple[str, str], ...]], float]  # a scrape while the job was in PRECOPY


@pytest.fixture(scope="module")
def traced_run() -> Iterator[TracedRun]:
    """One cluster exporting traces, with exactly one migration run to the end (16 MiB at 8 MiB/s,
    so a scrape can land in PRECOPY)."""
    collector = OtlpCollector().start()
    try:
        with LocalCluster(env=tracing_env(collector)) as cluster:
            cluster.start_etcd()
            cluster.start_orchestrator(extra_args=["--log-format", "json"])
            cluster.start_agents(["n1", "n2"])
            create_controller(cluster, "n1", "c1", 16 * MiB, write_iops=400)
            job = migrate(cluster, "c1", to="n2", bandwidth_bytes_per_s=8 * MiB)
            wait_phase(cluster, job.id, {migration_pb2.PRECOPY}, also=lambda j: j.bytes_transferred > 0)
            during = scrape(cluster.orchestrators[0])
            job = wait_phase(cluster, job.id, TERMINAL)
            assert migration_pb2.Phase.Name(job.phase) == "COMPLETED", job.reason
            job = wait_verified(cluster, job.id)
            collector.wait("the job's root span", has_root(job.trace_id))
            yield TracedRun(cluster, collector, job, during)
    finally:
        collector.stop()


# ---- traces ---------------------------------------------------------------------------------


def test_a_migration_is_one_trace_with_phase_round_and_agent_spans(traced_run: TracedRun) -> None:
    job = traced_run.job
    assert re.fullmatch(r"[0-9a-f]{32}", job.trace_id), job.trace_id
    # The agents export on their own schedule: their spans may trail the orchestrator's root.
    calls = {("n2", "PrepareDestination"), ("n1", "StartPrecopy"), ("n1", "DirtyRound"), ("n1", "StopAndCopy"),
             ("n2", "ResumeDestination"), ("n1", "ReleaseSource")}

    def agent_calls(got: list[ReceivedSpan]) -> set[tuple[str, str]]:
        return {(s.instance, s.name.rpartition("/")[2]) for s in of_trace(got, job.trace_id)
                if s.service == "nvmigrate-agent" and s.kind == SPAN_KIND_SERVER}

    def every_call_served(got: list[ReceivedSpan]) -> bool:
        # Both ends of every call are in: each process exports on its own schedule.
        mine = of_trace(got, job.trace_id)
        return calls <= agent_calls(got) and client_span_ids(mine) == linked_ids(mine)

    spans = traced_run.collector.wait("the agents' spans of the job", every_call_served)
    mine = of_trace(spans, job.trace_id)
    ids = {s.span_id: s for s in mine}

    (root,) = [s for s in mine if s.parent_span_id == ""]
    assert (root.name, root.service, root.instance) == ("migration", "nvmigrate-orchestrator", "orch-1")
    assert root.attributes["nvmigrate.job_id"] == job.id
    assert root.attributes["nvmigrate.outcome"] == "COMPLETED"
    assert root.attributes["nvmigrate.bytes"] == job.bytes_transferred >= 16 * MiB
    assert root.attributes["nvmigrate.guest_blackout_ms"] == pytest.approx(job.guest_blackout_ms)

    (verification,) = [s for s in mine if s.name == "verification"]
    assert verification.parent_span_id == root.span_id
    assert verification.attributes["nvmigrate.verification"] == "PASSED"
    assert verification.attributes["nvmigrate.source_digest"] == job.source_digest == job.destination_digest
    phases = sorted((s for s in mine if s.parent_span_id == root.span_id and s is not verification),
                    key=lambda s: s.start_ns)
    assert [s.name for s in phases] == PHASES
    for span, record in zip(phases, job.phases, strict=False):
        assert span.start_ns == pytest.approx(record.started_at * 1e9, abs=1e3)  # the recorded timings
        assert span.end_ns - span.start_ns == pytest.approx(record.duration_ms * 1e6, rel=1e-3, abs=1e3)
        assert span.attributes["nvmigrate.bytes"] == record.bytes
    by_phase = {s.name: s for s in phases}
    assert by_phase["PRECOPY"].attributes["nvmigrate.bytes"] >= 16 * MiB

    rounds = [s for s in mine if s.name.startswith("round ")]
    assert len(rounds) == job.rounds >= 1
    assert all(s.parent_span_id == by_phase["DIRTY_ITERATION"].span_id for s in rounds)
    assert {s.attributes["nvmigrate.round"] for s in rounds} == set(range(1, job.rounds + 1))
    assert all("nvmigrate.dirty_rate_bytes_per_s" in s.attributes for s in rounds)

    def phase_of(span: ReceivedSpan) -> str:
        while span.parent_span_id in ids and span.parent_span_id != root.span_id:
            span = ids[span.parent_span_id]
        return span.name

    served = {(s.instance, s.name.rpartition("/")[2], phase_of(s)) for s in mine
              if s.service == "nvmigrate-agent" and s.kind == SPAN_KIND_SERVER}
    assert {("n2", "PrepareDestination", "PREPARING"), ("n1", "StartPrecopy", "PRECOPY"),
            ("n1", "DirtyRound", "DIRTY_ITERATION"), ("n1", "StopAndCopy", "STOP_AND_COPY"),
            ("n2", "ResumeDestination", "RESUMING"), ("n1", "ReleaseSource", "verification")} <= served
    # Every agent span hangs off the phase or round its call was made in (or the verification after
    # COMPLETED), not off the orchestrator's CLIENT span of the call (a sibling), to which it links:
    # one agent span per CLIENT span.
    phase_or_round = {s.span_id for s in [*phases, *rounds, verification]}
    agent_spans = [s for s in mine if s.service == "nvmigrate-agent"]
    for span in agent_spans:
        assert span.parent_span_id in phase_or_round, f"{span.name} under {ids.get(span.parent_span_id)}"
        (caller_id,) = span.links
        caller = ids[caller_id]
        assert (caller.kind, caller.service, caller.name) == (SPAN_KIND_CLIENT, "nvmigrate-orchestrator", span.name)
        assert caller.parent_span_id == span.parent_span_id
    assert sorted(link for s in agent_spans for link in s.links) == sorted(client_span_ids(mine))
    (precopy_call,) = [s for s in agent_spans if s.name.endswith("/StartPrecopy")]
    assert precopy_call.parent_span_id == by_phase["PRECOPY"].span_id
    dirty_rounds = [s for s in agent_spans if s.name.endswith("/DirtyRound")]
    assert len(dirty_rounds) >= job.rounds
    for span in dirty_rounds:  # under the span of the very round the agent ran
        assert ids[span.parent_span_id].name == f"round {span.attributes['nvmigrate.round']}"
    assert missing_parents(mine) == []  # one connected tree


def source_stage(cluster: LocalCluster, job_id: str) -> str:
    """What the source agent's session of the job is doing ('precopy', 'round 2', ...)."""
    channel, stub = cluster.agent_stub("n1")
    with channel:
        return str(stub.GetSession(agent_pb2.MigrationRef(job_id=job_id), timeout=5).stage)


@dataclass
class Failover:
    ended: migration_pb2.Migration  # the job record at its end
    spans: list[ReceivedSpan]  # the job's trace, complete: every process that exports to it stopped or flushed


def run_with_the_leader_killed(kill_when: Callable[[LocalCluster, migration_pb2.Migration], None]) -> Failover:
    """A migration (24 MiB at 6 MiB/s: about 4 s of PRECOPY) whose leader orch-1 is SIGKILLed when
    `kill_when` returns; orch-2 takes over and ends the job. Then the agents are stopped (SIGTERM:
    they export what they hold as they exit), so the collector has the whole trace."""
    collector = OtlpCollector().start()
    try:
        # The batch processor's default schedule, said out loud so that no OTEL_BSP_SCHEDULE_DELAY
        # from outside shortens it: spans leave orch-1 before its death only if it flushes them.
        env = {"OTEL_EXPORTER_OTLP_ENDPOINT": collector.endpoint, "OTEL_BSP_SCHEDULE_DELAY": "5000"}
        with LocalCluster(env=env) as cluster:
            cluster.start_etcd()
            cluster.start_orchestrator(name="orch-1")
            cluster.start_agents(["n1", "n2"])
            create_controller(cluster, "n1", "c4", 24 * MiB, write_iops=300)
            job = migrate(cluster, "c4", to="n2", bandwidth_bytes_per_s=6 * MiB)
            kill_when(cluster, job)
            replace_orchestrator(cluster, "orch-2")
            ended = wait_phase(cluster, job.id, TERMINAL, timeout_s=180)
            assert migration_pb2.Phase.Name(ended.phase) in ("COMPLETED", "ROLLED_BACK"), ended.reason
            assert ended.trace_id == job.trace_id
            collector.wait("the root span from orch-2", lambda got: any(
                s.parent_span_id == "" and s.instance == "orch-2" for s in of_trace(got, job.trace_id)))
            if ended.phase == migration_pb2.COMPLETED:
                ended = wait_verified(cluster, job.id)
                collector.wait("the verification span", lambda got: any(
                    s.name == "verification" for s in of_trace(got, job.trace_id)))
            for agent in cluster.agents.values():
                agent.stop()
                assert agent.popen.returncode == 0, agent.tail()
            return Failover(ended, of_trace(collector.spans(), job.trace_id))
    finally:
        collector.stop()


def check_the_trace_is_whole(run: Failover, killed_in: str) -> dict[str, ReceivedSpan]:
    """A span for every phase in the job record, from the leader that closed it (orch-1 before
    `killed_in`, orch-2 from then on), at the recorded times; rounds and agent calls in place; no
    span without its parent. Returns the spans by id."""
    ended, spans = run.ended, run.spans
    ids = {s.span_id: s for s in spans}
    assert missing_parents(spans) == []
    (root,) = [s for s in spans if s.parent_span_id == ""]
    assert (root.name, root.instance) == ("migration", "orch-2")
    assert root.attributes["nvmigrate.outcome"] == migration_pb2.Phase.Name(ended.phase)
    assert root.start_ns == pytest.approx(ended.created_at * 1e9, abs=1e3)  # the job's start, before the kill
    phases = sorted((s for s in spans if s.parent_span_id == root.span_id and s.name != "verification"),
                    key=lambda s: s.start_ns)
    recorded = ended.phases[:-1]  # the last entry is the outcome: the root's
    assert [s.name for s in phases] == [migration_pb2.Phase.Name(r.phase) for r in recorded]
    for span, record in zip(phases, recorded, strict=True):
        assert span.start_ns == pytest.approx(record.started_at * 1e9, abs=1e3)
        assert span.end_ns - span.start_ns == pytest.approx(record.duration_ms * 1e6, rel=1e-3, abs=1e3)
    # orch-1 was killed within its 5 s batch schedule of ending PREPARING (of ending PRECOPY, for a
    # kill in a round): only the flush after each phase change got those spans out.
    killed_at = [s.name for s in phases].index(killed_in)
    assert [s.instance for s in phases] == ["orch-1"] * killed_at + ["orch-2"] * (len(phases) - killed_at)
    assert "leader takeover" in phases[killed_at].events  # opened by orch-1, closed by orch-2: one span
    dirty = [s for s in phases if s.name == "DIRTY_ITERATION"]
    rounds = [s for s in spans if s.name.startswith("round ")]
    assert sorted(s.attributes["nvmigrate.round"] for s in rounds) == list(range(1, ended.rounds + 1))
    assert all(s.parent_span_id in {d.span_id for d in dirty} for s in rounds)
    verification = [s for s in spans if s.name == "verification"]
    assert [s.parent_span_id for s in verification] == ([root.span_id] if ended.verification else [])
    agent_spans = [s for s in spans if s.service == "nvmigrate-agent"]
    assert agent_spans
    for span in agent_spans:
        parent = ids[span.parent_span_id]
        assert parent in phases or parent in rounds or parent in verification, f"{span.name} under {parent.name}"
        if span.name.endswith("/DirtyRound"):
            assert parent in rounds
            if "nvmigrate.round" in span.attributes:  # a call that was answered
                assert parent.name == f"round {span.attributes['nvmigrate.round']}"
        (caller_id,) = span.links
        caller = ids.get(caller_id)  # absent only for a call orch-1 still had in flight
        if caller is not None:
            assert (caller.kind, caller.name, caller.parent_span_id) == (SPAN_KIND_CLIENT, span.name,
                                                                           span.parent_span_id)
    return ids


@pytest.mark.parametrize("kill_after_s", [0.3, 3.0], ids=["0.3s-into-PRECOPY", "3s-into-PRECOPY"])
def test_the_trace_survives_the_leader_killed_in_precopy(kill_after_s: float) -> None:
    def kill_when(cluster: LocalCluster, job: migration_pb2.Migration) -> None:
        wait_phase(cluster, job.id, {migration_pb2.PRECOPY})
        seen = time.monotonic()
        # A deliberate delay of the fault, not synchronisation: the kill lands this far into
        # PRECOPY (counted from when the test saw it begin), whatever else is going on.
        time.sleep(max(0.0, seen + kill_after_s - time.monotonic()))

    run = run_with_the_leader_killed(kill_when)
    ids = check_the_trace_is_whole(run, killed_in="PRECOPY")
    precopy = next(s for s in run.spans if s.name == "PRECOPY")
    # orch-1's StartPrecopy was in flight at the kill: its CLIENT span is gone, yet the agent's
    # span of that call is in the trace, under PRECOPY. orch-2's call attached to the same work.
    calls = [s for s in run.spans if s.service == "nvmigrate-agent" and s.name.endswith("/StartPrecopy")]
    assert calls and all(s.parent_span_id == precopy.span_id for s in calls)
    callers = [ids[s.links[0]].instance if s.links[0] in ids else "(killed)" for s in calls]
    assert sorted(callers) == ["(killed)", "orch-2"], callers


def test_the_trace_survives_the_leader_killed_in_a_dirty_round() -> None:
    def kill_when(cluster: LocalCluster, job: migration_pb2.Migration) -> None:
        wait_for("round 1 on the source", lambda: source_stage(cluster, job.id) == "round 1", 60, interval_s=0.02)

    run = run_with_the_leader_killed(kill_when)
    ids = check_the_trace_is_whole(run, killed_in="DIRTY_ITERATION")
    # orch-1's DirtyRound 1 was in flight: the agent's span of it sits under the round 1 span that
    # orch-2 emitted when it ran round 1 again (the same derived span id), not under a lost span.
    (round_1,) = [s for s in run.spans if s.name == "round 1"]
    assert round_1.instance == "orch-2"
    calls = [s for s in run.spans if s.parent_span_id == round_1.span_id and s.service == "nvmigrate-agent"]
    callers = sorted(ids[s.links[0]].instance if s.links[0] in ids else "(killed)" for s in calls)
    assert callers == ["(killed)", "orch-2"], callers


def test_orchestrator_json_logs_carry_the_job_and_trace_id(traced_run: TracedRun) -> None:
    job = traced_run.job
    lines = traced_run.cluster.orchestrators[0].log_path.read_text().splitlines()
    records = [json.loads(line) for line in lines if line.startswith("{")]  # the rest: startup prints
    assert records and all({"time", "level", "logger", "message"} <= r.keys() for r in records)
    about_job = [r for r in records if r.get("job_id") == job.id]
    assert about_job and all(r["trace_id"] == job.trace_id for r in about_job)
    changes = [r["message"].split(": ", 1)[1] for r in about_job if " -> " in r["message"]]
    assert [c.split(" after ")[0] for c in changes] == [f"{a} -> {b}" for a, b in zip(
        PHASES, [*PHASES[1:], "COMPLETED"], strict=True)]


# ---- metrics --------------------------------------------------------------------------------


def test_metrics_show_the_run_while_and_after_it_happens(traced_run: TracedRun) -> None:
    job, during = traced_run.job, traced_run.during
    assert during[("nvmigrate_jobs", (("phase", "PRECOPY"),))] == 1
    assert during[("nvmigrate_job_namespace_bytes", (("controller", "c1"), ("job_id", job.id),
                                                     ("phase", "PRECOPY")))] == 16 * MiB
    assert during[("nvmigrate_job_bytes_transferred", (("controller", "c1"), ("job_id", job.id),
                                                       ("phase", "PRECOPY")))] > 0

    after = scrape(traced_run.cluster.orchestrators[0])
    assert after[("nvmigrate_jobs_finished_total", (("outcome", "COMPLETED"),))] == 1
    assert not any(name == "nvmigrate_jobs_finished_total" and labels != (("outcome", "COMPLETED"),)
                   for name, labels in after)
    assert after[("nvmigrate_jobs", (("phase", "COMPLETED"),))] == 1
    assert sum(v for (name, _), v in after.items() if name == "nvmigrate_jobs") == 1
    assert not any(name == "nvmigrate_job_bytes_transferred" for name, _ in after)  # only active jobs
    assert after[("nvmigrate_bytes_moved_total", ())] >= max(job.bytes_transferred, 16 * MiB)
    assert after[("nvmigrate_dirty_rounds_total", ())] == job.rounds
    assert after[("nvmigrate_guest_blackout_seconds_count", ())] == 1
    assert after[("nvmigrate_guest_blackout_seconds_sum", ())] * 1000 == pytest.approx(job.guest_blackout_ms)
    assert after[("nvmigrate_switchover_downtime_seconds_count", ())] == 1
    assert after[("nvmigrate_switchover_over_budget_total", ())] == (1 if job.downtime_budget_exceeded else 0)
    assert after[("nvmigrate_switchover_over_prediction_seconds_count", ())] == 1
    assert after[("nvmigrate_switchover_over_prediction_seconds_sum", ())] * 1000 == pytest.approx(
        max(0.0, job.downtime_ms - job.predicted_downtime_ms), abs=1e-3)
    assert after[("nvmigrate_switchover_fixed_cost_seconds", ())] > 0
    assert after[("nvmigrate_switchover_downtime_seconds_sum", ())] * 1000 == pytest.approx(job.downtime_ms,
                                                                                          abs=1e-3)
    for record in job.phases[:-1]:
        phase = migration_pb2.Phase.Name(record.phase)
        assert after[("nvmigrate_phase_duration_seconds_count", (("phase", phase),))] == 1
        assert after[("nvmigrate_phase_duration_seconds_sum", (("phase", phase),))] * 1000 == pytest.approx(
            record.duration_ms)
    assert after[("nvmigrate_evacuations_total", ())] == 0
    assert after[("nvmigrate_live_agents", ())] == 2
    assert after[("nvmigrate_node_controllers", (("node", "n2"),))] == 1
    assert after[("nvmigrate_node_controllers", (("node", "n1"),))] == 0
    assert after[("nvmigrate_is_leader", ())] == 1 and after[("nvmigrate_etcd_up", ())] == 1


# ---- dashboards -----------------------------------------------------------------------------

_FUNCTIONS_AND_KEYWORDS = frozenset({
    "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless", "offset",
    "sum", "avg", "max", "min", "count", "topk", "bottomk", "quantile", "stddev", "stdvar", "count_values", "group",
    "inf", "nan"})


def promql_metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads: strings, label matchers, ranges and grouping
    clauses removed, then the identifiers that are not functions or keywords."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', "", expr)
    text = re.sub(r"\{[^}]*\}", "", text)
    text = re.sub(r"\[[^\]]*\]", "", text)
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)
    names = set()
    for match in re.finditer(r"[a-zA-Z_:][a-zA-Z0-9_:]*", text):
        word, rest = match.group(0), text[match.end():]
        if word.lower() in _FUNCTIONS_AND_KEYWORDS or rest.lstrip().startswith("("):
            continue
        if text[match.start() - 1:match.start()] == "$" or re.fullmatch(r"e\d*", word):
            continue
        names.add(word)
    return names


def exported_sample_names() -> set[str]:
    """Every sample name /metrics can carry, from the registries' declarations (so a labelled
    metric with no sample yet counts)."""
    suffixes = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created"),
                "gauge": ("",), "summary": ("_sum", "_count", "")}
    names: set[str] = set()
    families = [*metrics.REGISTRY.collect(), *metrics.ClusterState("test").describe()]
    for family in families:
        names.update(family.name + suffix for suffix in suffixes.get(family.type, ("",)))
    return names


def test_promql_names_are_extracted_from_expressions() -> None:
    assert promql_metric_names('histogram_quantile(0.95, sum by (le, phase) (rate(a_bucket{phase="X"}[5m])))') == {
        "a_bucket"}
    assert promql_metric_names("max by (job_id) (x) / max by (job_id) (y) - 1e3") == {"x", "y"}
    assert promql_metric_names('sum(increase(z_total{le="0.05"}[$__range]))') == {"z_total"}


def test_every_dashboard_panel_queries_metrics_we_export() -> None:
    exported = exported_sample_names()
    files = sorted(DASHBOARDS.glob("*.json"))
    assert {f.stem for f in files} >= {"migrations-overview", "job-timeline", "blackout", "evacuation"}
    queried: set[str] = set()
    for path in files:
        board = json.loads(path.read_text())
        assert board["uid"] and board["title"] and board["panels"], path.name
        for panel in board["panels"]:
            assert panel["targets"], f"{path.name}: panel {panel['title']!r} has no query"
            for target in panel["targets"]:
                if panel["datasource"]["type"] != "prometheus":
                    assert target.get("query"), f"{path.name}: {panel['title']!r}"
                    continue
                names = promql_metric_names(target["expr"])
                assert names, f"{path.name}: {panel['title']!r} reads no metric: {target['expr']}"
                unknown = names - exported
                assert not unknown, f"{path.name}: panel {panel['title']!r} queries {unknown}, not exported"
                queried |= names
        for variable in board["templating"]["list"]:
            if variable["type"] == "query":  # label_values(METRIC_SELECTOR, LABEL)
                selector = re.fullmatch(r"label_values\((.+),\s*\w+\)", variable["definition"])
                assert selector, variable["definition"]
                assert promql_metric_names(selector.group(1)) <= exported, variable["definition"]
    # The trace panel of the job timeline dashboard shows the trace by the trace id variable.
    timeline = json.loads((DASHBOARDS / "job-timeline.json").read_text())
    traces = [p for p in timeline["panels"] if p["type"] == "traces"]
    assert traces and traces[0]["targets"][0]["query"] == "${trace_id}"
    assert {"nvmigrate_guest_blackout_seconds_bucket", "nvmigrate_jobs", "nvmigrate_node_controllers",
            "nvmigrate_evacuations_total", "nvmigrate_bytes_moved_total"} <= queried


# ---- orchctl trace --------------------------------------------------------------------------


def test_orchctl_trace_prints_the_waterfall_and_trace_id(traced_run: TracedRun) -> None:
    job = traced_run.job
    base = [sys.executable, "-m", "orchctl.cli", "--server", traced_run.cluster.orchestrator_address]
    shown = subprocess.run([*base, "trace", job.id, "--width", "30"], capture_output=True, text=True, timeout=60,
                           check=True).stdout
    assert job.id in shown and f"trace id  {job.trace_id}" in shown
    bars = [line for line in shown.splitlines() if "|" in line]
    assert [line.split()[0] for line in bars] == [*PHASES, "COMPLETED"]
    assert all(len(line.split("|")[1]) == 30 for line in bars)
    assert "█" in next(line for line in bars if line.startswith("PRECOPY"))
    data = json.loads(subprocess.run([*base, "-o", "json", "trace", job.id], capture_output=True, text=True,
                                     timeout=60, check=True).stdout)
    assert data["trace_id"] == job.trace_id and data["phase"] == "COMPLETED"
    assert [p["phase"] for p in data["phases"]] == [*PHASES, "COMPLETED"]
    assert data["phases"][0]["offset_ms"] == 0 and not any(p["running"] for p in data["phases"])


# ---- the web page ---------------------------------------------------------------------------


def chromium(*args: str, timeout_s: float = 90.0) -> str:
    """Runs headless Chromium to the end; its whole process group is killed if it hangs."""
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    if binary is None:
        pytest.skip("chromium is not installed (scripts/setup.sh installs the Debian package chromium)")
    profile = tempfile.mkdtemp(prefix="nvmigrate-chromium-")
    argv = [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--virtual-time-budget=4000", *args]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    finally:
        shutil.rmtree(profile, ignore_errors=True)
    assert proc.returncode == 0, err[-2000:]
    return out


def test_the_web_page_draws_the_job_timeline_in_a_browser(traced_run: TracedRun) -> None:
    job, orchestrator = traced_run.job, traced_run.cluster.orchestrators[0]
    page = f"http://{orchestrator.http_address}/jobs/{job.id}"

    dom = chromium("--dump-dom", page)
    svg = re.search(r'<svg class="timeline".*?</svg>', dom, re.S)
    assert svg, "the timeline chart was not drawn"
    drawn = re.findall(r'<g class="phase" data-phase="([A-Z_]+)"', svg.group(0))
    assert drawn == [*PHASES, "COMPLETED"]
    assert all(f">{phase}<" in svg.group(0) for phase in PHASES)  # each row is labelled
    assert job.id in dom and job.trace_id in dom
    assert "could not load" not in dom

    overview = chromium("--dump-dom", f"http://{orchestrator.http_address}/")
    assert f'data-job="{job.id}"' in overview and 'data-node="n1"' in overview and 'data-node="n2"' in overview

    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "web-job-page.png"
    shot.unlink(missing_ok=True)
    chromium(f"--screenshot={shot}", "--window-size=1280,900", "--hide-scrollbars", page)
    png = shot.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert (int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")) == (1280, 900)
    assert len(png) > 20_000, "the screenshot looks blank"
