"""Tracing, metrics and log context without processes: the job trace built from a real sequence of
job records (the pure state machine), spans caught by the SDK's in-memory exporter."""

from __future__ import annotations

import io
import json
import logging
import threading
import time
from collections.abc import Iterator

import pytest
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import NonRecordingSpan, SpanContext, StatusCode, TraceFlags

from cluster import logs, telemetry
from orchctl.localcluster import free_port, wait_for
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


def test_no_exporter_means_no_trace_no_interceptors_and_no_flush_thread() -> None:
    assert not telemetry.tracing_enabled()
    assert tracing.new_job_context() == {}
    assert telemetry.client_interceptors("127.0.0.1:1") == [] and telemetry.server_interceptors() == []
    job = new_job()
    assert tracing.JobTrace(job.id, 1).prepare(job) is job  # not even a copy
    run = Driver(job, epoch=1)
    for phase, at in ((Phase.PREPARING, 1001.0), (Phase.PRECOPY, 1002.0), (Phase.DIRTY_ITERATION, 1003.0)):
        run.enter(phase, at)
    with run.observer.round(run.job, 1) as round_span:
        assert round_span.span_id == 0
    run.save(run.job.record(1004.0, add_rounds=1).end(Phase.ROLLED_BACK, 1005.0, "stop"))
    assert run.job.trace_context == {}
    assert telemetry.span_flusher() is None
    assert not [t for t in threading.enumerate() if t.name == telemetry.SpanFlusher.THREAD_NAME]


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


def in_context(parent: otel_context.Context | None) -> SpanContext:
    """The span an agent call would be placed under, given what `tracing.call_parent` said."""
    assert parent is not None
    return trace.get_current_span(parent).get_span_context()


def test_round_span_ids_are_derived_from_the_trace_the_phase_and_the_number() -> None:
    trace_id, phase = "0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331"
    first = tracing.round_span_id(trace_id, phase, 1)
    assert first == tracing.round_span_id(trace_id, phase, 1) == tracing.round_span_id(trace_id.upper(), phase, 1)
    others = {tracing.round_span_id(trace_id, phase, 2), tracing.round_span_id(trace_id, "00f067aa0ba902b7", 1),
              tracing.round_span_id("4bf92f3577b34da6a3ce929d0e0e4736", phase, 1)}
    assert first not in others and len(others) == 3
    assert all(0 < i < 1 << 64 for i in (first, *others))


def test_a_new_leader_emits_the_round_the_old_one_had_in_flight(exported: InMemorySpanExporter) -> None:
    """Leader 1 dies during round 1, after an agent call placed under that round; leader 2 runs
    round 1 again: the round span it emits has the id leader 1 gave the agent as parent."""
    first = Driver(new_job(), epoch=3)
    first.enter(Phase.PREPARING, 1001.0)
    first.enter(Phase.PRECOPY, 1002.0)
    in_rounds = first.enter(Phase.DIRTY_ITERATION, 1005.0, add_bytes=16 * MiB)
    with first.observer.running():
        in_flight = first.observer.round(in_rounds, 1)
        in_flight.__enter__()  # never left: leader 1 is killed in it
        told_the_agent = in_context(tracing.call_parent(in_rounds.id))
    assert told_the_agent.span_id != int(in_rounds.trace_context["phase_span_id"], 16)  # the round, not the phase
    assert "round 1" not in by_name(exported.get_finished_spans())  # it died with leader 1

    second = Driver(in_rounds, epoch=5)
    with second.observer.running():
        with second.observer.round(second.job, 1):
            assert in_context(tracing.call_parent(in_rounds.id)) == told_the_agent
        assert "round 1" not in by_name(exported.get_finished_spans())  # not before the write records it
        second.save(second.job.record(1007.0, add_bytes=4096, add_rounds=1))
    rounds = [s for s in exported.get_finished_spans() if s.name == "round 1"]
    assert [(s.context.trace_id, s.context.span_id) for s in rounds] == [
        (told_the_agent.trace_id, told_the_agent.span_id)]
    dirty_span_id = int(in_rounds.trace_context["phase_span_id"], 16)
    assert rounds[0].parent is not None and rounds[0].parent.span_id == dirty_span_id
    assert attrs(rounds[0])["nvmigrate.epoch"] == 5


def test_a_failed_round_goes_out_with_the_write_that_closes_its_phase(exported: InMemorySpanExporter) -> None:
    run = Driver(new_job(), epoch=1)
    run.enter(Phase.PREPARING, 1001.0)
    run.enter(Phase.PRECOPY, 1002.0)
    run.enter(Phase.DIRTY_ITERATION, 1005.0)
    with pytest.raises(TimeoutError), run.observer.round(run.job, 1):
        raise TimeoutError("source did not answer")
    assert "round 1" not in by_name(exported.get_finished_spans())
    run.save(run.job.progressed(1, 1006.0))  # a write that settles nothing
    assert "round 1" not in by_name(exported.get_finished_spans())
    run.save(run.job.end(Phase.ROLLED_BACK, 1007.0, "source did not answer"))
    named = by_name(exported.get_finished_spans())
    failed = named["round 1"]
    assert failed.status.status_code is StatusCode.ERROR and failed.status.description == "source did not answer"
    assert failed.parent is not None and failed.parent.span_id == named["DIRTY_ITERATION"].context.span_id
    assert failed.context.span_id == tracing.round_span_id(run.job.trace_context["trace_id"],
                                                           f"{named['DIRTY_ITERATION'].context.span_id:016x}", 1)


