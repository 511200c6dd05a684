"""The evacuation RPCs of MigrationService (EvacuateNode, GetEvacuation, ListEvacuations).

EvacuateNode cordons the node, writes its evacuation record (state PLANNED) and returns the plan
as `evacuation.step` sees it now; the leader's Evacuator then starts the migrations. With dry_run
it returns the same plan and writes nothing. Kept apart from api.py, which mixes it in.
"""

from __future__ import annotations

import itertools
from collections.abc import Awaitable, Callable
from typing import TypeVar

import grpc
import grpc.aio

from cluster import names
from cluster.node_cache import NodeSource
from cluster.store import ConflictError, EtcdError, EtcdStore
from orchestrator import evacuation
from orchestrator.evacuation import Evacuation, EvacuationState, Limits, Reason
from orchestrator.jobs import Job
from proto.v1 import migration_pb2

T = TypeVar("T")

_REASONS = {
    migration_pb2.EVACUATION_REASON_UNSPECIFIED: Reason.MANUAL,
    migration_pb2.PREDICTED_FAILURE: Reason.PREDICTED_FAILURE,
    migration_pb2.MANUAL: Reason.MANUAL,
    migration_pb2.REBALANCE: Reason.REBALANCE,
}
_STATES = {
    EvacuationState.PLANNED: migration_pb2.EVACUATION_PLANNED,
    EvacuationState.RUNNING: migration_pb2.EVACUATION_RUNNING,
    EvacuationState.DONE: migration_pb2.EVACUATION_DONE,
    EvacuationState.FAILED: migration_pb2.EVACUATION_FAILED,
    EvacuationState.CANCELLED: migration_pb2.EVACUATION_CANCELLED,
}


