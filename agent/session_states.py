"""What an agent's migration session can be doing, what it may do next, and how it refuses. Pure.

A source session goes NEW -> PRECOPY -> ROUND ... -> STOP_AND_COPY -> STOPPED -> RELEASED, and
may be ABORTED (the controller runs here again) from anywhere before RELEASED. A destination
goes RESUMING -> RECEIVING (a round acknowledged) -> LOADED (state set, awaiting COMMIT) ->
RUNNING, and may be ABORTED (its copy discarded) until it runs. The tables below are the only
moves; `SessionError` is every refusal, its `ErrorKind` mapped to a gRPC code in `CODES` alone,
a stale epoch carrying the structured detail the orchestrator acts on.
"""

from __future__ import annotations

from enum import StrEnum

import grpc

from cluster.agent_errors import StaleEpochDetail


class ErrorKind(StrEnum):
    INVALID = "INVALID"  # the request itself is malformed
    NOT_FOUND = "NOT_FOUND"  # no such controller or session here
    EXISTS = "EXISTS"  # it exists already (here or elsewhere)
    PRECONDITION = "PRECONDITION"  # the state of things forbids it now
    STALE_EPOCH = "STALE_EPOCH"  # a newer orchestrator epoch drives the job
    DATA_LOSS = "DATA_LOSS"  # the data plane failed (checksum, peer gone)
    ABORTED = "ABORTED"  # the work was aborted under the caller
    # A disk is full: this node's data dir (a resume), or, refused by a source's transfer, the
    # destination's (the source itself writes nothing while it sends). Another node may do.
    NO_SPACE = "NO_SPACE"


CODES: dict[ErrorKind, grpc.StatusCode] = {
    ErrorKind.INVALID: grpc.StatusCode.INVALID_ARGUMENT,
    ErrorKind.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    ErrorKind.EXISTS: grpc.StatusCode.ALREADY_EXISTS,
    ErrorKind.PRECONDITION: grpc.StatusCode.FAILED_PRECONDITION,
    ErrorKind.STALE_EPOCH: grpc.StatusCode.FAILED_PRECONDITION,
    ErrorKind.DATA_LOSS: grpc.StatusCode.DATA_LOSS,
    ErrorKind.ABORTED: grpc.StatusCode.ABORTED,
    ErrorKind.NO_SPACE: grpc.StatusCode.RESOURCE_EXHAUSTED,
}


class SessionError(Exception):
    """A command that cannot be carried out; `kind` picks the gRPC status code."""

    def __init__(self, kind: ErrorKind, message: str, *, stale: StaleEpochDetail | None = None) -> None:
        super().__init__(message)
        if (kind is ErrorKind.STALE_EPOCH) != (stale is not None):
            raise ValueError("a STALE_EPOCH refusal, and only it, carries the stale-epoch detail")
        self.kind = kind
        self.message = message
        self.stale = stale

    @property
    def code(self) -> grpc.StatusCode:
        return CODES[self.kind]


class SourceStage(StrEnum):
    NEW = "new"
    PRECOPY = "precopy"
    ROUND = "round"
    STOP_AND_COPY = "stop-and-copy"
    STOPPED = "stopped"  # suspended after the last data and state went across: the switchover image
    RELEASED = "released"  # sanitized after COMMIT
    ABORTED = "aborted"  # running here again


class DestinationStage(StrEnum):
    RESUMING = "resuming"
    RECEIVING = "receiving"
    LOADED = "loaded"  # controller state set: ready to run once COMMIT gives it the controller
    RUNNING = "running"
    ABORTED = "aborted"  # the copy discarded


SOURCE_MOVES: dict[SourceStage, frozenset[SourceStage]] = {
    SourceStage.NEW: frozenset({SourceStage.PRECOPY, SourceStage.ABORTED}),
    # Stop-and-copy straight after precopy: nothing changed during it.
    SourceStage.PRECOPY: frozenset({SourceStage.ROUND, SourceStage.STOP_AND_COPY, SourceStage.ABORTED}),
    SourceStage.ROUND: frozenset({SourceStage.ROUND, SourceStage.STOP_AND_COPY, SourceStage.ABORTED}),
    SourceStage.STOP_AND_COPY: frozenset({SourceStage.STOPPED, SourceStage.ABORTED}),
    # Aborted after STOPPED: the commit never landed (or ownership came back), so it runs here again.
    SourceStage.STOPPED: frozenset({SourceStage.RELEASED, SourceStage.ABORTED}),
    SourceStage.RELEASED: frozenset(),
    SourceStage.ABORTED: frozenset(),
}

DESTINATION_MOVES: dict[DestinationStage, frozenset[DestinationStage]] = {
    DestinationStage.RESUMING: frozenset({DestinationStage.RECEIVING, DestinationStage.LOADED,
                                          DestinationStage.ABORTED}),
    DestinationStage.RECEIVING: frozenset({DestinationStage.RECEIVING, DestinationStage.LOADED,
                                           DestinationStage.ABORTED}),
    DestinationStage.LOADED: frozenset({DestinationStage.RUNNING, DestinationStage.ABORTED}),
    DestinationStage.RUNNING: frozenset(),  # after COMMIT nothing discards it
    DestinationStage.ABORTED: frozenset(),
}

Stage = SourceStage | DestinationStage

# A session here has no more work: its controller runs (here again, or there) or its copy is gone.
ENDED_STAGES: frozenset[Stage] = frozenset({SourceStage.RELEASED, SourceStage.ABORTED, DestinationStage.RUNNING,
                                            DestinationStage.ABORTED})


def move_problem(job_id: str, role: str, current: Stage, target: Stage) -> str | None:
    """Why the session may not go from `current` to `target`, or None when it may."""
    moves: dict[Stage, frozenset[Stage]] = (SOURCE_MOVES if isinstance(current, SourceStage)  # type: ignore[assignment]
                                            else DESTINATION_MOVES)
    if target in moves[current]:
        return None
    return f"job {job_id}: the {role} is {current.value}, so it cannot go to {target.value}"
