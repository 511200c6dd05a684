"""One trace per migration job: a root span for the job, a child span per phase, a span per dirty
round under DIRTY_ITERATION, and the agent calls: the orchestrator's CLIENT span and the agent's
SERVER span of each call, both children of the phase or round the call belongs to, the SERVER
span linked to its CLIENT span.

The trace lives in the job record (`Job.trace_context`), not in any one process: the root's ids
are chosen when the API accepts the job, and each phase's span id when the phase is entered, in
the same etcd write. Whoever closes a phase emits its span under the recorded id with the
recorded start time, and whoever ends the job emits the root. A round's span id is derived from
the trace id, its phase's span id and its number (`round_span_id`); its span is emitted with the
write that records the round, or with the one that closes the phase without it (a failed round).

How the trace survives losing the leader, killed at any moment:
- Spans that ended do not wait in the dying process's export buffer: each job write that emitted
  spans asks for a flush (`telemetry.flush_soon`), which runs beside the job, never in its way.
- The phase open at the kill is closed, and its span emitted, by the new leader: the same span
  id and start time, with an event saying who took over.
- The round in flight at the kill is run again by the new leader under the same number (the agent
  attaches the repeated DirtyRound to the work in flight), so the round span it emits has the id
  the agent's spans of the old leader's call already point to.
- Agents' spans are children of the phase or round (their `traceparent`), not of the
  orchestrator's CLIENT span, which a killed caller never exports; they link to it instead.
What remains: spans that end in the few milliseconds between a write landing in etcd and its
flush reaching the collector (among them the phase span that write closed) are lost with the
process; and a round in flight at the kill that the new leader never runs again (the job is
cancelled or passes its deadline first) leaves the old call's agent span without its parent.

After COMPLETED the job's verification (`verifier`) is a span `verification` under the root,
whose id every leader derives from the trace id (`verification_span_id`): the verifier's agent
calls (the digests, the source's release) go under it, and it is emitted with the verdict.

trace_context keys: trace_id (32 hex), span_id (the root's, 16 hex), sampled ('1'/'0'),
phase_index and phase_span_id (the open phase and its span's id).
"""

from __future__ import annotations

import contextlib
import hashlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import NonRecordingSpan, SpanContext, Status, StatusCode, TraceFlags
from opentelemetry.util.types import AttributeValue

from cluster import telemetry
from orchestrator.jobs import Job, Phase, PhaseEntry, Verification

ROOT_SPAN_NAME = "migration"
VERIFICATION_SPAN_NAME = "verification"
# Outcomes that mean the migration did not do its job; CANCELLED was asked for, so it is no error.
_ERROR_ENDINGS = frozenset({Phase.FAILED, Phase.ROLLED_BACK})


def new_job_context() -> dict[str, str]:
    """The trace context of a job being created: its root span's ids ({} while tracing is off)."""
    if not telemetry.tracing_enabled():
        return {}
    trace_id, span_id, sampled = telemetry.new_ids()
    return {"trace_id": f"{trace_id:032x}", "span_id": f"{span_id:016x}", "sampled": "1" if sampled else "0"}


def round_span_id(trace_id: str, phase_span_id: str, number: int) -> int:
    """The span id of dirty round `number` of the phase whose span id is `phase_span_id` (both
    hex, as in the job record). Every orchestrator derives the same id, so a new leader that runs
    again the round the old one had in flight emits the span the agent's spans already point to."""
    digest = hashlib.sha256(f"{trace_id.lower()}/{phase_span_id.lower()}/round {number}".encode()).digest()
    return int.from_bytes(digest[:8], "big") or 1  # 0 is the invalid span id


def verification_span_id(trace_id: str) -> int:
    """The span id of a job's verification: the same on every leader, so calls made before a
    leader change keep their parent."""
    digest = hashlib.sha256(f"{trace_id.lower()}/verification".encode()).digest()
    return int.from_bytes(digest[:8], "big") or 1


def _ns(unix_s: float) -> int:
    return int(unix_s * 1e9)


def _remote(trace_context: dict[str, str], span_id: int) -> otel_context.Context:
    """A context whose current span is the (not yet emitted) span `span_id` of the job's trace."""
    flags = TraceFlags(TraceFlags.SAMPLED if trace_context.get("sampled", "1") == "1" else TraceFlags.DEFAULT)
    parent = SpanContext(int(trace_context["trace_id"], 16), span_id, is_remote=True, trace_flags=flags)
    return trace.set_span_in_context(NonRecordingSpan(parent))


def _span_context(trace_context: dict[str, str], span_key: str) -> otel_context.Context:
    return _remote(trace_context, int(trace_context[span_key], 16))