def test_a_phase_closed_by_a_write_the_trace_did_not_hear_of_still_gets_its_span(
        exported: InMemorySpanExporter) -> None:
    """A commit whose reply was lost: the runner reloads the job (already COMMIT) without telling
    the trace; the next write still emits STOP_AND_COPY under its recorded id."""
    run = Driver(new_job(), epoch=1)
    for phase, at in ((Phase.PREPARING, 1001.0), (Phase.PRECOPY, 1002.0), (Phase.DIRTY_ITERATION, 1003.0),
                      (Phase.STOP_AND_COPY, 1004.0)):
        run.enter(phase, at)
    stop_and_copy = run.job.trace_context["phase_span_id"]
    committed = run.observer.prepare(run.job.enter(Phase.COMMIT, 1005.0))  # written, but `written` never ran
    run.job = committed
    run.enter(Phase.RESUMING, 1006.0)
    named = by_name(exported.get_finished_spans())
    assert f"{named['STOP_AND_COPY'].context.span_id:016x}" == stop_and_copy
    assert f"{named['COMMIT'].context.span_id:016x}" == committed.trace_context["phase_span_id"]
    assert len([s for s in exported.get_finished_spans() if s.name == "STOP_AND_COPY"]) == 1


@pytest.mark.parametrize(("caller", "linked"), [
    ("00f067aa0ba902b7", 0x00F067AA0BA902B7), ("", None), ("not hex", None), ("0000000000000000", None),
    ("1" * 17, None)])
def test_an_agent_span_links_to_the_caller_span_it_was_sent(caller: str, linked: int | None) -> None:
    parent_id = 0xB7AD6B7169203331
    parent = trace.set_span_in_context(NonRecordingSpan(SpanContext(
        0x0AF7651916CD43DD8448EB211C80319C, parent_id, is_remote=True, trace_flags=TraceFlags(TraceFlags.SAMPLED))))
    links = telemetry.caller_links(parent, caller)
    assert [link.context.span_id for link in links] == ([] if linked is None else [linked])
    assert all(link.context.trace_id == 0x0AF7651916CD43DD8448EB211C80319C for link in links)
    assert telemetry.caller_links(otel_context.Context(), "00f067aa0ba902b7") == []  # no trace to link in


# ---- flushing ---------------------------------------------------------------------------------


@pytest.fixture
def batched() -> Iterator[InMemorySpanExporter]:
    """Spans exported in batches a minute apart, as a process would with a long schedule delay."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider(id_generator=telemetry.PresetIdGenerator())
    provider.add_span_processor(BatchSpanProcessor(exporter, schedule_delay_millis=60_000))
    telemetry.use_provider(provider)
    try:
        yield exporter
    finally:
        telemetry.use_provider(None)
        provider.shutdown()


def test_spans_a_write_ended_leave_at_once_not_on_the_batch_schedule(batched: InMemorySpanExporter) -> None:
    run = Driver(new_job(), epoch=1)
    assert telemetry.span_flusher() is None  # nothing ended yet: no flush, no thread
    run.enter(Phase.PREPARING, 1001.0)
    flusher = telemetry.span_flusher()
    assert flusher is not None and flusher.requested == 1
    wait_for("PENDING exported", lambda: "PENDING" in by_name(batched.get_finished_spans()), 10)
    run.save(run.job.record(1001.5, note="destination n2"))  # ends no span: asks for no flush
    run.enter(Phase.PRECOPY, 1002.0)
    run.enter(Phase.DIRTY_ITERATION, 1003.0)
    with run.observer.round(run.job, 1):
        pass
    run.save(run.job.record(1004.0, add_rounds=1))
    assert flusher.requested == 4
    wait_for("PREPARING, PRECOPY and round 1 exported",
             lambda: {"PREPARING", "PRECOPY", "round 1"} <= set(by_name(batched.get_finished_spans())), 10)


def test_a_collector_that_is_down_holds_up_neither_the_job_nor_shutdown() -> None:
    """The real OTLP exporter aimed at a port nobody listens on (it retries until its 2 s
    timeout): every write returns at once; the flush thread alone waits."""
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

    provider = TracerProvider(id_generator=telemetry.PresetIdGenerator())
    provider.add_span_processor(BatchSpanProcessor(
        OTLPSpanExporter(endpoint=f"http://127.0.0.1:{free_port()}", insecure=True, timeout=2),
        schedule_delay_millis=60_000))
    telemetry.use_provider(provider)
    try:
        run = Driver(new_job(), epoch=1)
        slowest_s = 0.0
        for phase, at in ((Phase.PREPARING, 1001.0), (Phase.PRECOPY, 1002.0), (Phase.DIRTY_ITERATION, 1003.0),
                          (Phase.STOP_AND_COPY, 1004.0), (Phase.COMMIT, 1005.0), (Phase.RESUMING, 1006.0)):
            started = time.monotonic()
            run.enter(phase, at)
            slowest_s = max(slowest_s, time.monotonic() - started)
        ended = run.save(run.job.end(Phase.COMPLETED, 1007.0, ""))
        assert ended.phase is Phase.COMPLETED
        assert slowest_s < 0.5, f"a write waited {slowest_s:.2f} s for the collector"
        flusher = telemetry.span_flusher()
        assert flusher is not None and flusher.requested == 7 and flusher.flushed < 7  # still trying
        assert flusher.wait(30)  # it gives up with the exporter, not never
    finally:
        started = time.monotonic()
        telemetry.use_provider(None)
        assert time.monotonic() - started < 5
        provider.shutdown()
    assert not [t for t in threading.enumerate() if t.name == telemetry.SpanFlusher.THREAD_NAME]


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
