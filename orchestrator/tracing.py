"""One trace per migration job: a root span for the job, a child span per phase, a span per dirty
round under DIRTY_ITERATION, and the agent calls (client spans here, server spans in the agents)
under the phase or round they belong to.

The trace lives in the job record (`Job.trace_context`), not in any one process: the root's ids
are chosen when the API accepts the job, and each phase's span id when the phase is entered, in
the same etcd write. Whoever closes a phase emits its span under the recorded id with the
recorded start time, and whoever ends the job emits the root. So when a leader dies mid-phase,
the new leader's agent calls are children of the very phase span the old leader opened, and that
span (and the root) still arrive, spanning both leaders, with an event saying who took over.

trace_context keys: trace_id (32 hex), span_id (the root's, 16 hex), sampled ('1'/'0'),
phase_index and phase_span_id (the open phase and its span's id).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, Status, StatusCode, TraceFlags
from opentelemetry.util.types import AttributeValue

from cluster import telemetry
from orchestrator.jobs import Job, Phase, PhaseEntry

ROOT_SPAN_NAME = "migration"
# Outcomes that mean the migration did not do its job; CANCELLED was asked for, so it is no error.
_ERROR_ENDINGS = frozenset({Phase.FAILED, Phase.ROLLED_BACK})


def new_job_context() -> dict[str, str]:
    """The trace context of a job being created: its root span's ids ({} while tracing is off)."""
    if not telemetry.tracing_enabled():
        return {}
    trace_id, span_id, sampled = telemetry.new_ids()
    return {"trace_id": f"{trace_id:032x}", "span_id": f"{span_id:016x}", "sampled": "1" if sampled else "0"}


def _ns(unix_s: float) -> int:
    return int(unix_s * 1e9)


def _span_context(trace_context: dict[str, str], span_key: str) -> otel_context.Context:
    flags = TraceFlags(TraceFlags.SAMPLED if trace_context.get("sampled", "1") == "1" else TraceFlags.DEFAULT)
    parent = SpanContext(int(trace_context["trace_id"], 16), int(trace_context[span_key], 16), is_remote=True,
                         trace_flags=flags)
    return trace.set_span_in_context(NonRecordingSpan(parent))


_RUNNING: dict[str, JobTrace] = {}  # job id -> the trace of the runner driving it in this process


def call_parent(job_id: str) -> otel_context.Context | None:
    """For the agent channels' interceptor: where a call for this job belongs in its trace."""
    running = _RUNNING.get(job_id)
    return running.call_parent() if running is not None else None


@dataclass
class RoundSpan:
    """The span of one dirty round; `result` adds what the source reported (a TransferResult)."""

    span: trace.Span

    def result(self, result: Any) -> None:
        self.span.set_attributes({
            "nvmigrate.bytes": int(result.bytes_sent), "nvmigrate.round_duration_s": float(result.duration_s),
            "nvmigrate.dirty_bytes_remaining": int(result.dirty_bytes_remaining),
            "nvmigrate.dirty_rate_bytes_per_s": float(result.dirty_rate_bytes_per_s)})