class _Refusal(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def evacuation_to_message(ev: Evacuation) -> migration_pb2.Evacuation:
    counts = ev.counts()
    return migration_pb2.Evacuation(
        node=ev.node, reason=migration_pb2.EvacuationReason.Value(ev.reason.value), state=_STATES[ev.state],
        note=ev.note, created_at=ev.created_at, updated_at=ev.updated_at, finished_at=ev.finished_at,
        failure=ev.failure,
        controllers=[migration_pb2.ControllerEvacuation(
            controller_id=m.controller_id, namespace_bytes=m.namespace_bytes, result=m.result, note=m.note,
            attempts=[migration_pb2.EvacuationAttempt(job_id=a.job_id, destination_node=a.destination,
                                                      outcome=a.outcome, reason=a.reason) for a in m.attempts])
            for m in ev.moves],
        moved=counts["moved"], in_flight=counts["in_flight"], failed=counts["failed"], waiting=counts["waiting"],
        total=counts["total"])


class EvacuationRpcs:
    """Mixed into MigrationApi, which provides these attributes."""

    store: EtcdStore
    nodes: NodeSource
    clock: Callable[[], float]
    evacuation_limits: Limits
    on_evacuation_created: Callable[[], None]

    async def _evacuation_guard(self, context: grpc.aio.ServicerContext, coro: Awaitable[T]) -> T:
        try:
            return await coro
        except _Refusal as exc:
            await context.abort(exc.code, names.bounded(exc.message))
        except EtcdError as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"etcd is unavailable: {exc}; retry shortly")
        raise AssertionError("unreachable: context.abort raises")

    async def start_evacuation(self, request: migration_pb2.EvacuateNodeRequest) -> str:
        """EvacuateNode for callers inside the orchestrator (the Kubernetes node watch): "" when it
        started, else why not (already evacuating, unknown node, ...)."""
        try:
            await self._evacuate(request)
        except _Refusal as exc:
            return exc.message
        return ""

    async def EvacuateNode(self, request: migration_pb2.EvacuateNodeRequest,
                           context: grpc.aio.ServicerContext) -> migration_pb2.EvacuationPlan:
        return await self._evacuation_guard(context, self._evacuate(request))

    async def _evacuate(self, request: migration_pb2.EvacuateNodeRequest) -> migration_pb2.EvacuationPlan:
        name = request.node
        if not name:
            raise _Refusal(grpc.StatusCode.INVALID_ARGUMENT, "node is required")
        problem = names.node_name_problem(name)
        if problem:
            raise _Refusal(grpc.StatusCode.INVALID_ARGUMENT, problem)
        reason = _REASONS.get(request.reason)
        if reason is None:
            raise _Refusal(grpc.StatusCode.INVALID_ARGUMENT,
                           f"evacuation reason {request.reason} is unknown; use PREDICTED_FAILURE, MANUAL or REBALANCE")
        nodes = await self.nodes.list_nodes()
        if name not in {n.name for n in nodes}:
            record = await self.nodes.get_node(name)  # registered a moment ago: not listed by the cache yet
            if record is None:
                raise _Refusal(grpc.StatusCode.NOT_FOUND, f"node {name!r} is not a registered live agent, so "
                                                          "nothing can be copied off it; `orchctl nodes` lists them")
            nodes.append(record)
        got = await self.store.get_evacuation(name)
        existing = Evacuation.from_bytes(got.value) if got else None
        if existing is not None and not existing.ended:
            raise _Refusal(grpc.StatusCode.FAILED_PRECONDITION,
                           f"node {name!r} is already being evacuated ({existing.state}); "
                           f"`orchctl evacuations` shows its progress")
        controllers = {c.controller_id: c for c in await self.store.list_controllers()}
        jobs = {j.id: j for j in (Job.from_bytes(v.value) for v in await self.store.list_jobs())}
        others = [e for e in (Evacuation.from_bytes(v.value) for v in await self.store.list_evacuations())
                  if not e.ended and e.node != name]
        cordoned = await self.store.cordoned_nodes() | {name}
        now = self.clock()
        ev = evacuation.new_evacuation(name, reason, controllers.values(), now, note=request.note)
        counter = itertools.count(1)
        decision = evacuation.step([*others, ev], nodes=nodes, controllers=controllers, jobs=jobs, cordoned=cordoned,
                                   limits=self.evacuation_limits, now=now,
                                   new_job_id=lambda: f"planned-{next(counter)}")
        moves = []
        starts = {s.controller_id: s for s in decision.starts if s.node == name}
        waits = {w.controller_id: w.why for w in decision.waiting if w.node == name}
        planned = next(e for e in decision.evacuations if e.node == name)
        for move in planned.moves:
            cid = move.controller_id
            if cid in starts:
                placement = decision.placements.get(cid)
                moves.append(migration_pb2.PlannedMove(controller_id=cid, destination_node=starts[cid].destination,
                                                       starts_now=True, why=placement.reason if placement else ""))
            elif move.current is not None:
                moves.append(migration_pb2.PlannedMove(controller_id=cid, destination_node=move.current.destination,
                                                       why=f"already being moved by job {move.current.job_id}"))
            else:
                moves.append(migration_pb2.PlannedMove(controller_id=cid, why=waits.get(cid, move.note)))
        if not request.dry_run:
            await self.store.set_cordon(name, True)
            try:
                await self.store.put_evacuation(name, ev.to_bytes(), got.mod_revision if got else 0)
            except ConflictError:
                raise _Refusal(grpc.StatusCode.ABORTED, f"node {name!r} was asked to evacuate at the same time by "
                                                        "someone else; `orchctl evacuations` shows it") from None
            self.on_evacuation_created()
        return migration_pb2.EvacuationPlan(evacuation=evacuation_to_message(ev), moves=moves,
                                            dry_run=request.dry_run)

    async def GetEvacuation(self, request: migration_pb2.GetEvacuationRequest,
                            context: grpc.aio.ServicerContext) -> migration_pb2.Evacuation:
        async def get() -> migration_pb2.Evacuation:
            problem = names.node_name_problem(request.node) if request.node else "node is required"
            if problem:
                raise _Refusal(grpc.StatusCode.INVALID_ARGUMENT, problem)
            got = await self.store.get_evacuation(request.node)
            if got is None:
                raise _Refusal(grpc.StatusCode.NOT_FOUND, f"node {request.node!r} has no evacuation; "
                                                          "`orchctl evacuations` lists them")
            return evacuation_to_message(Evacuation.from_bytes(got.value))
        return await self._evacuation_guard(context, get())

    async def ListEvacuations(self, request: migration_pb2.ListEvacuationsRequest,
                              context: grpc.aio.ServicerContext) -> migration_pb2.ListEvacuationsResponse:
        async def list_all() -> migration_pb2.ListEvacuationsResponse:
            evs = sorted((Evacuation.from_bytes(v.value) for v in await self.store.list_evacuations()),
                         key=lambda e: e.created_at)
            return migration_pb2.ListEvacuationsResponse(evacuations=[evacuation_to_message(e) for e in evs])
        return await self._evacuation_guard(context, list_all())

