"""The migration job and its state machine: pure (no I/O, the clock is passed in).

A Job is frozen; every change returns a new Job. The runner persists each new Job with a
compare-and-swap before it acts on it, so what etcd holds is always the phase being worked on.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, fields, replace
from enum import StrEnum
from typing import Any


class Phase(StrEnum):
    PENDING = "PENDING"
    PREPARING = "PREPARING"
    PRECOPY = "PRECOPY"
    DIRTY_ITERATION = "DIRTY_ITERATION"
    STOP_AND_COPY = "STOP_AND_COPY"
    COMMIT = "COMMIT"
    RESUMING = "RESUMING"
    COMPLETED = "COMPLETED"
    ROLLED_BACK = "ROLLED_BACK"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"


TERMINAL = frozenset({Phase.COMPLETED, Phase.ROLLED_BACK, Phase.FAILED, Phase.CANCELLED})
# Before COMMIT the source still owns the controller: failure or cancel rolls back to it.
BEFORE_COMMIT = frozenset({Phase.PENDING, Phase.PREPARING, Phase.PRECOPY, Phase.DIRTY_ITERATION,
                           Phase.STOP_AND_COPY})

_ENDINGS = frozenset({Phase.ROLLED_BACK, Phase.FAILED, Phase.CANCELLED})
ALLOWED: dict[Phase, frozenset[Phase]] = {
    Phase.PENDING: frozenset({Phase.PREPARING}) | _ENDINGS,
    # PREPARING again: the destination was lost, another one is chosen.
    Phase.PREPARING: frozenset({Phase.PRECOPY, Phase.PREPARING}) | _ENDINGS,
    Phase.PRECOPY: frozenset({Phase.DIRTY_ITERATION, Phase.PREPARING}) | _ENDINGS,
    Phase.DIRTY_ITERATION: frozenset({Phase.STOP_AND_COPY, Phase.PREPARING}) | _ENDINGS,
    Phase.STOP_AND_COPY: frozenset({Phase.COMMIT}) | _ENDINGS,
    # After COMMIT the destination owns the controller. The one way back is for a destination
    # lost before it ever ran it (it never claimed RUNNING in etcd; see EtcdStore.move_back).
    Phase.COMMIT: frozenset({Phase.RESUMING}),
    Phase.RESUMING: frozenset({Phase.COMPLETED, Phase.FAILED, Phase.ROLLED_BACK}),
    Phase.COMPLETED: frozenset(),
    Phase.ROLLED_BACK: frozenset(),
    Phase.FAILED: frozenset(),
    Phase.CANCELLED: frozenset(),
}


class IllegalPhaseChange(Exception):
    pass


class Verification(StrEnum):
    """Whether the destination's namespace was checked against the source's at switchover.

    It runs after COMPLETED (the controller already runs on the destination), so hashing a large
    namespace never holds the job open; the source copy is kept until it passes."""

    NONE = ""  # not started: the job has not completed
    PENDING = "PENDING"
    PASSED = "PASSED"
    FAILED = "FAILED"


class OnNoConvergence(StrEnum):
    THROTTLE = "THROTTLE"
    ABORT = "ABORT"
    FORCE = "FORCE"


@dataclass(frozen=True)
class Policy:
    max_downtime_ms: int = 50
    max_rounds: int = 30
    bandwidth_bytes_per_s: int = 0  # 0: unlimited
    on_no_convergence: OnNoConvergence = OnNoConvergence.THROTTLE


@dataclass(frozen=True)
class PhaseEntry:
    phase: Phase
    started_at: float
    duration_ms: float = 0.0
    bytes: int = 0
    rounds: int = 0
    note: str = ""


# How long a job may have gone unwatched (no runner saving it, e.g. between two leaders) that an
# orchestrator believes its wall clock about; a step of the clock cannot age a job more than this.
MAX_UNWATCHED_GAP_S = 30.0


def since_wall(wall_now: float, then: float) -> float:
    """Seconds from a wall-clock time in a record to now, clamped to [0, MAX_UNWATCHED_GAP_S]."""
    return min(max(0.0, wall_now - then), MAX_UNWATCHED_GAP_S)


@dataclass(frozen=True)
class Job:
    """A migration job; `pending_job` makes a new one."""

    id: str
    controller_id: str
    source_node: str
    namespace_bytes: int
    policy: Policy
    created_at: float
    destination_node: str = ""
    requested_destination: str = ""
    phase: Phase = Phase.PENDING
    reason: str = ""
    phases: tuple[PhaseEntry, ...] = ()
    epoch: int = 0
    cancel_requested: bool = False
    bytes_transferred: int = 0
    rounds: int = 0
    throttle_percent: int = 0
    dirty_rate_bytes_per_s: float = 0.0
    updated_at: float = 0.0
    destination_data_address: str = ""
    destination_token: str = ""
    excluded_destinations: tuple[str, ...] = ()
    source_digest: str = ""
    destination_digest: str = ""
    downtime_ms: float = 0.0
    guest_blackout_ms: float = 0.0
    # The switchover the convergence policy predicted when it chose stop-and-copy, and whether
    # what was measured (switchover or guest blackout) broke the policy's downtime budget.
    predicted_downtime_ms: float = 0.0
    downtime_budget_exceeded: bool = False
    trace_context: dict[str, str] = field(default_factory=dict)
    # Bytes sent to destinations that were replaced; the current attempt's come on top of these.
    attempt_base_bytes: int = 0
    verification: Verification = Verification.NONE
    verification_note: str = ""
    # Seconds the job has existed as the orchestrators that drove it measured on their monotonic
    # clocks, written with every save; a wall-clock step does not move it. -1: an older record.
    age_s: float = -1.0
    # Dirty bytes the source still had to send after its last step (precopy or a round), as it
    # measured them; -1 before any step measured it.
    remaining_bytes: int = -1

    @property
    def terminal(self) -> bool:
        return self.phase in TERMINAL

    def enter(self, phase: Phase, now: float, note: str = "") -> Job:
        """Moves to the next phase, closing the timing of the current one."""
        if phase not in ALLOWED[self.phase]:
            raise IllegalPhaseChange(f"job {self.id}: {self.phase} -> {phase} is not allowed")
        closed = self._close_current(now)
        entry = PhaseEntry(phase=phase, started_at=now, note=note)
        return _changed(self, phase=phase, phases=(*closed, entry), updated_at=now)

    def end(self, phase: Phase, now: float, reason: str) -> Job:
        if phase not in TERMINAL:
            raise IllegalPhaseChange(f"job {self.id}: {phase} is not a terminal phase")
        ended = self.enter(phase, now, note=reason)
        verification = Verification.PENDING if phase is Phase.COMPLETED else Verification.NONE
        return _changed(ended, reason=reason, verification=verification)

    def _close_current(self, now: float) -> tuple[PhaseEntry, ...]:
        if not self.phases:
            return ()
        last = self.phases[-1]
        if last.duration_ms:
            return self.phases
        return (*self.phases[:-1], replace(last, duration_ms=max(0.0, (now - last.started_at) * 1000.0)))

    def with_phase_duration(self, index: int, duration_ms: float) -> Job:
        """The closed phase `index` as measured on a monotonic clock (the wall clock may step)."""
        entry = self.phases[index]
        phases = (*self.phases[:index], replace(entry, duration_ms=max(0.0, duration_ms)), *self.phases[index + 1:])
        return _changed(self, phases=phases)

    def with_phase_bytes(self, index: int, add_bytes: int) -> Job:
        """What phase `index` moved, learnt after later phases began (a stop-and-copy's last
        bytes, reported with the commit that entered COMMIT and RESUMING)."""
        entry = self.phases[index]
        phases = (*self.phases[:index], replace(entry, bytes=entry.bytes + add_bytes), *self.phases[index + 1:])
        return _changed(self, phases=phases)

    def remaining(self, remaining_bytes: int, now: float) -> Job:
        """What the source measured it still had to send after a step."""
        return _changed(self, remaining_bytes=max(0, remaining_bytes), updated_at=now)

    def record(self, now: float, *, add_bytes: int = 0, add_rounds: int = 0, note: str | None = None) -> Job:
        """Adds what a step moved to the current phase (and rounds to the total)."""
        phases = self.phases
        if phases:
            last = phases[-1]
            last = replace(last, bytes=last.bytes + add_bytes, rounds=last.rounds + add_rounds,
                           note=last.note if note is None else note)
            phases = (*phases[:-1], last)
        return _changed(self, phases=phases, rounds=self.rounds + add_rounds, updated_at=now)

    # ---- named changes: each says what happened ----------------------------------------------

    def taken_over(self, epoch: int, now: float) -> Job:
        """A new leader (orchestrator epoch) drives the job from now on."""
        return _changed(self, epoch=epoch, updated_at=now)

    def cancel_asked(self, now: float) -> Job:
        """The operator asked to cancel; the runner rolls back at its next step (before COMMIT)."""
        return _changed(self, cancel_requested=True, updated_at=now)

    def destination_chosen(self, node: str, now: float) -> Job:
        earlier = self.phases[-1].note if self.phases else ""
        note = f"{earlier}; destination {node}" if earlier else f"destination {node}"
        return self.record(now, note=note)._with_destination(node, "", "")

    def destination_prepared(self, data_address: str, token: str, now: float) -> Job:
        """The destination made an empty controller and a data-plane endpoint with a one-time token."""
        return _changed(self._with_destination(self.destination_node, data_address, token), updated_at=now)

    def without_destination(self, now: float) -> Job:
        """The destination is given up before any data went there (it did not answer PREPARING);
        it is excluded from the next choice."""
        return _changed(self._with_destination("", "", ""), excluded_destinations=self._excluding_destination(),
                       updated_at=now)

    def destination_replaced(self, reason: str, now: float) -> Job:
        """The destination was lost before COMMIT: back to PREPARING for another one; precopy
        starts over, and what was sent to the lost one stays counted."""
        lost = self.destination_node
        job = _changed(self._with_destination("", "", ""), excluded_destinations=self._excluding_destination(),
                      throttle_percent=0, attempt_base_bytes=self.bytes_transferred)
        return job.enter(Phase.PREPARING, now, note=f"destination {lost} lost ({reason}); choosing another")

    def _with_destination(self, node: str, data_address: str, token: str) -> Job:
        return _changed(self, destination_node=node, destination_data_address=data_address,
                       destination_token=token)

    def _excluding_destination(self) -> tuple[str, ...]:
        if not self.destination_node or self.destination_node in self.excluded_destinations:
            return self.excluded_destinations
        return (*self.excluded_destinations, self.destination_node)

    def progressed(self, attempt_bytes_sent: int, now: float) -> Job:
        """The source reports `attempt_bytes_sent` for the current destination: the total only grows."""
        total = max(self.bytes_transferred, self.attempt_base_bytes + attempt_bytes_sent)
        return self if total == self.bytes_transferred else _changed(self, bytes_transferred=total, updated_at=now)

    def round_measured(self, dirty_rate_bytes_per_s: float, now: float) -> Job:
        return _changed(self, dirty_rate_bytes_per_s=dirty_rate_bytes_per_s, updated_at=now)

    def throttled(self, throttle_percent: int, reason: str, now: float) -> Job:
        """Auto-converge: the guest is slowed to let the rounds catch up."""
        return _changed(self.record(now, note=reason), throttle_percent=throttle_percent)

    def switched_over(self, downtime_ms: float, guest_blackout_ms: float, now: float) -> Job:
        """The destination runs the controller: what the switchover cost, as measured, and
        whether that broke the downtime budget."""
        exceeded = max(downtime_ms, guest_blackout_ms) > self.policy.max_downtime_ms
        return _changed(self, downtime_ms=round(downtime_ms, 3), guest_blackout_ms=guest_blackout_ms,
                       downtime_budget_exceeded=exceeded, updated_at=now)

    def predicted(self, downtime_ms: float) -> Job:
        """The switchover the policy expects as it stops the guest (inf, when it cannot tell: 0)."""
        return _changed(self, predicted_downtime_ms=round(downtime_ms, 3) if downtime_ms < float("inf") else 0.0)

    def verified(self, source_digest: str, destination_digest: str, now: float) -> Job:
        """Verification passed: the destination's namespace is the source's at switchover."""
        return _changed(self, verification=Verification.PASSED, source_digest=source_digest,
                       destination_digest=destination_digest, verification_note="", updated_at=now)

    def verification_failed(self, why: str, source_digest: str, destination_digest: str, now: float) -> Job:
        return _changed(self, verification=Verification.FAILED, source_digest=source_digest,
                       destination_digest=destination_digest, verification_note=why, updated_at=now)

    def aged(self, age_s: float) -> Job:
        return _changed(self, age_s=round(age_s, 3))

    def age_at_load(self, wall_now: float) -> float:
        """The job's age for an orchestrator that just read it: the age last written plus the time
        since that write. That gap can only be read off the wall clock, which may have stepped
        (NTP, an operator), so it counts between 0 and MAX_UNWATCHED_GAP_S."""
        if self.age_s < 0:  # written before ages were kept
            return since_wall(wall_now, self.created_at)
        return self.age_s + since_wall(wall_now, self.updated_at)

    # ---- persistence --------------------------------------------------------------------

    def to_bytes(self) -> bytes:
        """The record kept in etcd: JSON, keys sorted, byte for byte what `dataclasses.asdict` gave
        (tests/test_jobs.py holds it to that). Built from the fields directly: asdict deep-copies
        every value, and was 5 % of the orchestrator's samples at 500 jobs in flight."""
        data = dict(self.__dict__)
        data["policy"] = dict(self.policy.__dict__)
        data["phases"] = [dict(entry.__dict__) for entry in self.phases]
        return json.dumps(data, sort_keys=True).encode()

    @classmethod
    def from_bytes(cls, raw: bytes) -> Job:
        data: dict[str, Any] = json.loads(raw)
        pol = data.pop("policy")
        data["policy"] = Policy(**{**pol, "on_no_convergence": OnNoConvergence(pol["on_no_convergence"])})
        data["phase"] = _phase(data["phase"])
        data["phases"] = tuple(PhaseEntry(**{**p, "phase": _phase(p["phase"])}) for p in data["phases"])
        data["excluded_destinations"] = tuple(data.get("excluded_destinations", ()))
        data["verification"] = Verification(data.get("verification", ""))
        return cls(**data)