_RUNNING: dict[str, JobTrace] = {}  # job id -> the trace of the runner driving it in this process
_VERIFYING: dict[str, otel_context.Context] = {}  # job id -> its verification span, while being checked


def call_parent(job_id: str) -> otel_context.Context | None:
    """For the agent channels' interceptor: where a call for this job belongs in its trace."""
    running = _RUNNING.get(job_id)
    if running is not None:
        return running.call_parent()
    return _VERIFYING.get(job_id)


@contextlib.contextmanager
def verifying(job: Job) -> Iterator[None]:
    """While the verifier calls agents about `job`: the calls go under its verification span."""
    ctx = job.trace_context
    if not telemetry.tracing_enabled() or "trace_id" not in ctx:
        yield
        return
    _VERIFYING[job.id] = _remote(ctx, verification_span_id(ctx["trace_id"]))
    try:
        yield
    finally:
        _VERIFYING.pop(job.id, None)


def verification_settled(job: Job) -> None:
    """The verdict of `job` was written: emit its verification span (an error when it failed)."""
    ctx = job.trace_context
    if not telemetry.tracing_enabled() or "trace_id" not in ctx or "span_id" not in ctx:
        return
    completed_at = job.phases[-1].started_at if job.phases else job.updated_at
    attributes: dict[str, AttributeValue] = {
        "nvmigrate.job_id": job.id, "nvmigrate.verification": job.verification.value,
        "nvmigrate.source_digest": job.source_digest, "nvmigrate.destination_digest": job.destination_digest}
    failed = job.verification is Verification.FAILED
    if job.verification_note:
        attributes["nvmigrate.note"] = job.verification_note
    status = Status(StatusCode.ERROR, job.verification_note) if failed else Status(StatusCode.UNSET)
    _emit(VERIFICATION_SPAN_NAME, ctx["trace_id"], verification_span_id(ctx["trace_id"]),
          _span_context(ctx, "span_id"), completed_at, job.updated_at, attributes, status, [])
    telemetry.flush_soon()


@dataclass
class RoundSpan:
    """Dirty round `number`: recorded while it runs, emitted by `JobTrace.written` once a write
    settles it. `result` adds what the source reported (a TransferResult). Inert (span_id 0)
    while tracing is off."""

    number: int
    span_id: int = 0
    parent: dict[str, str] = field(default_factory=dict)  # the trace_context the round began under
    started_at: float = 0.0
    ended_at: float | None = None
    attributes: dict[str, AttributeValue] = field(default_factory=dict)
    status: Status = field(default_factory=Status)

    def result(self, result: Any) -> None:
        if not self.span_id:
            return
        self.attributes.update({
            "nvmigrate.bytes": int(result.bytes_sent), "nvmigrate.round_duration_s": float(result.duration_s),
            "nvmigrate.dirty_bytes_remaining": int(result.dirty_bytes_remaining),
            "nvmigrate.dirty_rate_bytes_per_s": float(result.dirty_rate_bytes_per_s)})