@dataclass
class JobTrace:
    """The spans of one job as one runner sees them. Every method is a no-op while tracing is off."""

    job_id: str
    epoch: int
    _round: trace.Span | None = None
    _current: dict[str, str] = field(default_factory=dict)  # trace_context of the job as last written
    _events: list[tuple[str, dict[str, AttributeValue], float]] = field(default_factory=list)

    @property
    def on(self) -> bool:
        return telemetry.tracing_enabled()

    # ---- around etcd writes -------------------------------------------------------------

    def prepare(self, new: Job) -> Job:
        """Before `new` is written: give the job a trace if it has none (created while tracing
        was off, or by an older version) and the open phase a span id if it has none."""
        if not self.on:
            return new
        ctx = dict(new.trace_context)
        if "trace_id" not in ctx or "span_id" not in ctx:
            ctx.update(new_job_context())
        index = str(len(new.phases) - 1)
        if new.terminal or not new.phases:
            ctx.pop("phase_index", None)
            ctx.pop("phase_span_id", None)
        elif ctx.get("phase_index") != index:
            ctx.update(phase_index=index, phase_span_id=f"{telemetry.new_span_id():016x}")
        return new if ctx == new.trace_context else replace(new, trace_context=ctx)

    def written(self, old: Job, new: Job) -> None:
        """After `new` was written over `old`: emit the spans of the phases that closed, and the
        root when the job ended, and have the spans ended so far exported now."""
        self._current = dict(new.trace_context)
        if not self.on or "trace_id" not in new.trace_context:
            return
        closed = range(max(len(old.phases) - 1, 0), len(new.phases) - 1)
        for index in closed:
            recorded = old.trace_context if old.trace_context.get("phase_index") == str(index) else {}
            self._emit_phase(new, index, new.phases[index], recorded.get("phase_span_id", ""))
        ended = new.terminal and not old.terminal
        if ended:
            self._emit_root(new)
        if closed or ended or new.rounds > old.rounds:  # a recorded round's span ended just before
            telemetry.flush_soon()  # so that they outlive this process if it dies next

    def took_over(self, previous_epoch: int) -> None:
        """This runner continues a job another leader drove: noted on the open phase's span."""
        if self.on:
            self._events.append(("leader takeover", {"nvmigrate.previous_epoch": previous_epoch,
                                                     "nvmigrate.epoch": self.epoch}, time.time()))

    # ---- live spans ---------------------------------------------------------------------

    def call_parent(self) -> otel_context.Context | None:
        """The parent of an agent call made now: the running round, else the open phase."""
        if self._round is not None:
            return trace.set_span_in_context(self._round)
        if "phase_span_id" in self._current:
            return _span_context(self._current, "phase_span_id")
        return None

    def loaded(self, job: Job) -> None:
        """The runner read the job from etcd."""
        self._current = dict(job.trace_context)

    @contextlib.contextmanager
    def running(self) -> Iterator[None]:
        """While the runner drives the job, agent calls for it find their parent here."""
        if not self.on:
            yield
            return
        _RUNNING[self.job_id] = self
        try:
            yield
        finally:
            if _RUNNING.get(self.job_id) is self:
                del _RUNNING[self.job_id]

    @contextlib.contextmanager
    def round(self, job: Job, number: int) -> Iterator[RoundSpan]:
        """The span of dirty round `number`, ended when the block ends (an error marks it)."""
        if not self.on or "phase_span_id" not in job.trace_context:
            yield RoundSpan(trace.INVALID_SPAN)
            return
        span = telemetry.tracer().start_span(
            f"round {number}", context=_span_context(job.trace_context, "phase_span_id"), kind=SpanKind.INTERNAL,
            attributes={"nvmigrate.job_id": job.id, "nvmigrate.round": number,
                        "nvmigrate.throttle_percent": job.throttle_percent, "nvmigrate.epoch": self.epoch,
                        "nvmigrate.bandwidth_bytes_per_s": job.policy.bandwidth_bytes_per_s})
        self._round = span
        try:
            yield RoundSpan(span)
        except BaseException as exc:
            span.set_status(Status(StatusCode.ERROR, str(exc) or type(exc).__name__))
            raise
        finally:
            self._round = None
            span.end()

    # ---- emitting the recorded spans ----------------------------------------------------

    def _emit_phase(self, job: Job, index: int, entry: PhaseEntry, span_id_hex: str) -> None:
        following = job.phases[index + 1]
        end = entry.started_at + entry.duration_ms / 1000.0 if entry.duration_ms else following.started_at
        attributes: dict[str, AttributeValue] = {
            "nvmigrate.job_id": job.id, "nvmigrate.phase": entry.phase.value, "nvmigrate.bytes": entry.bytes,
            "nvmigrate.rounds": entry.rounds, "nvmigrate.epoch": self.epoch,
            "nvmigrate.duration_ms": entry.duration_ms}
        if entry.note:
            attributes["nvmigrate.note"] = entry.note
        if entry.phase in (Phase.PRECOPY, Phase.DIRTY_ITERATION):
            attributes.update({"nvmigrate.dirty_rate_bytes_per_s": job.dirty_rate_bytes_per_s,
                               "nvmigrate.throttle_percent": job.throttle_percent})
        if entry.phase is Phase.PREPARING and job.destination_node:
            attributes["nvmigrate.destination_node"] = job.destination_node
        if entry.phase is Phase.RESUMING:
            attributes.update({"nvmigrate.downtime_ms": job.downtime_ms,
                               "nvmigrate.guest_blackout_ms": job.guest_blackout_ms})
        failed = following.phase in _ERROR_ENDINGS
        status = Status(StatusCode.ERROR, job.reason) if failed else Status(StatusCode.UNSET)
        events, self._events = self._events, []
        self._emit(entry.phase.value, job, int(span_id_hex, 16) if span_id_hex else 0,
                   _span_context(job.trace_context, "span_id"), entry.started_at, end, attributes, status, events)

    def _emit_root(self, job: Job) -> None:
        ctx = job.trace_context
        attributes: dict[str, AttributeValue] = {
            "nvmigrate.job_id": job.id, "nvmigrate.controller_id": job.controller_id,
            "nvmigrate.source_node": job.source_node, "nvmigrate.destination_node": job.destination_node,
            "nvmigrate.outcome": job.phase.value, "nvmigrate.bytes": job.bytes_transferred,
            "nvmigrate.namespace_bytes": job.namespace_bytes, "nvmigrate.rounds": job.rounds,
            "nvmigrate.throttle_percent": job.throttle_percent,
            "nvmigrate.dirty_rate_bytes_per_s": job.dirty_rate_bytes_per_s,
            "nvmigrate.downtime_ms": job.downtime_ms, "nvmigrate.guest_blackout_ms": job.guest_blackout_ms,
            "nvmigrate.epoch": self.epoch}
        if job.reason:
            attributes["nvmigrate.reason"] = job.reason
        status = Status(StatusCode.ERROR, job.reason) if job.phase in _ERROR_ENDINGS else Status(StatusCode.UNSET)
        # An empty parent context makes it a root; _emit gives it the recorded trace id.
        self._emit(ROOT_SPAN_NAME, job, int(ctx["span_id"], 16), otel_context.Context(), job.created_at,
                   job.phases[-1].started_at if job.phases else job.updated_at, attributes, status, [])

    def _emit(self, name: str, job: Job, span_id: int, parent: otel_context.Context, start_s: float, end_s: float,
              attributes: dict[str, AttributeValue], status: Status,
              events: list[tuple[str, dict[str, AttributeValue], float]]) -> None:
        # The preset trace id only matters for the root: a child takes its parent's.
        with telemetry.preset_ids(int(job.trace_context["trace_id"], 16), span_id):
            span = telemetry.tracer().start_span(name, context=parent, start_time=_ns(start_s),
                                                 attributes=attributes)
        for event_name, event_attributes, at in events:
            span.add_event(event_name, event_attributes, timestamp=_ns(at))
        span.set_status(status)
        # Another leader's clock may run a little behind: never end before the start.
        span.end(end_time=max(_ns(end_s), _ns(start_s)))
