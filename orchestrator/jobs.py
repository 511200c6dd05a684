"""The migration job and its state machine: pure (no I/O, the clock is passed in).

A Job is frozen; every change returns a new Job. The runner persists each new Job with a
compare-and-swap before it acts on it, so what etcd holds is always the phase being worked on.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
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


@dataclass(frozen=True)
class Job:
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
    trace_context: dict[str, str] = field(default_factory=dict)

    @property
    def terminal(self) -> bool:
        return self.phase in TERMINAL

    def enter(self, phase: Phase, now: float, note: str = "") -> Job:
        """Moves to the next phase, closing the timing of the current one."""
        if phase not in ALLOWED[self.phase]:
            raise IllegalPhaseChange(f"job {self.id}: {self.phase} -> {phase} is not allowed")
        closed = self._close_current(now)
        entry = PhaseEntry(phase=phase, started_at=now, note=note)
        return replace(self, phase=phase, phases=(*closed, entry), updated_at=now)

    def end(self, phase: Phase, now: float, reason: str) -> Job:
        if phase not in TERMINAL:
            raise IllegalPhaseChange(f"job {self.id}: {phase} is not a terminal phase")
        ended = self.enter(phase, now, note=reason)
        return replace(ended, reason=reason)

    def _close_current(self, now: float) -> tuple[PhaseEntry, ...]:
        if not self.phases:
            return ()
        last = self.phases[-1]
        if last.duration_ms:
            return self.phases
        return (*self.phases[:-1], replace(last, duration_ms=max(0.0, (now - last.started_at) * 1000.0)))

    def record(self, now: float, *, add_bytes: int = 0, add_rounds: int = 0, note: str | None = None,
               **fields: Any) -> Job:
        """Adds bytes and rounds to the current phase and the totals; sets other fields."""
        phases = self.phases
        if phases:
            last = phases[-1]
            last = replace(last, bytes=last.bytes + add_bytes, rounds=last.rounds + add_rounds,
                           note=last.note if note is None else note)
            phases = (*phases[:-1], last)
        return replace(self, phases=phases, bytes_transferred=self.bytes_transferred + add_bytes,
                       rounds=self.rounds + add_rounds, updated_at=now, **fields)

    def with_fields(self, now: float, **fields: Any) -> Job:
        return replace(self, updated_at=now, **fields)

    # ---- persistence --------------------------------------------------------------------

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def from_bytes(cls, raw: bytes) -> Job:
        data: dict[str, Any] = json.loads(raw)
        pol = data.pop("policy")
        data["policy"] = Policy(**{**pol, "on_no_convergence": OnNoConvergence(pol["on_no_convergence"])})
        data["phase"] = Phase(data["phase"])
        data["phases"] = tuple(PhaseEntry(**{**p, "phase": Phase(p["phase"])}) for p in data["phases"])
        data["excluded_destinations"] = tuple(data.get("excluded_destinations", ()))
        return cls(**data)