@dataclass
class JobTrace:
    """The spans of one job as one runner sees them. Every method is a no-op while tracing is off."""

    job_id: str
    epoch: int
    _round: RoundSpan | None = None  # the round running now: agent calls go under it
    _unsent: list[RoundSpan] = field(default_factory=list)  # rounds over, waiting for the write that settles them
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
        """After `new` was written over `old`: emit the spans this write settled (the rounds it
        records, the phases it closes, the root when the job ended) and have them exported now."""
        known, self._current = self._current, dict(new.trace_context)
        if not self.on or "trace_id" not in new.trace_context:
            return
        phase_changed = len(new.phases) > len(old.phases)
        settled = [r for r in self._unsent if r.ended_at is not None and (new.rounds >= r.number or phase_changed)]
        for done in settled:
            self._unsent.remove(done)
            self._emit_round(done)
        closed = self._closed_phases(known, old, new)
        for index, span_id_hex in closed:
            self._emit_phase(new, index, new.phases[index], span_id_hex)
        ended = new.terminal and not old.terminal
        if ended:
            self._emit_root(new)
        if settled or closed or ended:
            telemetry.flush_soon()  # so that they outlive this process if it dies next

    def took_over(self, previous_epoch: int) -> None:
        """This runner continues a job another leader drove: noted on the open phase's span."""
        if self.on:
            self._events.append(("leader takeover", {"nvmigrate.previous_epoch": previous_epoch,
                                                     "nvmigrate.epoch": self.epoch}, time.time()))

    def over_budget(self, message: str) -> None:
        """The switchover broke its downtime budget: an event on the open (RESUMING) phase's span."""
        if self.on:
            self._events.append(("downtime budget exceeded", {"nvmigrate.message": message}, time.time()))

    # ---- live spans ---------------------------------------------------------------------

    def call_parent(self) -> otel_context.Context | None:
        """The parent of an agent call made now: the running round, else the open phase."""
        if self._round is not None:
            return _remote(self._round.parent, self._round.span_id)
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
        """Dirty round `number` while the block runs (an error marks it); its span goes out with
        the write that records the round, or that closes the phase without it."""
        ctx = job.trace_context
        if not self.on or "phase_span_id" not in ctx or "trace_id" not in ctx:
            yield RoundSpan(number)
            return
        span = RoundSpan(number, round_span_id(ctx["trace_id"], ctx["phase_span_id"], number), dict(ctx),
                         time.time(), attributes={
                             "nvmigrate.job_id": job.id, "nvmigrate.round": number,
                             "nvmigrate.throttle_percent": job.throttle_percent, "nvmigrate.epoch": self.epoch,
                             "nvmigrate.bandwidth_bytes_per_s": job.policy.bandwidth_bytes_per_s})
        self._round = span
        try:
            yield span
        except BaseException as exc:
            span.status = Status(StatusCode.ERROR, str(exc) or type(exc).__name__)
            raise
        finally:
            self._round = None
            span.ended_at = time.time()
            self._unsent.append(span)

    # ---- emitting the recorded spans ----------------------------------------------------

    @staticmethod
    def _closed_phases(known: dict[str, str], old: Job, new: Job) -> list[tuple[int, str]]:
        """(index, recorded span id) of each phase the write of `new` over `old` closed. Counted
        from the phase this trace last knew open (`known`), in case a write of the runner's
        landed without `written` hearing of it (a commit whose reply was lost)."""
        first = len(old.phases) - 1
        if known.get("trace_id") == new.trace_context.get("trace_id") and known.get("phase_index", "").isdigit():
            first = min(first, int(known["phase_index"]))
        recorded = {ctx["phase_index"]: ctx["phase_span_id"] for ctx in (known, old.trace_context)
                    if "phase_index" in ctx and "phase_span_id" in ctx}
        return [(index, recorded.get(str(index), "")) for index in range(max(first, 0), len(new.phases) - 1)]

    def _emit_round(self, span: RoundSpan) -> None:
        assert span.ended_at is not None
        _emit(f"round {span.number}", span.parent["trace_id"], span.span_id,
              _span_context(span.parent, "phase_span_id"), span.started_at, span.ended_at, span.attributes,
              span.status, [])

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
                               "nvmigrate.guest_blackout_ms": job.guest_blackout_ms,
                               "nvmigrate.predicted_downtime_ms": job.predicted_downtime_ms,
                               "nvmigrate.downtime_budget_exceeded": job.downtime_budget_exceeded})
        failed = following.phase in _ERROR_ENDINGS
        status = Status(StatusCode.ERROR, job.reason) if failed else Status(StatusCode.UNSET)
        events, self._events = self._events, []
        _emit(entry.phase.value, job.trace_context["trace_id"], int(span_id_hex, 16) if span_id_hex else 0,
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
            "nvmigrate.downtime_budget_exceeded": job.downtime_budget_exceeded, "nvmigrate.epoch": self.epoch}
        if job.reason:
            attributes["nvmigrate.reason"] = job.reason
        status = Status(StatusCode.ERROR, job.reason) if job.phase in _ERROR_ENDINGS else Status(StatusCode.UNSET)
        # An empty parent context makes it a root; _emit gives it the recorded trace id.
        _emit(ROOT_SPAN_NAME, ctx["trace_id"], int(ctx["span_id"], 16), otel_context.Context(), job.created_at,
              job.phases[-1].started_at if job.phases else job.updated_at, attributes, status, [])


def _emit(name: str, trace_id: str, span_id: int, parent: otel_context.Context, start_s: float, end_s: float,
          attributes: dict[str, AttributeValue], status: Status,
          events: list[tuple[str, dict[str, AttributeValue], float]]) -> None:
    # The preset trace id only matters for the root: a child takes its parent's.
    with telemetry.preset_ids(int(trace_id, 16), span_id):
        span = telemetry.tracer().start_span(name, context=parent, start_time=_ns(start_s),
                                             attributes=attributes)
    for event_name, event_attributes, at in events:
        span.add_event(event_name, event_attributes, timestamp=_ns(at))
    span.set_status(status)
    # Another leader's clock may run a little behind: never end before the start.
    span.end(end_time=max(_ns(end_s), _ns(start_s)))
