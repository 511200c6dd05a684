"""Tracing, metrics and log context without processes: the job trace built from a real sequence of
job records (the pure state machine), spans caught by the SDK's in-memory exporter."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from cluster import logs, telemetry
from orchestrator import metrics, tracing
from orchestrator.jobs import Job, Phase, PhaseEntry, Policy
from orchestrator.observer import JobObserver

MiB = 1 << 20


@pytest.fixture
def exported() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider(id_generator=telemetry.PresetIdGenerator())
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    telemetry.use_provider(provider)
    try:
        yield exporter
    finally:
        telemetry.use_provider(None)
        provider.shutdown()


def new_job(now: float = 1000.0) -> Job:
    return Job(id="mig-0123456789ab", controller_id="c1", source_node="n1", namespace_bytes=16 * MiB,
               policy=Policy(), created_at=now, updated_at=now, phases=(PhaseEntry(Phase.PENDING, now),),
               trace_context=tracing.new_job_context())


class Driver:
    """Writes job records through an observer the way the runner does (prepare, write, written)."""

    def __init__(self, job: Job, epoch: int) -> None:
        self.observer = JobObserver(job.id, epoch)
        self.observer.adopt(job)
        self.job = self.save(job.taken_over(epoch, job.updated_at))

    def save(self, new: Job) -> Job:
        before, new = self.job if hasattr(self, "job") else new, self.observer.prepare(new)
        self.observer.written(before, new)
        self.job = new
        return new

    def enter(self, phase: Phase, now: float, **record: object) -> Job:
        job = self.job.record(now, **record) if record else self.job  # type: ignore[arg-type]
        return self.save(job.enter(phase, now))


def by_name(spans: tuple[ReadableSpan, ...]) -> dict[str, ReadableSpan]:
    return {s.name: s for s in spans}


def attrs(span: ReadableSpan) -> dict[str, object]:
    return dict(span.attributes or {})


def test_no_exporter_means_no_trace_and_no_interceptors() -> None:
    assert not telemetry.tracing_enabled()
    assert tracing.new_job_context() == {}
    assert telemetry.client_interceptors("127.0.0.1:1") == [] and telemetry.server_interceptors() == []
    job = new_job()
    assert tracing.JobTrace(job.id, 1).prepare(job) is job  # not even a copy


@pytest.mark.parametrize(("env", "expected"), [
    ({}, "none"),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4317"}, "otlp"),
    ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://127.0.0.1:4317"}, "otlp"),
    ({"OTEL_TRACES_EXPORTER": "console"}, "console"),
    ({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://x:4317"}, "none"),
    ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_SDK_DISABLED": "true"}, "none"),
])
def test_the_exporter_follows_the_standard_variables(env: dict[str, str], expected: str) -> None:
    assert telemetry.exporter_name(env) == expected


@pytest.mark.parametrize("env", [
    {"OTEL_TRACES_EXPORTER": "zipkin"},
    {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"},
])
def test_unsupported_exporters_are_refused_by_name(env: dict[str, str]) -> None:
    with pytest.raises(telemetry.TelemetryConfigError, match=r"zipkin|http/protobuf"):
        telemetry.exporter_name(env)


def test_a_job_gets_a_root_span_a_span_per_phase_and_round_spans(exported: InMemorySpanExporter) -> None:
    job = new_job()
    assert len(job.trace_context["trace_id"]) == 32 and len(job.trace_context["span_id"]) == 16
    run = Driver(job, epoch=3)
    run.enter(Phase.PREPARING, 1001.0)
    run.enter(Phase.PRECOPY, 1002.0)
    run.enter(Phase.DIRTY_ITERATION, 1005.0, add_bytes=16 * MiB)
    for number in (1, 2):
        with run.observer.round(run.job, number):
            pass
        run.save(run.job.record(1005.0 + number, add_bytes=4096 * number, add_rounds=1))
    run.enter(Phase.STOP_AND_COPY, 1008.0)
    run.enter(Phase.COMMIT, 1009.0, add_bytes=8192)
    run.enter(Phase.RESUMING, 1009.5)
    run.save(run.job.end(Phase.COMPLETED, 1010.0, ""))

    spans = exported.get_finished_spans()
    named = by_name(spans)
    trace_id = int(job.trace_context["trace_id"], 16)
    assert {s.context.trace_id for s in spans} == {trace_id}
    root = named["migration"]
    assert root.parent is None and root.context.span_id == int(job.trace_context["span_id"], 16)
    assert root.start_time == 1000 * 10**9 and root.end_time == 1010 * 10**9
    assert attrs(root)["nvmigrate.outcome"] == "COMPLETED"
    phases = sorted((s for s in spans if s.parent and s.parent.span_id == root.context.span_id),
                    key=lambda s: s.start_time or 0)
    assert [s.name for s in phases] == ["PENDING", "PREPARING", "PRECOPY", "DIRTY_ITERATION", "STOP_AND_COPY",
                                        "COMMIT", "RESUMING"]
    precopy = named["PRECOPY"]
    assert (precopy.start_time, precopy.end_time) == (1002 * 10**9, 1005 * 10**9)
    assert attrs(precopy)["nvmigrate.bytes"] == 16 * MiB
    dirty = named["DIRTY_ITERATION"]
    rounds = [s for s in spans if s.name.startswith("round ")]
    assert sorted(s.name for s in rounds) == ["round 1", "round 2"]
    assert all(s.parent is not None and s.parent.span_id == dirty.context.span_id for s in rounds)
    assert attrs(dirty)["nvmigrate.rounds"] == 2


def test_a_new_leader_closes_the_phase_the_old_one_opened(exported: InMemorySpanExporter) -> None:
    """Leader 1 dies in PRECOPY; leader 2 loads the record: its PRECOPY span is the same span id,
    with the old start time and a takeover event, and agent calls find it as their parent."""
    first = Driver(new_job(), epoch=3)
    first.enter(Phase.PREPARING, 1001.0)
    in_precopy = first.enter(Phase.PRECOPY, 1002.0)
    opened = in_precopy.trace_context["phase_span_id"]
    del first  # killed: nothing more from it

    second = Driver(in_precopy, epoch=5)
    assert second.job.trace_context["phase_span_id"] == opened  # the same phase, the same span
    with second.observer.running():
        parent = tracing.call_parent(in_precopy.id)
        assert parent is not None
    assert tracing.call_parent(in_precopy.id) is None  # only while a runner drives the job
    second.enter(Phase.DIRTY_ITERATION, 1006.0)
    second.save(second.job.end(Phase.ROLLED_BACK, 1007.0, "guest kept dirtying"))

    named = by_name(exported.get_finished_spans())
    precopy = named["PRECOPY"]
    assert f"{precopy.context.span_id:016x}" == opened
    assert precopy.start_time == 1002 * 10**9
    assert [e.name for e in precopy.events] == ["leader takeover"]
    assert precopy.events[0].attributes == {"nvmigrate.previous_epoch": 3, "nvmigrate.epoch": 5}
    assert named["DIRTY_ITERATION"].status.status_code is StatusCode.ERROR  # the phase the job failed in
    assert named["migration"].status.status_code is StatusCode.ERROR


def test_metrics_count_what_changed_between_records() -> None:
    def value(name: str, **labels: str) -> float:
        got = metrics.REGISTRY.get_sample_value(name, labels)
        return got or 0.0

    before = (value("nvmigrate_bytes_moved_total"), value("nvmigrate_jobs_finished_total", outcome="COMPLETED"),
              value("nvmigrate_phase_duration_seconds_count", phase="PRECOPY"),
              value("nvmigrate_guest_blackout_seconds_count"))
    job = new_job().taken_over(1, 1000.0)
    precopy = job.enter(Phase.PREPARING, 1000.5).enter(Phase.PRECOPY, 1001.0)
    done = precopy.record(1003.0, add_bytes=5 * MiB).progressed(5 * MiB, 1003.0).enter(Phase.DIRTY_ITERATION, 1003.0)
    metrics.job_written(precopy, done)
    resuming = done.enter(Phase.STOP_AND_COPY, 1003.5).enter(Phase.COMMIT, 1003.6).enter(Phase.RESUMING, 1003.7)
    metrics.job_written(done, resuming)
    ended = resuming.switched_over(9.0, 12.5, 1004.0).end(Phase.COMPLETED, 1004.0, "")
    metrics.job_written(resuming, ended)
    metrics.job_written(ended, ended)  # a repeated write of the ending counts nothing twice
    after = (value("nvmigrate_bytes_moved_total"), value("nvmigrate_jobs_finished_total", outcome="COMPLETED"),
             value("nvmigrate_phase_duration_seconds_count", phase="PRECOPY"),
             value("nvmigrate_guest_blackout_seconds_count"))
    assert [a - b for a, b in zip(after, before, strict=True)] == [5 * MiB, 1, 1, 1]


def test_log_records_carry_job_and_trace_id_as_json() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logs.JsonFormatter("orchestrator[test]"))
    handler.addFilter(logs.ContextFilter())
    logger = logging.getLogger("nvmigrate.test.logs")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        with logs.context(logs.Fields(job_id="mig-0123456789ab", trace_id="ab" * 16)):
            logger.info("precopy %d%% done", 40)
        logger.info("between jobs")
    finally:
        logger.removeHandler(handler)
    first, second = (json.loads(line) for line in stream.getvalue().splitlines())
    assert first["message"] == "precopy 40% done" and first["process"] == "orchestrator[test]"
    assert (first["job_id"], first["trace_id"]) == ("mig-0123456789ab", "ab" * 16)
    assert "job_id" not in second and "trace_id" not in second