_PHASES: dict[str, Phase] = {p.value: p for p in Phase}


def _phase(name: str) -> Phase:
    """Phase(name) without the enum machinery's cost (a record holds a dozen); ValueError as it."""
    return _PHASES.get(name) or Phase(name)


class ParsedJobs:
    """Job records parsed once per distinct record: periodic scans over every job (the reconciler,
    the verifier) find mostly unchanged records. Holds the last listing's records only."""

    def __init__(self) -> None:
        self._last: dict[bytes, Job] = {}

    def parse(self, records: Iterable[bytes]) -> list[Job]:
        seen: dict[bytes, Job] = {}
        for raw in records:
            job = self._last.get(raw)
            seen[raw] = job if job is not None else Job.from_bytes(raw)
        self._last = seen
        return list(seen.values())


_JOB_FIELDS = frozenset(f.name for f in fields(Job))


def _changed(job: Job, **changes: Any) -> Job:
    """`dataclasses.replace` for a Job, without its generated __init__ (three dozen fields, each
    set through object.__setattr__ as the class is frozen; it was 5 % of the orchestrator's
    samples at 500 jobs in flight): a job changes several times a step. The same result, as Job
    has no __post_init__ and no field whose default must be made anew."""
    unknown = changes.keys() - _JOB_FIELDS
    if unknown:
        raise TypeError(f"Job has no field(s) {sorted(unknown)}")
    new = object.__new__(Job)
    new.__dict__.update(job.__dict__, **changes)
    return new


# The leader's view of a job it drives, with progress its runner has not written yet (it writes it
# every few seconds), if etcd's record is still at the revision given; None anywhere else.
LiveJob = Callable[[str, int], "Job | None"]


def shown(record: Job, revision: int, live: LiveJob | None) -> Job:
    """What to show of a job read from etcd at `revision`: the leader's live view where it has one."""
    newer = live(record.id, revision) if live is not None else None
    return newer if newer is not None and newer.id == record.id else record


def pending_job(job_id: str, *, controller_id: str, source_node: str, namespace_bytes: int, policy: Policy,
                now: float, requested_destination: str = "", trace_context: dict[str, str] | None = None) -> Job:
    """A job as it is created (PENDING), by the API and by evacuations alike."""
    return Job(id=job_id, controller_id=controller_id, source_node=source_node, namespace_bytes=namespace_bytes,
               policy=policy, created_at=now, updated_at=now, requested_destination=requested_destination,
               phases=(PhaseEntry(Phase.PENDING, now),), trace_context=dict(trace_context or {}))
