"""Node evacuation: which migrations to start now. Pure: records in, a decision out, no I/O.

An evacuation moves every controller off one node (cordoned first, so nothing new lands there).
The leader calls `step` on every tick with what etcd holds: the live nodes, the controller
records, the jobs and the evacuations not yet ended. `step` returns the evacuation records as
they should now be (attempts that ended, states) and the migrations to start, within limits:

- at most `cluster` migrations in flight at once (every job counts, not only evacuations'),
- at most `outbound_per_node` leaving one node and `inbound_per_node` arriving at one node,
- strict priority between evacuations (PREDICTED_FAILURE, then MANUAL, then REBALANCE), and
  round-robin between evacuations of one priority: each takes one migration in turn, the one that
  started a migration longest ago first, so one draining node does not starve another,
- never onto a cordoned node, a node being evacuated, or one predicted to fail; the destination
  is the scheduler's choice (compatible, with room) among the rest.

A migration is started by recording its job id in the evacuation (CAS) and then creating the job
under that id (creation refuses an id that exists and a controller that already has a job), so a
new leader that finds a recorded id without a job creates that very job, and never a second one.
A controller whose migration ended without moving it is retried up to `max_attempts` times; then
the evacuation ends FAILED naming it, once nothing else of it is in flight.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from enum import StrEnum
from typing import Any

from cluster.records import COMMITTED, RUNNING, ControllerRecord, NodeRecord
from orchestrator import scheduler
from orchestrator.jobs import Job, Phase


class Reason(StrEnum):
    PREDICTED_FAILURE = "PREDICTED_FAILURE"
    MANUAL = "MANUAL"
    REBALANCE = "REBALANCE"


# Lower goes first.
PRIORITY: dict[Reason, int] = {Reason.PREDICTED_FAILURE: 0, Reason.MANUAL: 1, Reason.REBALANCE: 2}


class EvacuationState(StrEnum):
    PLANNED = "PLANNED"  # written, no migration started yet
    RUNNING = "RUNNING"
    DONE = "DONE"  # every controller left the node
    FAILED = "FAILED"  # a controller could not be moved (named in `failure`)
    CANCELLED = "CANCELLED"


ENDED = frozenset({EvacuationState.DONE, EvacuationState.FAILED, EvacuationState.CANCELLED})
DEFAULT_MAX_ATTEMPTS = 3


@dataclass(frozen=True)
class Limits:
    cluster: int = 5
    outbound_per_node: int = 2
    inbound_per_node: int = 2

    def problem(self) -> str | None:
        for name, value in asdict(self).items():
            if value < 1:
                return f"evacuation limit {name} must be at least 1, got {value}"
        return None


@dataclass(frozen=True)
class Attempt:
    job_id: str
    destination: str
    outcome: str = ""  # "" while in flight; then the job's terminal phase
    reason: str = ""  # why it ended, when it did not move the controller


@dataclass(frozen=True)
class ControllerMove:
    controller_id: str
    namespace_bytes: int
    attempts: tuple[Attempt, ...] = ()
    # "" until settled; MOVED (it left the node, its migration ended), GONE (deleted), GAVE_UP (attempts exhausted or
    # it cannot be migrated; `note` says why)
    result: str = ""
    note: str = ""

    @property
    def failed_attempts(self) -> int:
        return sum(1 for a in self.attempts if a.outcome and a.outcome != Phase.COMPLETED.value)

    @property
    def current(self) -> Attempt | None:
        return self.attempts[-1] if self.attempts and not self.attempts[-1].outcome else None


MOVED, GONE, GAVE_UP = "MOVED", "GONE", "GAVE_UP"


@dataclass(frozen=True)
class Evacuation:
    node: str
    reason: Reason
    created_at: float
    moves: tuple[ControllerMove, ...]
    state: EvacuationState = EvacuationState.PLANNED
    note: str = ""  # the operator's words (--reason)
    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    failure: str = ""
    updated_at: float = 0.0
    finished_at: float = 0.0
    last_started_at: float = 0.0  # when it last started a migration: round-robin order
    automatic: bool = False  # started by the health policy (counts against its storm guard)

    @property
    def ended(self) -> bool:
        return self.state in ENDED

    @property
    def priority(self) -> int:
        return PRIORITY[self.reason]

    def counts(self) -> dict[str, int]:
        """moved, in_flight, failed (gave up), waiting, total."""
        moved = sum(1 for m in self.moves if m.result in (MOVED, GONE))
        failed = sum(1 for m in self.moves if m.result == GAVE_UP)
        in_flight = sum(1 for m in self.moves if not m.result and m.current is not None)
        return {"moved": moved, "in_flight": in_flight, "failed": failed,
                "waiting": len(self.moves) - moved - failed - in_flight, "total": len(self.moves)}

    def move(self, controller_id: str) -> ControllerMove | None:
        return next((m for m in self.moves if m.controller_id == controller_id), None)

    def with_move(self, move: ControllerMove) -> Evacuation:
        return replace(self, moves=tuple(move if m.controller_id == move.controller_id else m for m in self.moves))

    def started(self, controller_id: str, job_id: str, destination: str, now: float) -> Evacuation:
        """A migration of `controller_id` is recorded (before its job is created)."""
        move = self.move(controller_id)
        if move is None:
            raise ValueError(f"controller {controller_id!r} is not part of the evacuation of {self.node!r}")
        moved = replace(move, attempts=(*move.attempts, Attempt(job_id, destination)))
        return replace(self.with_move(moved), state=EvacuationState.RUNNING, last_started_at=now, updated_at=now)

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def from_bytes(cls, raw: bytes) -> Evacuation:
        data: dict[str, Any] = json.loads(raw)
        data["reason"] = Reason(data["reason"])
        data["state"] = EvacuationState(data["state"])
        data["moves"] = tuple(
            ControllerMove(**{**m, "attempts": tuple(Attempt(**a) for a in m["attempts"])}) for m in data["moves"])
        return cls(**data)


def new_evacuation(node: str, reason: Reason, controllers: Iterable[ControllerRecord], now: float, *,
                   note: str = "", max_attempts: int = DEFAULT_MAX_ATTEMPTS, automatic: bool = False) -> Evacuation:
    """The evacuation of `node`: every controller etcd says it owns."""
    moves = tuple(ControllerMove(c.controller_id, c.namespace_bytes)
                  for c in sorted(controllers, key=lambda c: c.controller_id) if c.node == node)
    return Evacuation(node=node, reason=reason, created_at=now, moves=moves, note=note, max_attempts=max_attempts,
                      updated_at=now, automatic=automatic)


@dataclass(frozen=True)
class Start:
    """Start a migration: record `job_id` in the evacuation of `node`, then create the job. With
    `create_only` the id is recorded already (a leader stopped in between): only create it."""

    node: str
    controller_id: str
    destination: str
    job_id: str
    create_only: bool = False


@dataclass(frozen=True)
class Waiting:
    node: str
    controller_id: str
    why: str  # "outbound limit 2 reached on n1", "no destination: ..."


@dataclass(frozen=True)
class Decision:
    evacuations: tuple[Evacuation, ...]  # every evacuation given, as it should be now
    starts: tuple[Start, ...] = ()
    waiting: tuple[Waiting, ...] = ()
    placements: Mapping[str, scheduler.Placement] = field(default_factory=dict)  # per controller started

    def changed(self, before: Sequence[Evacuation]) -> list[Evacuation]:
        old = {e.node: e for e in before}
        return [e for e in self.evacuations if old.get(e.node) != e]


def _settle(ev: Evacuation, controllers: Mapping[str, ControllerRecord], jobs: Mapping[str, Job],
            active: Mapping[str, Job], now: float) -> Evacuation:
    """Brings the record up to date with what happened: attempts that ended, controllers that
    left, jobs found moving a controller that the record does not know of (adopted)."""
    moves = []
    for move in ev.moves:
        if move.result:
            moves.append(move)
            continue
        rec = controllers.get(move.controller_id)
        attempts = list(move.attempts)
        if attempts and not attempts[-1].outcome:
            job = jobs.get(attempts[-1].job_id)
            if job is not None and job.terminal:
                attempts[-1] = replace(attempts[-1], outcome=job.phase.value,
                                       reason="" if job.phase is Phase.COMPLETED else job.reason)
        running = active.get(move.controller_id)
        if running is not None and all(a.job_id != running.id for a in attempts):
            # Someone else's migration (or ours, created but not recorded before a failover).
            attempts.append(Attempt(running.id, running.destination_node or running.requested_destination))
        move = replace(move, attempts=tuple(attempts))
        # The controller record names the destination from COMMIT on, but the job may still be
        # resuming it there (and may yet hand it back): it has moved once its job has ended.
        resuming = move.current is not None and move.current.job_id in jobs
        if rec is None:
            move = replace(move, result=GONE, note="the controller no longer exists")
        elif rec.node != ev.node and not resuming:
            move = replace(move, result=MOVED, note=f"now on {rec.node}")
        elif move.current is None and move.failed_attempts >= ev.max_attempts:
            last = move.attempts[-1]
            move = replace(move, result=GAVE_UP,
                           note=f"{move.failed_attempts} migrations failed, the last ({last.job_id}) "
                                f"{last.outcome}: {last.reason}")
        elif move.current is None and rec.state not in (RUNNING, COMMITTED):
            move = replace(move, result=GAVE_UP, note=f"the controller is {rec.state}; it cannot be migrated")
        moves.append(move)
    ev = replace(ev, moves=tuple(moves))
    if ev.ended:
        return ev
    counts = ev.counts()
    if counts["in_flight"] == 0 and counts["waiting"] == 0:
        given_up = [m for m in ev.moves if m.result == GAVE_UP]
        if given_up:
            failure = "; ".join(f"{m.controller_id}: {m.note}" for m in given_up)
            return replace(ev, state=EvacuationState.FAILED, failure=failure, finished_at=now, updated_at=now)
        return replace(ev, state=EvacuationState.DONE, finished_at=now, updated_at=now)
    return ev


def step(evacuations: Sequence[Evacuation], *, nodes: Sequence[NodeRecord],
         controllers: Mapping[str, ControllerRecord], jobs: Mapping[str, Job], cordoned: Iterable[str],
         limits: Limits, now: float, new_job_id: Callable[[], str]) -> Decision:
    """What to do now; see the module docstring. `jobs`: every job etcd holds, by id (the
    active ones count against the limits); `new_job_id()` gives a fresh job id."""
    active = {j.controller_id: j for j in jobs.values() if not j.terminal}
    settled = [e if e.ended else _settle(e, controllers, jobs, active, now) for e in evacuations]
    live = {n.name: n for n in nodes}

    # In flight: every active job, and recorded attempts whose job does not exist yet.
    outbound: dict[str, int] = defaultdict(int)
    inbound: dict[str, int] = defaultdict(int)
    for job in active.values():
        outbound[job.source_node] += 1
        dest = job.destination_node or job.requested_destination
        if dest:
            inbound[dest] += 1
    in_flight = len(active)
    starts: list[Start] = []
    for ev in settled:
        if ev.ended:
            continue
        for move in ev.moves:
            cur = move.current
            if cur is not None and not move.result and cur.job_id not in jobs:
                starts.append(Start(ev.node, move.controller_id, cur.destination, cur.job_id, create_only=True))
                in_flight += 1
                outbound[ev.node] += 1
                inbound[cur.destination] += 1

    draining = {e.node: ("predicted to fail" if e.reason is Reason.PREDICTED_FAILURE else "being evacuated")
                for e in settled if not e.ended}
    cordoned = set(cordoned)
    waiting: list[Waiting] = []
    placements: dict[str, scheduler.Placement] = {}
    by_node = {e.node: e for e in settled}
    queues: dict[str, list[ControllerMove]] = {}
    for ev in settled:
        if ev.ended:
            continue
        ready = []
        for move in ev.moves:
            rec = controllers.get(move.controller_id)
            if move.result or move.current is not None or rec is None:
                continue
            if rec.state != RUNNING:
                waiting.append(Waiting(ev.node, move.controller_id, f"the controller is {rec.state}"))
                continue
            ready.append(move)
        queues[ev.node] = ready

    order = sorted((e for e in settled if not e.ended),
                   key=lambda e: (e.priority, e.last_started_at, e.created_at, e.node))
    for priority in sorted({e.priority for e in order}):
        turn = [e.node for e in order if e.priority == priority]
        while turn:
            still = []
            for name in turn:
                queue = queues[name]
                if not queue:
                    continue
                move = queue[0]
                if name not in live:
                    why = f"node {name!r} is not live; its controllers cannot be copied off it"
                elif in_flight >= limits.cluster:
                    why = f"cluster limit of {limits.cluster} migrations in flight reached"
                elif outbound[name] >= limits.outbound_per_node:
                    why = f"outbound limit {limits.outbound_per_node} reached on {name}"
                else:
                    why = ""
                if why:
                    waiting.extend(Waiting(name, m.controller_id, why) for m in queue)
                    queue.clear()
                    continue
                queue.pop(0)
                unavailable = {n: w for n, w in draining.items() if n != name}
                for n, count in inbound.items():
                    if count >= limits.inbound_per_node and n not in unavailable:
                        unavailable[n] = f"inbound limit {limits.inbound_per_node} reached"
                placement = scheduler.choose_destination(list(live.values()), source=name,
                                                         namespace_bytes=move.namespace_bytes, cordoned=cordoned,
                                                         unavailable=unavailable)
                if placement.node is None:
                    waiting.append(Waiting(name, move.controller_id, placement.reason))
                else:
                    dest = placement.node.name
                    job_id = new_job_id()
                    starts.append(Start(name, move.controller_id, dest, job_id))
                    placements[move.controller_id] = placement
                    by_node[name] = by_node[name].started(move.controller_id, job_id, dest, now)
                    in_flight += 1
                    outbound[name] += 1
                    inbound[dest] += 1
                    # What lands there takes room before the destination reports it.
                    node = live[dest]
                    live[dest] = replace(node, allocated_bytes=node.allocated_bytes + move.namespace_bytes)
                if queue:
                    still.append(name)
            turn = still
    return Decision(tuple(by_node[e.node] for e in settled), tuple(starts), tuple(waiting), placements)
