"""AgentService: the gRPC face of a host. Maps requests to the Host and its sessions, and
session errors to status codes with the session's message."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable
from typing import TypeVar

import grpc
import grpc.aio

from agent.backends.hosting import HostingError
from agent.controller_errors import ControllerGoneError
from agent.dataplane.sender import FrameFaults
from agent.guest.lineage import Receipt
from agent.guest.verifier import verify as verify_blocks
from agent.guest.workload import WorkloadSpec
from agent.host import Host, HostedController
from agent.session_states import ErrorKind, SessionError
from agent.sessions import DestinationSession, SourceSession, TransferFacts
from cluster import agent_errors, io_limits, names
from cluster.store import EtcdError
from proto.v1 import agent_pb2, agent_pb2_grpc

T = TypeVar("T")
CREATING = "CREATING"  # the vfio_state GetInfo reports for a controller still being created
DELETED = "DELETED"  # the vfio_state DeleteController reports: the controller is gone

def spec_from_message(msg: agent_pb2.WorkloadSpec) -> WorkloadSpec:
    return WorkloadSpec(write_iops=msg.write_iops, block_bytes=msg.block_bytes or 4096,
                        pattern=msg.pattern or "random", hot_fraction=msg.hot_fraction or 0.1, seed=msg.seed)


def receipt_message(receipt: Receipt) -> agent_pb2.Receipt:
    return agent_pb2.Receipt(run_id=receipt.run_id, seq=receipt.seq, run_first_seq=receipt.run_first_seq)


def receipt_from_message(msg: agent_pb2.Receipt) -> Receipt:
    return Receipt(run_id=msg.run_id, seq=msg.seq, run_first_seq=msg.run_first_seq)


MAX_STALL_MS = 600_000


def controller_status(node: str, hosted: HostedController, limits: io_limits.IoLimits | None = None
                      ) -> agent_pb2.ControllerStatus:
    status = agent_pb2.ControllerStatus(controller_id=hosted.controller.controller_id, node=node,
                                        vfio_state=hosted.controller.vfio_state.name,
                                        namespace_bytes=hosted.controller.namespace_bytes)
    if limits is not None and limits.any:
        io_limits.fill(status.limits, limits)
    if hosted.workload is not None:
        w = hosted.workload.status()
        status.workload.CopyFrom(agent_pb2.WorkloadStatus(
            running=w.running, paused=w.paused, acked_writes=w.acked_writes, throttle_percent=w.throttle_percent,
            max_gap_ms=w.max_gap_ms, blackout_ms=w.blackout_ms, next_seq=w.next_seq, writes_per_s=w.writes_per_s,
            pauses=w.pauses, run_id=w.run_id))
        if w.receipt is not None:
            status.workload.receipt.CopyFrom(receipt_message(w.receipt))
    return status


def transfer_result(facts: TransferFacts) -> agent_pb2.TransferResult:
    return agent_pb2.TransferResult(bytes_sent=facts.bytes_sent, blocks_sent=facts.blocks_sent,
                                    duration_s=facts.duration_s, dirty_bytes_remaining=facts.dirty_bytes_remaining,
                                    dirty_rate_bytes_per_s=facts.dirty_rate_bytes_per_s,
                                    state_bytes=facts.state_bytes, round=facts.round,
                                    total_bytes_sent=facts.total_bytes_sent,
                                    switchover=facts.switchover,  # type: ignore[arg-type]
                                    commit_revision=facts.commit_revision, switchover_note=facts.switchover_note,
                                    commit_ms=facts.commit_ms, pre_pause_ms=facts.pre_pause_ms,
                                    pre_pause_bytes=facts.pre_pause_bytes)


class AgentApi(agent_pb2_grpc.AgentServiceServicer):
    def __init__(self, host: Host, *, allow_fault_injection: bool = False) -> None:
        self.host = host
        self.allow_fault_injection = allow_fault_injection  # InjectFault: tests only

    async def _guard(self, context: grpc.aio.ServicerContext, work: Awaitable[T]) -> T:
        try:
            return await work
        except SessionError as exc:
            if exc.stale is not None:
                await context.abort_with_status(agent_errors.stale_epoch_status(exc.message, exc.stale))
            await context.abort(exc.code, names.bounded(exc.message))
        except EtcdError as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"etcd is unavailable: {exc}")
        raise AssertionError("context.abort raises")

    def _session_status(self, session: SourceSession | DestinationSession | None,
                        job_id: str) -> agent_pb2.SessionStatus:
        if session is None:
            return agent_pb2.SessionStatus(job_id=job_id, stage="unknown")
        status = agent_pb2.SessionStatus(job_id=session.job_id, stage=session.label, epoch=session.epoch,
                                         digest=session.digest, error=session.error,
                                         digest_error=session.digest_error)
        if isinstance(session, SourceSession):
            status.role = "source"
            status.bytes_sent = session.bytes_sent
        else:
            status.role = "destination"
            status.bytes_received = session.bytes_received
            status.guest_blackout_ms = session.guest_blackout_ms()
            try:
                stats = self.host.receiver.session_stats(session.job_id)
            except KeyError:
                stats = None  # unregistered once the controller runs here or the job was aborted
            if stats is not None and stats.last_error and not status.error:
                status.error = stats.last_error
        return status

    @staticmethod
    def _check_controller_id(controller_id: str) -> None:
        problem = names.controller_id_problem(controller_id)
        if problem:
            raise SessionError(ErrorKind.INVALID, problem)

    @staticmethod
    def _check_ref(ref: agent_pb2.MigrationRef) -> None:
        problem = names.job_id_problem(ref.job_id) or names.controller_id_problem(ref.controller_id)
        if problem:
            raise SessionError(ErrorKind.INVALID, problem)

    # ---- info and controllers ----------------------------------------------------------

    async def GetInfo(self, request: agent_pb2.GetInfoRequest,
                      context: grpc.aio.ServicerContext) -> agent_pb2.AgentInfo:
        h = self.host
        return agent_pb2.AgentInfo(node=h.name, data_address=h.receiver.address, capacity_bytes=h.capacity_bytes,
                                   allocated_bytes=h.allocated_bytes,
                                   controllers=[*self._live_statuses(),
                                                *(agent_pb2.ControllerStatus(controller_id=cid, node=h.name,
                                                                             vfio_state=CREATING, namespace_bytes=size)
                                                  for cid, size in h.creating.items())],
                                   state_format_version=h.record().state_format_version,
                                   sessions=[self._session_status(s, job_id) for job_id, s in h.sessions.items()
                                             if isinstance(s, SourceSession | DestinationSession)])

    def _live_statuses(self) -> list[agent_pb2.ControllerStatus]:
        """Every hosted controller's status, but one that a release closed a moment ago (it leaves
        `controllers` right after): it is gone, not an error of the whole listing."""
        statuses = []
        for cid, hosted in list(self.host.controllers.items()):
            try:
                statuses.append(controller_status(self.host.name, hosted, self.host.limits(cid)))
            except ControllerGoneError:
                continue
        return statuses

    async def CreateController(self, request: agent_pb2.CreateControllerRequest,
                               context: grpc.aio.ServicerContext) -> agent_pb2.ControllerStatus:
        async def create() -> agent_pb2.ControllerStatus:
            self._check_controller_id(request.controller_id)
            spec = spec_from_message(request.workload) if request.HasField("workload") else None
            changes = io_limits.changes_in(request.limits)
            problem = io_limits.changes_problem(changes)
            if problem:
                raise SessionError(ErrorKind.INVALID, problem)
            hosted = await self.host.create_controller(request.controller_id, request.namespace_bytes,
                                                       request.prefill, spec, io_limits.IoLimits().merged(changes))
            return controller_status(self.host.name, hosted, self.host.limits(request.controller_id))
        return await self._guard(context, create())

    async def DeleteController(self, request: agent_pb2.GetControllerRequest,
                               context: grpc.aio.ServicerContext) -> agent_pb2.ControllerStatus:
        async def delete() -> agent_pb2.ControllerStatus:
            self._check_controller_id(request.controller_id)
            namespace_bytes = await self.host.delete_controller(request.controller_id)
            return agent_pb2.ControllerStatus(controller_id=request.controller_id, node=self.host.name,
                                              vfio_state=DELETED, namespace_bytes=namespace_bytes or 0)
        return await self._guard(context, delete())

    async def GetController(self, request: agent_pb2.GetControllerRequest,
                            context: grpc.aio.ServicerContext) -> agent_pb2.ControllerStatus:
        async def get() -> agent_pb2.ControllerStatus:
            hosted = self.host.hosted(request.controller_id)
            status = controller_status(self.host.name, hosted, self.host.limits(request.controller_id))
            if request.with_stored_bytes:
                extents = await asyncio.to_thread(hosted.controller.data_extents)
                status.stored_bytes = sum(length for _, length in extents)
            return status
        return await self._guard(context, get())

    async def StartWorkload(self, request: agent_pb2.StartWorkloadRequest,
                            context: grpc.aio.ServicerContext) -> agent_pb2.ControllerStatus:
        async def start() -> agent_pb2.ControllerStatus:
            hosted = await self.host.start_workload(request.controller_id, spec_from_message(request.workload))
            return controller_status(self.host.name, hosted)
        return await self._guard(context, start())

    async def SetControllerLimits(self, request: agent_pb2.SetControllerLimitsRequest,
                                  context: grpc.aio.ServicerContext) -> agent_pb2.ControllerStatus:
        async def set_limits() -> agent_pb2.ControllerStatus:
            self._check_controller_id(request.controller_id)
            changes = io_limits.changes_in(request.limits)
            problem = io_limits.changes_problem(changes)
            if problem:
                raise SessionError(ErrorKind.INVALID, problem)
            hosted = await self.host.set_limits(request.controller_id, changes, request.clear)
            return controller_status(self.host.name, hosted, self.host.limits(request.controller_id))
        return await self._guard(context, set_limits())

    async def StopWorkload(self, request: agent_pb2.GetControllerRequest,
                           context: grpc.aio.ServicerContext) -> agent_pb2.ControllerStatus:
        async def stop() -> agent_pb2.ControllerStatus:
            hosted = self.host.hosted(request.controller_id)
            if hosted.workload is not None:
                await asyncio.to_thread(hosted.workload.stop)
            return controller_status(self.host.name, hosted)
        return await self._guard(context, stop())

    async def Verify(self, request: agent_pb2.VerifyRequest,
                     context: grpc.aio.ServicerContext) -> agent_pb2.VerifyResponse:
        async def verify() -> agent_pb2.VerifyResponse:
            hosted, guest = self.host.guest_of(request.controller_id, "Verify")
            if hosted.workload is None:
                raise SessionError(ErrorKind.PRECONDITION,
                                   f"controller {request.controller_id!r} has no guest workload "
                                   "whose writes could be verified")
            for receipt in request.receipts:
                if receipt.seq < 0:
                    raise SessionError(ErrorKind.INVALID, f"receipt seq {receipt.seq} must be >= 0; pass the "
                                                          "receipt as GetController reported it")
            receipts = [receipt_from_message(r) for r in request.receipts]
            result = await asyncio.to_thread(verify_blocks, guest, hosted.workload, receipts)
            return agent_pb2.VerifyResponse(ok=result.ok, blocks_checked=result.blocks_checked,
                                            mismatches=result.mismatches, first_mismatch=result.first_mismatch,
                                            node=self.host.name,
                                            controller=controller_status(self.host.name, hosted),
                                            receipts_checked=result.receipts_checked)
        return await self._guard(context, verify())

    # ---- destination ----------------------------------------------------------------------

    async def PrepareDestination(self, request: agent_pb2.PrepareDestinationRequest,
                                 context: grpc.aio.ServicerContext) -> agent_pb2.PrepareDestinationResponse:
        async def prepare() -> agent_pb2.PrepareDestinationResponse:
            self._check_ref(request.ref)
            session = await self.host.prepare_destination(
                request.ref.job_id, request.ref.epoch, request.ref.controller_id, request.namespace_bytes,
                request.state_format_version, source_node=request.source_node)
            return agent_pb2.PrepareDestinationResponse(data_address=self.host.receiver.address,
                                                        token=session.token)
        return await self._guard(context, prepare())

    async def ResumeDestination(self, request: agent_pb2.MigrationRef,
                                context: grpc.aio.ServicerContext) -> agent_pb2.SessionStatus:
        async def resume() -> agent_pb2.SessionStatus:
            self._check_ref(request)
            session = self.host.session(request.job_id)
            if not isinstance(session, DestinationSession):
                raise SessionError(ErrorKind.PRECONDITION, f"job {request.job_id} is not a destination here")
            session.check_epoch(request.epoch)
            await self.host.destination_running(session)
            return self._session_status(session, request.job_id)
        return await self._guard(context, resume())

    # ---- source ---------------------------------------------------------------------------

    async def StartPrecopy(self, request: agent_pb2.StartPrecopyRequest,
                           context: grpc.aio.ServicerContext) -> agent_pb2.TransferResult:
        async def precopy() -> agent_pb2.TransferResult:
            self._check_ref(request.ref)
            session = await self.host.source_session(request.ref.job_id, request.ref.epoch,
                                                     request.ref.controller_id, request.token)
            facts = await session.start_precopy(request.destination_data_address, request.token,
                                                request.bandwidth_bytes_per_s, request.destination_node)
            return transfer_result(facts)
        return await self._guard(context, precopy())

    async def _source(self, ref: agent_pb2.MigrationRef) -> SourceSession:
        self._check_ref(ref)
        session = self.host.session(ref.job_id)
        if not isinstance(session, SourceSession):
            raise SessionError(ErrorKind.PRECONDITION, f"job {ref.job_id} is not a source here")
        session.check_epoch(ref.epoch)
        return session

    async def DirtyRound(self, request: agent_pb2.DirtyRoundRequest,
                         context: grpc.aio.ServicerContext) -> agent_pb2.TransferResult:
        async def dirty_round() -> agent_pb2.TransferResult:
            session = await self._source(request.ref)
            if not 0 <= request.throttle_percent <= 99:
                raise SessionError(ErrorKind.INVALID, f"throttle_percent {request.throttle_percent} must be 0..99")
            facts = await session.dirty_round(request.round, request.bandwidth_bytes_per_s,
                                              request.throttle_percent)
            return transfer_result(facts)
        return await self._guard(context, dirty_round())

    async def StopAndCopy(self, request: agent_pb2.MigrationRef,
                          context: grpc.aio.ServicerContext) -> agent_pb2.TransferResult:
        async def stop_and_copy() -> agent_pb2.TransferResult:
            session = await self._source(request)
            plan = request.plan.SerializeToString() if request.HasField("plan") else b""
            return transfer_result(await session.stop_and_copy(plan))
        return await self._guard(context, stop_and_copy())

    async def ReleaseSource(self, request: agent_pb2.MigrationRef,
                            context: grpc.aio.ServicerContext) -> agent_pb2.SessionStatus:
        async def release() -> agent_pb2.SessionStatus:
            session = await self._source(request)
            await self.host.source_released(session)
            return self._session_status(session, request.job_id)
        return await self._guard(context, release())

    async def AbortMigration(self, request: agent_pb2.MigrationRef,
                             context: grpc.aio.ServicerContext) -> agent_pb2.SessionStatus:
        async def abort() -> agent_pb2.SessionStatus:
            problem = names.job_id_problem(request.job_id)  # the controller id may be unknown to the caller
            if problem:
                raise SessionError(ErrorKind.INVALID, problem)
            session = await self.host.abort(request.job_id, request.epoch, "aborted by the orchestrator",
                                            request.controller_id, commit_never_sent=request.commit_never_sent)
            assert session is None or isinstance(session, SourceSession | DestinationSession)
            return self._session_status(session, request.job_id)
        return await self._guard(context, abort())

    async def GetSession(self, request: agent_pb2.MigrationRef,
                         context: grpc.aio.ServicerContext) -> agent_pb2.SessionStatus:
        session = self.host.sessions.get(request.job_id)
        assert session is None or isinstance(session, SourceSession | DestinationSession)
        return self._session_status(session, request.job_id)

    # ---- NBD ------------------------------------------------------------------------------

    async def ExportController(self, request: agent_pb2.GetControllerRequest,
                               context: grpc.aio.ServicerContext) -> agent_pb2.ExportControllerResponse:
        async def export() -> agent_pb2.ExportControllerResponse:
            self._check_controller_id(request.controller_id)
            return agent_pb2.ExportControllerResponse(uri=self.host.export_controller(request.controller_id))
        return await self._guard(context, export())

    async def UnexportController(self, request: agent_pb2.GetControllerRequest,
                                 context: grpc.aio.ServicerContext) -> agent_pb2.ExportControllerResponse:
        async def unexport() -> agent_pb2.ExportControllerResponse:
            self._check_controller_id(request.controller_id)
            # Idempotent, even for a controller that is gone: the caller wants no export either way.
            self.host.nbd.unexport(request.controller_id)
            return agent_pb2.ExportControllerResponse(uri="")
        return await self._guard(context, unexport())

    async def InjectFault(self, request: agent_pb2.InjectFaultRequest,
                          context: grpc.aio.ServicerContext) -> agent_pb2.InjectFaultResponse:
        if not self.allow_fault_injection:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                                "fault injection is off on this agent: it corrupts and replays data-plane frames and "
                                "stalls the agent, so only an agent started with --allow-fault-injection (tests) "
                                "takes it")
        for name, index in (("corrupt_frame", request.corrupt_frame), ("replay_frame", request.replay_frame)):
            if index < 0:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                    f"{name} {index} must be >= 0 (a 1-based data-frame index; 0 clears)")
        if not 0 <= request.stall_event_loop_ms <= MAX_STALL_MS:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"stall_event_loop_ms {request.stall_event_loop_ms} must be 0 to {MAX_STALL_MS}")
        for name, ms in (("hold_commit_ms", request.hold_commit_ms), ("hold_final_ms", request.hold_final_ms)):
            if not 0 <= ms <= MAX_STALL_MS:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{name} {ms} must be 0 to {MAX_STALL_MS}")
        if request.HasField("health"):
            values = {f.name: value for f, value in request.health.ListFields()}
            hosting = self.host.hosting
            # duck-typed: importing the emulated backend here would load the NVMe model into every agent
            set_health = getattr(hosting, "set_health", None)
            if not callable(set_health):
                await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                    f"backend {hosting.kind} reads a real drive's health; only the emulated "
                                    "backend's can be set")
                return agent_pb2.InjectFaultResponse()
            try:
                set_health(**values)
            except HostingError as exc:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            await self.host.read_health()
            self.host.publish_soon()
        self.host.pending_frame_faults = FrameFaults(corrupt_frame=request.corrupt_frame,
                                                     replay_frame=request.replay_frame)
        self.host.switchover_faults.hold_commit_s = request.hold_commit_ms / 1000.0
        self.host.switchover_faults.hold_final_s = request.hold_final_ms / 1000.0
        self.host.switchover_faults.exit_after_commit = request.exit_after_commit
        if request.stall_event_loop_ms:
            # A blocking sleep on the loop itself, after this reply is on its way: every call and
            # guest stalls, the lease thread does not.
            asyncio.get_running_loop().call_later(0.05, time.sleep, request.stall_event_loop_ms / 1000.0)
        return agent_pb2.InjectFaultResponse()
