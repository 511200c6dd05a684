"""MigrationService: the orchestrator's gRPC API. Validates requests, writes jobs, reads state.

Refusals use the status code that says what kind of problem it is and a message that names the
bad value: INVALID_ARGUMENT for a malformed request, NOT_FOUND for something that does not
exist, FAILED_PRECONDITION when the cluster's state forbids it. A refused request writes nothing.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator, Callable

import grpc
import grpc.aio

from cluster import io_limits, names
from cluster.node_cache import NodeSource
from cluster.policy_limits import policy_value_problem
from cluster.records import RUNNING, ControllerRecord, NodeRecord
from cluster.store import ConflictError, EtcdError, EtcdStore
from orchestrator import scheduler, tracing
from orchestrator.agent_calls import AgentCalls, AgentRefused, AgentUnreachable
from orchestrator.evacuation import Limits
from orchestrator.evacuation_api import EvacuationRpcs
from orchestrator.jobs import (
    BEFORE_COMMIT,
    Job,
    LiveJob,
    OnNoConvergence,
    Phase,
    Policy,
    Verification,
    pending_job,
    shown,
)
from proto.v1 import agent_pb2, migration_pb2, migration_pb2_grpc

WATCH_POLL_S = 0.2
EXPORT_BUDGET_S = 10.0
PLACEMENT_BUDGET_S = 2.0
MAX_PREDICTION_REASON = 1000  # asking the source how much data its controller holds, for placement
BLOCK_BYTES = 4096  # namespaces are made of 4 KiB blocks
DELETE_BUDGET_S = 30.0  # stopping the guest and sanitizing the namespace
# Creating a controller: the agent writes every block when asked to prefill. The budget lets a
# slow disk take its time (16 MiB/s) on top of a fixed allowance; orchctl (orchctl/cli.py, the
# same numbers) waits as long.
CREATE_BUDGET_S = 30.0
CREATE_PREFILL_BYTES_PER_S = 16 << 20


def create_budget_s(namespace_bytes: int, prefill: bool) -> float:
    """How long a CreateController may take on the agent."""
    return CREATE_BUDGET_S + (namespace_bytes / CREATE_PREFILL_BYTES_PER_S if prefill else 0.0)

_ON_NO_CONVERGENCE = {
    migration_pb2.NO_CONVERGENCE_ACTION_UNSPECIFIED: OnNoConvergence.THROTTLE,
    migration_pb2.THROTTLE: OnNoConvergence.THROTTLE,
    migration_pb2.ABORT: OnNoConvergence.ABORT,
    migration_pb2.FORCE: OnNoConvergence.FORCE,
}


_VERIFICATION = {
    Verification.NONE: migration_pb2.VERIFICATION_UNSPECIFIED,
    Verification.PENDING: migration_pb2.VERIFICATION_PENDING,
    Verification.PASSED: migration_pb2.VERIFICATION_PASSED,
    Verification.FAILED: migration_pb2.VERIFICATION_FAILED,
}


def new_job_id() -> str:
    return f"mig-{secrets.token_hex(6)}"


class Refused(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def policy_from_request(msg: migration_pb2.ConvergencePolicy) -> Policy:
    defaults = Policy()
    values: dict[str, int] = {}
    for field in ("max_downtime_ms", "max_rounds", "bandwidth_bytes_per_s"):
        if msg.HasField(field):
            value = getattr(msg, field)
            if value <= 0:
                raise Refused(grpc.StatusCode.INVALID_ARGUMENT,
                              f"policy.{field} must be greater than 0, got {value}; leave it unset for "
                              f"the default")
            problem = policy_value_problem(field, value)
            if problem:
                raise Refused(grpc.StatusCode.INVALID_ARGUMENT, f"policy.{problem}")
            values[field] = value
    action = _ON_NO_CONVERGENCE.get(msg.on_no_convergence)
    if action is None:
        raise Refused(grpc.StatusCode.INVALID_ARGUMENT,
                      f"policy.on_no_convergence {msg.on_no_convergence} is unknown; use THROTTLE, ABORT or FORCE")
    return Policy(max_downtime_ms=values.get("max_downtime_ms", defaults.max_downtime_ms),
                  max_rounds=values.get("max_rounds", defaults.max_rounds),
                  bandwidth_bytes_per_s=values.get("bandwidth_bytes_per_s", 0),
                  on_no_convergence=action)


def job_to_message(job: Job) -> migration_pb2.Migration:
    policy = migration_pb2.ConvergencePolicy(
        max_downtime_ms=job.policy.max_downtime_ms, max_rounds=job.policy.max_rounds,
        on_no_convergence=migration_pb2.NoConvergenceAction.Value(job.policy.on_no_convergence.value))
    if job.policy.bandwidth_bytes_per_s:
        policy.bandwidth_bytes_per_s = job.policy.bandwidth_bytes_per_s
    return migration_pb2.Migration(
        id=job.id, controller_id=job.controller_id, source_node=job.source_node,
        destination_node=job.destination_node, phase=migration_pb2.Phase.Value(job.phase.value),
        reason=job.reason,
        phases=[migration_pb2.PhaseRecord(phase=migration_pb2.Phase.Value(p.phase.value), started_at=p.started_at,
                                          duration_ms=p.duration_ms, bytes=p.bytes, rounds=p.rounds, note=p.note)
                for p in job.phases],
        bytes_transferred=job.bytes_transferred, namespace_bytes=job.namespace_bytes, rounds=job.rounds,
        throttle_percent=job.throttle_percent, dirty_rate_bytes_per_s=job.dirty_rate_bytes_per_s,
        created_at=job.created_at, updated_at=job.updated_at, epoch=job.epoch,
        cancel_requested=job.cancel_requested, policy=policy, source_digest=job.source_digest,
        destination_digest=job.destination_digest, downtime_ms=job.downtime_ms,
        trace_id=job.trace_context.get("trace_id", ""), guest_blackout_ms=job.guest_blackout_ms,
        verification=_VERIFICATION[job.verification], verification_note=job.verification_note,
        predicted_downtime_ms=job.predicted_downtime_ms, downtime_budget_exceeded=job.downtime_budget_exceeded)


class MigrationApi(EvacuationRpcs, migration_pb2_grpc.MigrationServiceServicer):
    def __init__(self, store: EtcdStore, agents: AgentCalls, on_job_created: Callable[[str], None],
                 clock: Callable[[], float] = time.time, evacuation_limits: Limits | None = None,
                 on_evacuation_created: Callable[[], None] | None = None,
                 live_job: LiveJob | None = None, nodes: NodeSource | None = None) -> None:
        """`live_job(id, revision)`: on the leader, the running job with its progress not yet in
        etcd (its runner writes it every few seconds), if etcd's record is still at `revision`."""
        self.store = store
        # Placement and listings read nodes that may be a moment old; a node they do not hold is
        # read from etcd (NodeCache.get_node) before it is refused. Cordons are read from etcd.
        self.nodes: NodeSource = nodes or store
        self.agents = agents
        self.on_job_created = on_job_created
        self.clock = clock
        self.evacuation_limits = evacuation_limits or Limits()
        self.on_evacuation_created = on_evacuation_created or (lambda: None)
        self.live_job = live_job

    async def _guard(self, context: grpc.aio.ServicerContext, coro):  # type: ignore[no-untyped-def]
        try:
            return await coro
        except Refused as exc:
            await context.abort(exc.code, names.bounded(exc.message))
        except EtcdError as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"etcd is unavailable: {exc}; retry shortly")

    # ---- create -------------------------------------------------------------------------

    async def CreateMigration(self, request: migration_pb2.CreateMigrationRequest,
                              context: grpc.aio.ServicerContext) -> migration_pb2.Migration:
        return await self._guard(context, self._create(request))

    async def _create(self, request: migration_pb2.CreateMigrationRequest) -> migration_pb2.Migration:
        if not request.controller_id:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, "controller_id is required")
        problem = names.controller_id_problem(request.controller_id)
        if problem:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, problem)
        if request.destination_node:
            problem = names.node_name_problem(request.destination_node)
            if problem:
                raise Refused(grpc.StatusCode.INVALID_ARGUMENT, problem)
        policy = policy_from_request(request.policy)
        owned = await self.store.get_controller(request.controller_id)
        if owned is None:
            raise Refused(grpc.StatusCode.NOT_FOUND,
                          f"controller {request.controller_id!r} is not known; `orchctl controllers` lists them")
        controller = owned[0]
        if controller.state != RUNNING:
            raise Refused(grpc.StatusCode.FAILED_PRECONDITION,
                          f"controller {controller.controller_id!r} is {controller.state} on node {controller.node!r}, "
                          "not RUNNING; it cannot be migrated until it runs again")
        source = await self.nodes.get_node(controller.node)
        cordoned = await self.store.cordoned_nodes()
        if source is None:
            raise Refused(grpc.StatusCode.FAILED_PRECONDITION,
                          f"controller {controller.controller_id!r} is on node {controller.node!r}, whose agent "
                          "is not live; it cannot be migrated until that node is back")
        stored = await self.agents.stored_bytes(controller.node, controller.controller_id, budget_s=PLACEMENT_BUDGET_S)
        dest = request.destination_node
        if dest:
            if dest == controller.node:
                raise Refused(grpc.StatusCode.FAILED_PRECONDITION,
                              f"destination node {dest!r} is where controller {controller.controller_id!r} "
                              "already runs; choose another node or omit --to")
            destination = await self.nodes.get_node(dest)
            if destination is None:
                raise Refused(grpc.StatusCode.NOT_FOUND,
                              f"destination node {dest!r} is not a registered live agent; `orchctl nodes` "
                              "lists them")
            problem = scheduler.node_problem(destination, dest, source=controller.node,
                                             namespace_bytes=controller.namespace_bytes, cordoned=cordoned,
                                             stored_bytes=stored, source_record=source)
            if problem:
                raise Refused(grpc.StatusCode.FAILED_PRECONDITION, problem)
        else:
            placement = scheduler.choose_destination(await self.nodes.list_nodes(), source=controller.node,
                                                     namespace_bytes=controller.namespace_bytes, cordoned=cordoned,
                                                     stored_bytes=stored, source_record=source)
            if placement.node is None:
                raise Refused(grpc.StatusCode.FAILED_PRECONDITION, placement.reason)
        # A controller already being moved is refused by create_job's transaction (its active
        # marker), with the job's id: no read of the marker beforehand.
        now = self.clock()
        job = pending_job(new_job_id(), controller_id=controller.controller_id, source_node=controller.node,
                          namespace_bytes=controller.namespace_bytes, policy=policy, now=now,
                          requested_destination=dest, trace_context=tracing.new_job_context())
        try:
            await self.store.create_job(job.id, job.controller_id, job.to_bytes())
        except ConflictError as exc:
            raise Refused(grpc.StatusCode.FAILED_PRECONDITION, f"{exc}; wait for it or cancel it") from None
        self.on_job_created(job.id)
        return job_to_message(job)

    # ---- read ---------------------------------------------------------------------------

    async def _job(self, job_id: str) -> tuple[Job, int]:
        problem = names.job_id_problem(job_id)
        if problem:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, problem)
        got = await self.store.get_job(job_id)
        if got is None:
            raise Refused(grpc.StatusCode.NOT_FOUND, f"job {job_id!r} does not exist; `orchctl list` shows jobs")
        return Job.from_bytes(got.value), got.mod_revision

    def _shown(self, record: Job, revision: int) -> Job:
        return shown(record, revision, self.live_job)

    async def GetMigration(self, request: migration_pb2.GetMigrationRequest,
                           context: grpc.aio.ServicerContext) -> migration_pb2.Migration:
        async def get() -> migration_pb2.Migration:
            return job_to_message(self._shown(*await self._job(request.id)))
        return await self._guard(context, get())

    async def ListMigrations(self, request: migration_pb2.ListMigrationsRequest,
                             context: grpc.aio.ServicerContext) -> migration_pb2.ListMigrationsResponse:
        async def list_jobs() -> migration_pb2.ListMigrationsResponse:
            if request.controller_id:
                problem = names.controller_id_problem(request.controller_id)
                if problem:
                    raise Refused(grpc.StatusCode.INVALID_ARGUMENT, problem)
            jobs = [self._shown(Job.from_bytes(v.value), v.mod_revision) for v in await self.store.list_jobs()]
            jobs = [j for j in jobs if (not request.active_only or not j.terminal)
                    and (not request.controller_id or j.controller_id == request.controller_id)]
            jobs.sort(key=lambda j: j.created_at)
            return migration_pb2.ListMigrationsResponse(migrations=[job_to_message(j) for j in jobs])
        return await self._guard(context, list_jobs())

    async def WatchMigration(self, request: migration_pb2.WatchMigrationRequest,
                             context: grpc.aio.ServicerContext) -> AsyncIterator[migration_pb2.MigrationEvent]:
        try:
            job, revision = await self._job(request.id)
        except Refused as exc:
            await context.abort(exc.code, names.bounded(exc.message))
            return
        shown = job_to_message(self._shown(job, revision))
        yield migration_pb2.MigrationEvent(migration=shown)
        while not job.terminal:
            await asyncio.sleep(WATCH_POLL_S)  # poll interval of the stream, not a synchronisation
            try:
                got = await self.store.get_job(request.id)
            except EtcdError:
                continue
            if got is None:
                return
            job = Job.from_bytes(got.value)
            message = job_to_message(self._shown(job, got.mod_revision))
            if message != shown:
                shown = message
                yield migration_pb2.MigrationEvent(migration=shown)

    async def CancelMigration(self, request: migration_pb2.CancelMigrationRequest,
                              context: grpc.aio.ServicerContext) -> migration_pb2.Migration:
        return await self._guard(context, self._cancel(request.id))

    async def _cancel(self, job_id: str) -> migration_pb2.Migration:
        for _ in range(20):
            job, revision = await self._job(job_id)
            if job.terminal:
                raise Refused(grpc.StatusCode.FAILED_PRECONDITION,
                              f"job {job_id} already ended as {job.phase}; nothing to cancel")
            if job.phase not in BEFORE_COMMIT:
                raise Refused(grpc.StatusCode.FAILED_PRECONDITION,
                              f"job {job_id} is past COMMIT (phase {job.phase}): the controller now belongs to "
                              f"{job.destination_node} and the job will complete there")
            if job.cancel_requested:
                return job_to_message(job)
            try:
                updated = job.cancel_asked(self.clock())
                await self.store.update_job(job_id, updated.to_bytes(), revision)
                return job_to_message(updated)
            except ConflictError:
                continue  # the runner wrote in between: read again
        raise Refused(grpc.StatusCode.ABORTED, f"job {job_id} kept changing; retry the cancel")

    async def ListNodes(self, request: migration_pb2.ListNodesRequest,
                        context: grpc.aio.ServicerContext) -> migration_pb2.ListNodesResponse:
        async def list_nodes() -> migration_pb2.ListNodesResponse:
            nodes = sorted(await self.nodes.list_nodes(), key=lambda n: n.name)
            cordoned = await self.store.cordoned_nodes()
            live = {n.name for n in nodes}
            return migration_pb2.ListNodesResponse(
                nodes=[_node_message(n, n.name in cordoned) for n in nodes]
                + [migration_pb2.Node(name=name, live=False, cordoned=True) for name in sorted(cordoned - live)])
        return await self._guard(context, list_nodes())

    async def ListControllers(self, request: migration_pb2.ListControllersRequest,
                              context: grpc.aio.ServicerContext) -> migration_pb2.ListControllersResponse:
        async def list_controllers() -> migration_pb2.ListControllersResponse:
            records = sorted(await self.store.list_controllers(), key=lambda c: c.controller_id)
            return migration_pb2.ListControllersResponse(controllers=[_controller_message(c) for c in records])
        return await self._guard(context, list_controllers())

    # ---- controllers as API objects ------------------------------------------------------

    @staticmethod
    def _check_controller_id(cid: str) -> None:
        if not cid:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, "controller_id is required")
        problem = names.controller_id_problem(cid)
        if problem:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, problem)

    async def CreateController(self, request: migration_pb2.NewControllerRequest,
                               context: grpc.aio.ServicerContext) -> migration_pb2.Controller:
        return await self._guard(context, self._create_controller(request))  # type: ignore[no-any-return]

    async def _create_controller(self, request: migration_pb2.NewControllerRequest) -> migration_pb2.Controller:
        cid, size = request.controller_id, request.namespace_bytes
        self._check_controller_id(cid)
        if size <= 0 or size % BLOCK_BYTES:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT,
                          f"namespace size {size} bytes is not a positive multiple of {BLOCK_BYTES} (4 KiB); "
                          "give a size like 64M or 1G")
        if request.node:
            problem = names.node_name_problem(request.node)
            if problem:
                raise Refused(grpc.StatusCode.INVALID_ARGUMENT, problem)
        guest = request.guest if request.HasField("guest") else None
        if guest is not None and guest.write_iops < 0:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT,
                          f"guest write_iops {guest.write_iops} must be >= 0 (0: as fast as it goes)")
        if guest is not None and guest.seed < 0:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, f"guest seed {guest.seed} must be >= 0")
        limits = io_limits.changes_in(request.limits)
        problem = io_limits.changes_problem(limits)
        if problem:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, f"limits.{problem}")
        existing = await self.store.get_controller(cid)
        if existing is not None:
            raise Refused(grpc.StatusCode.ALREADY_EXISTS,
                          f"controller {cid!r} already exists on node {existing[0].node!r}; choose another id "
                          "or delete it first")
        cordoned = await self.store.cordoned_nodes()
        node = request.node
        if node:
            record = await self.nodes.get_node(node)
            if record is None:
                raise Refused(grpc.StatusCode.NOT_FOUND,
                              f"node {node!r} is not a registered live agent; `orchctl nodes` lists them")
            problem = scheduler.new_controller_problem(record, node, namespace_bytes=size, cordoned=cordoned)
            if problem:
                raise Refused(grpc.StatusCode.FAILED_PRECONDITION, problem)
        else:
            placement = scheduler.choose_node_for_new(await self.nodes.list_nodes(), namespace_bytes=size,
                                                      cordoned=cordoned)
            if placement.node is None:
                raise Refused(grpc.StatusCode.FAILED_PRECONDITION, placement.reason)
            node = placement.node.name
        agent_request = agent_pb2.CreateControllerRequest(controller_id=cid, namespace_bytes=size,
                                                          prefill=request.prefill)
        for name, value in limits.items():
            setattr(agent_request.limits, name, value)
        if guest is not None:
            agent_request.workload.CopyFrom(agent_pb2.WorkloadSpec(write_iops=guest.write_iops,
                                                                   pattern=guest.pattern, seed=guest.seed))
        budget_s = create_budget_s(size, request.prefill)
        try:
            # Not retried past its own deadline: the agent may still be prefilling, and a second
            # create would only be told the controller exists.
            await self.agents.call(node, f"create {cid}",
                                   lambda s: s.CreateController(agent_request, timeout=budget_s), budget_s=budget_s)
        except AgentUnreachable as exc:
            raise Refused(grpc.StatusCode.UNAVAILABLE,
                          f"{exc.message}; the controller may still appear there: `orchctl controllers` shows "
                          "it, `orchctl controllers delete` removes it") from None
        except AgentRefused as exc:
            raise Refused(exc.code, f"node {node!r} refused to create controller {cid!r}: {exc.details}") from None
        created = await self.store.get_controller(cid)
        if created is None:
            made = migration_pb2.Controller(id=cid, node=node, namespace_bytes=size, state=RUNNING)
            io_limits.fill(made.limits, io_limits.IoLimits().merged(limits))
            return made
        return _controller_message(created[0])

    async def SetControllerLimits(self, request: migration_pb2.ControllerLimitsRequest,
                                  context: grpc.aio.ServicerContext) -> migration_pb2.Controller:
        return await self._guard(context, self._set_limits(request))  # type: ignore[no-any-return]

    async def _controller_at_rest(self, cid: str, while_moving: Callable[[str], str], while_lost: str
                                  ) -> ControllerRecord:
        """The controller's record, when no job moves it and its node's agent is live: what an
        operator's change to it needs; else the refusal says what to do (`while_moving(job)`)."""
        owned = await self.store.get_controller(cid)
        if owned is None:
            raise Refused(grpc.StatusCode.NOT_FOUND,
                          f"controller {cid!r} is not known; `orchctl controllers` lists them")
        record = owned[0]
        active = await self.store.active_job_for(cid)
        if active:
            raise Refused(grpc.StatusCode.FAILED_PRECONDITION,
                          f"controller {cid!r} is being moved by job {active}; {while_moving(active)}")
        if await self.agents.is_lost(record.node):
            raise Refused(grpc.StatusCode.FAILED_PRECONDITION,
                          f"controller {cid!r} is on node {record.node!r}, whose agent is not live; {while_lost}")
        return record

    async def _set_limits(self, request: migration_pb2.ControllerLimitsRequest) -> migration_pb2.Controller:
        cid = request.controller_id
        self._check_controller_id(cid)
        changes = io_limits.changes_in(request.limits)
        problem = io_limits.changes_problem(changes)
        if problem:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, f"limits.{problem}")
        if not changes and not request.clear:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT,
                          f"no limit given for controller {cid!r}: set at least one (0 removes it), or clear")
        record = await self._controller_at_rest(
            cid, lambda job: f"change its limits once the job ended (orchctl watch {job})",
            "its limits cannot change until that node is back")
        agent_request = agent_pb2.SetControllerLimitsRequest(controller_id=cid, clear=request.clear)
        for name, value in changes.items():
            setattr(agent_request.limits, name, value)
        try:
            await self.agents.call(record.node, f"limit {cid}",
                                   lambda s: s.SetControllerLimits(agent_request, timeout=5.0), budget_s=10.0)
        except AgentUnreachable as exc:
            raise Refused(grpc.StatusCode.UNAVAILABLE, f"{exc.message}; retry shortly") from None
        except AgentRefused as exc:
            raise Refused(exc.code, f"node {record.node!r} refused to change the limits of {cid!r}: "
                                    f"{exc.details}") from None
        updated = await self.store.get_controller(cid)
        return _controller_message(updated[0] if updated is not None else record)

    async def DeleteController(self, request: migration_pb2.DeleteControllerRequest,
                               context: grpc.aio.ServicerContext) -> migration_pb2.Controller:
        return await self._guard(context, self._delete_controller(request.controller_id))  # type: ignore[no-any-return]

    async def _delete_controller(self, cid: str) -> migration_pb2.Controller:
        self._check_controller_id(cid)
        record = await self._controller_at_rest(
            cid, lambda job: f"wait for it (orchctl watch {job}) or cancel it (orchctl cancel {job}), then delete",
            "it cannot be deleted until that node is back")
        try:
            await self.agents.call(
                record.node, f"delete {cid}",
                lambda s: s.DeleteController(agent_pb2.GetControllerRequest(controller_id=cid),
                                             timeout=DELETE_BUDGET_S), budget_s=DELETE_BUDGET_S)
        except AgentUnreachable as exc:
            raise Refused(grpc.StatusCode.UNAVAILABLE, f"{exc.message}; retry the delete shortly") from None
        except AgentRefused as exc:
            raise Refused(exc.code, f"node {record.node!r} refused to delete controller {cid!r}: "
                                    f"{exc.details}") from None
        return _controller_message(record)

    async def ExportController(self, request: migration_pb2.ExportControllerRequest,
                               context: grpc.aio.ServicerContext) -> migration_pb2.ControllerExport:
        async def export() -> migration_pb2.ControllerExport:
            cid = request.controller_id
            if not cid:
                raise Refused(grpc.StatusCode.INVALID_ARGUMENT, "controller_id is required")
            problem = names.controller_id_problem(cid)
            if problem:
                raise Refused(grpc.StatusCode.INVALID_ARGUMENT, problem)
            owned = await self.store.get_controller(cid)
            if owned is None:
                raise Refused(grpc.StatusCode.NOT_FOUND,
                              f"controller {cid!r} is not known; `orchctl controllers` lists them")
            owner = owned[0].node
            # Not live by the rule every agent call follows: a record missing for a moment is not enough.
            if await self.agents.is_lost(owner):
                raise Refused(grpc.StatusCode.FAILED_PRECONDITION,
                              f"controller {cid!r} is on node {owner!r}, whose agent is not live; "
                              "it cannot be exported until that node is back")
            try:
                reply = await self.agents.call(
                    owner, f"export {cid}",
                    lambda s: s.ExportController(agent_pb2.GetControllerRequest(controller_id=cid), timeout=5.0),
                    budget_s=EXPORT_BUDGET_S)
            except AgentUnreachable as exc:
                raise Refused(grpc.StatusCode.UNAVAILABLE, f"{exc.message}; retry shortly") from None
            except AgentRefused as exc:
                if exc.code == grpc.StatusCode.NOT_FOUND:
                    # etcd names the new owner from COMMIT on; the controller runs there a moment later.
                    raise Refused(grpc.StatusCode.FAILED_PRECONDITION,
                                  f"controller {cid!r} belongs to node {owner!r} but does not run there "
                                  "yet (a migration is switching it over); retry in a moment") from None
                raise Refused(exc.code, f"node {owner!r} refused to export {cid!r}: {exc.details}") from None
            return migration_pb2.ControllerExport(controller_id=cid, node=owner, uri=reply.uri)
        return await self._guard(context, export())  # type: ignore[no-any-return]

    async def CordonNode(self, request: migration_pb2.CordonNodeRequest,
                         context: grpc.aio.ServicerContext) -> migration_pb2.Node:
        return await self._guard(context, self._cordon(request.name, True))

    async def UncordonNode(self, request: migration_pb2.CordonNodeRequest,
                           context: grpc.aio.ServicerContext) -> migration_pb2.Node:
        return await self._guard(context, self._cordon(request.name, False))

    async def PredictNodeFailure(self, request: migration_pb2.PredictNodeFailureRequest,
                                 context: grpc.aio.ServicerContext) -> migration_pb2.Node:
        async def predict() -> migration_pb2.Node:
            name, reason = request.name, request.reason.strip()
            problem = names.node_name_problem(name)
            if problem:
                raise Refused(grpc.StatusCode.INVALID_ARGUMENT, problem)
            if not request.clear and not reason:
                raise Refused(grpc.StatusCode.INVALID_ARGUMENT, f"a failure prediction for node {name!r} needs a "
                                                                "reason (what the predictor saw); or pass clear")
            if len(reason) > MAX_PREDICTION_REASON:
                raise Refused(grpc.StatusCode.INVALID_ARGUMENT, f"reason is {len(reason)} characters; at most "
                                                                f"{MAX_PREDICTION_REASON}")
            node = await self.store.get_node(name)
            if node is None and not request.clear:
                raise Refused(grpc.StatusCode.NOT_FOUND, f"node {name!r} is not a registered live agent; "
                                                         "`orchctl nodes` lists them")
            await self.store.set_prediction(name, "" if request.clear else reason)
            cordoned = name in await self.store.cordoned_nodes()
            message = _node_message(node, cordoned) if node is not None else migration_pb2.Node(name=name)
            message.predicted_failure = "" if request.clear else reason
            return message
        return await self._guard(context, predict())

    async def _cordon(self, name: str, cordoned: bool) -> migration_pb2.Node:
        problem = names.node_name_problem(name)
        if problem:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, problem)
        node = await self.store.get_node(name)
        if node is None and name not in await self.store.cordoned_nodes():
            raise Refused(grpc.StatusCode.NOT_FOUND, f"node {name!r} is not a registered live agent; "
                                                     "`orchctl nodes` lists them")
        await self.store.set_cordon(name, cordoned)
        if node is None:
            return migration_pb2.Node(name=name, live=False, cordoned=cordoned)
        return _node_message(node, cordoned)


def _controller_message(c: ControllerRecord) -> migration_pb2.Controller:
    message = migration_pb2.Controller(id=c.controller_id, node=c.node, namespace_bytes=c.namespace_bytes,
                                       state=c.state)
    io_limits.fill(message.limits, c.limits)
    return message


def _node_message(n: NodeRecord, cordoned: bool) -> migration_pb2.Node:
    return migration_pb2.Node(name=n.name, address=n.address, data_address=n.data_address, live=True,
                              cordoned=cordoned, capacity_bytes=n.capacity_bytes, allocated_bytes=n.allocated_bytes,
                              controllers=list(n.controllers), http_address=n.http_address)


def phase_of(message: migration_pb2.Migration) -> Phase:
    return Phase(migration_pb2.Phase.Name(message.phase))
