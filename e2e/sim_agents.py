"""SIMULATED agents: fakes that stand for hosts we do not have, many to one process, for
benchmarks of the control plane at scale (e2e/bench_scale.py) and the test that keeps them in step
with the protocol (tests/test_sim_agents.py).

Each simulated agent is an ordinary node to the orchestrator: its own gRPC server (port) speaking
the real AgentService proto, and its node record registered in etcd under a lease by the real
registration code (agent.node_lease.NodeLease; the leases of one process share one lease thread
and etcd connection, where real agents have one each: the request rate on etcd is the same, the
connection count is not). Controllers are claimed in etcd as the real agent claims them
(EtcdStore.claim_controller), and ResumeDestination claims RUNNING in etcd (EtcdStore.claim_running)
before the controller counts as running here, as agent.host does; the node record is written again
where the real agent writes it (a destination prepared, a controller running, a source released
or aborted).

What is NOT simulated: no byte moves. StartPrecopy reports the whole namespace sent after
`--precopy-delay-ms`, leaving `--dirty-bytes` changed; a DirtyRound sends those and leaves a tenth;
StopAndCopy sends the rest and, with a switchover plan, sends the destination's commit to etcd
itself (the real destination does, once the source sent it the state over the data plane). A
destination counts its copy as running when ResumeDestination comes. Both sides report the same digest of the
switchover image (derived from the controller and job), so verification passes. No guest runs:
the guest blackout reported is 0.

Every step call (PrepareDestination, StartPrecopy, DirtyRound, StopAndCopy, ResumeDestination)
is recorded with its arrival and reply times on CLOCK_MONOTONIC (one clock for every process of
the machine) and written, one JSON object a line, to `--events` when the process stops: the
gaps between one step's reply and the next step's arrival are the orchestrator's own time
between steps.

    python -m e2e.sim_agents --etcd 127.0.0.1:2379 --first 0 --count 250 --events /tmp/sim-0.jsonl
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import logging
import secrets
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import grpc
import grpc.aio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agent.node_lease import NodeLease
from cluster import agent_errors
from cluster.etcd_config import plain
from cluster.records import ControllerRecord, NodeRecord
from cluster.store import DEFAULT_PREFIX, ConflictError, EtcdError, EtcdStore
from cluster.store_thread import StoreThread
from proto.v1 import agent_pb2, agent_pb2_grpc

log = logging.getLogger("sim_agents")
T = TypeVar("T")

STATE_FORMAT_VERSION = 1  # the real agent's (agent.nvme.state_format), which the runner sends
MAX_SESSIONS = 64  # as agent.host: migrations a node takes part in at once
SIM_BACKEND = "sim"
STATE_BYTES = 4096
STEP_CALLS = ("PrepareDestination", "StartPrecopy", "DirtyRound", "StopAndCopy", "ResumeDestination")
ENDED = frozenset({"released", "aborted", "running"})
REGISTER_PARALLEL = 32


@dataclass(frozen=True)
class SimSettings:
    precopy_delay_s: float = 0.05  # how long "copying" the namespace takes
    round_delay_s: float = 0.01
    stop_delay_s: float = 0.005
    dirty_bytes: int = 1 << 20  # changed during precopy; 0: no dirty round is needed


@dataclass
class SimSession:
    job_id: str
    epoch: int
    controller_id: str
    role: str  # "source" or "destination"
    namespace_bytes: int
    stage: str  # agent.session_states' stage names
    token: str = ""
    bytes_sent: int = 0
    bytes_received: int = 0
    digest: str = ""
    dirty_left: int = 0
    results: dict[str, agent_pb2.TransferResult] = field(default_factory=dict)  # step -> its result
    running: dict[str, asyncio.Task[agent_pb2.TransferResult]] = field(default_factory=dict)


class Refusal(Exception):
    def __init__(self, code: grpc.StatusCode, message: str, stale: agent_errors.StaleEpochDetail | None = None):
        super().__init__(message)
        self.code, self.message, self.stale = code, message, stale


def switchover_digest(controller_id: str, job_id: str, namespace_bytes: int) -> str:
    """What both sides report as the digest of the switchover image: equal, as no byte changed."""
    return hashlib.sha256(f"{controller_id}/{job_id}/{namespace_bytes}".encode()).hexdigest()


class SimAgent(agent_pb2_grpc.AgentServiceServicer):
    """One simulated host. Unlisted RPCs (workloads, NBD, Verify, faults) answer UNIMPLEMENTED."""

    def __init__(self, name: str, host: str, capacity_bytes: int, store: EtcdStore, lease_thread: StoreThread,
                 lease_ttl_s: int, settings: SimSettings, events: list[dict[str, object]]) -> None:
        self.name = name
        self.host = host
        self.capacity_bytes = capacity_bytes
        self.store = store
        self.settings = settings
        self.events = events
        self.address = ""
        self.controllers: dict[str, tuple[int, str]] = {}  # id -> (namespace bytes, vfio state)
        self.destinations: dict[str, int] = {}  # job id -> namespace bytes held for an incoming copy
        self.sessions: dict[str, SimSession] = {}
        self.lease = NodeLease(store.config, store.prefix, name, lease_ttl_s, thread=lease_thread)
        self.server: grpc.aio.Server | None = None
        self.started_at = time.time()
        self._publishing: asyncio.Task[None] | None = None
        self._publish_wanted = False

    # ---- lifecycle and registration -------------------------------------------------------------

    async def start(self) -> None:
        self.server = grpc.aio.server()
        agent_pb2_grpc.add_AgentServiceServicer_to_server(self, self.server)
        port = self.server.add_insecure_port(f"{self.host}:0")
        await self.server.start()
        self.address = f"{self.host}:{port}"
        await self.lease.start(self.record())

    async def stop(self) -> None:
        if self._publishing is not None:
            self._publishing.cancel()
        if self.server is not None:
            await self.server.stop(grace=0.5)
        await self.lease.stop()

    @property
    def allocated_bytes(self) -> int:
        return sum(size for size, _ in self.controllers.values()) + sum(self.destinations.values())

    def record(self) -> NodeRecord:
        return NodeRecord(name=self.name, address=self.address, data_address=self.address,
                          capacity_bytes=self.capacity_bytes, allocated_bytes=self.allocated_bytes,
                          controllers=tuple(sorted(self.controllers)), state_format_version=STATE_FORMAT_VERSION,
                          started_at=self.started_at, backend=SIM_BACKEND)

    async def publish(self) -> None:
        await self.lease.publish(self.record())

    def publish_soon(self) -> None:
        """As agent.host: an abort does not wait on etcd; the record is written in the background."""
        self._publish_wanted = True
        if self._publishing is None or self._publishing.done():
            self._publishing = asyncio.create_task(self._publish_until_done())

    async def _publish_until_done(self) -> None:
        while self._publish_wanted:
            self._publish_wanted = False
            try:
                await self.publish()
            except EtcdError:
                self._publish_wanted = True
                await asyncio.sleep(0.5)

    # ---- call plumbing --------------------------------------------------------------------------

    async def _guard(self, context: grpc.aio.ServicerContext, what: str, job_id: str, work: Awaitable[T]) -> T:
        started = time.monotonic()
        try:
            return await work
        except Refusal as exc:
            if exc.stale is not None:
                await context.abort_with_status(agent_errors.stale_epoch_status(exc.message, exc.stale))
            await context.abort(exc.code, exc.message)
        except EtcdError as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"etcd is unavailable: {exc}")
        finally:
            if what in STEP_CALLS:
                self.events.append({"node": self.name, "call": what, "job": job_id, "t_in": started,
                                    "t_out": time.monotonic()})
        raise AssertionError("context.abort raises")

    def _session(self, job_id: str, epoch: int, role: str) -> SimSession | None:
        session = self.sessions.get(job_id)
        if session is None:
            return None
        if session.role != role:
            raise Refusal(grpc.StatusCode.FAILED_PRECONDITION,
                          f"job {job_id} is a {session.role} on node {self.name!r}")
        _check_epoch(session, epoch)
        return session

    def _required(self, job_id: str, epoch: int, role: str) -> SimSession:
        session = self._session(job_id, epoch, role)
        if session is None:
            raise Refusal(grpc.StatusCode.NOT_FOUND, f"job {job_id} has no session on node {self.name!r}")
        return session

    def _refuse_if_too_many_sessions(self) -> None:
        active = sum(1 for s in self.sessions.values() if s.stage not in ENDED)
        if active >= MAX_SESSIONS:
            raise Refusal(grpc.StatusCode.FAILED_PRECONDITION,
                          f"node {self.name!r} already takes part in {active} migrations (at most {MAX_SESSIONS})")

    def _status(self, session: SimSession | None, job_id: str) -> agent_pb2.SessionStatus:
        if session is None:
            return agent_pb2.SessionStatus(job_id=job_id, stage="unknown")
        return agent_pb2.SessionStatus(job_id=job_id, role=session.role, stage=session.stage, epoch=session.epoch,
                                       bytes_sent=session.bytes_sent, bytes_received=session.bytes_received,
                                       digest=session.digest)

    async def _step(self, session: SimSession, step: str,
                    work: Callable[[], Awaitable[agent_pb2.TransferResult]]) -> agent_pb2.TransferResult:
        """A repeated step attaches to the one in flight or returns its result, as the real agent's."""
        if step in session.results:
            return session.results[step]
        task = session.running.get(step)
        if task is None:
            task = asyncio.ensure_future(work())
            session.running[step] = task
        result = await asyncio.shield(task)
        session.results[step] = result
        session.running.pop(step, None)
        return result

    # ---- info and controllers -------------------------------------------------------------------

    async def GetInfo(self, request: agent_pb2.GetInfoRequest,
                      context: grpc.aio.ServicerContext) -> agent_pb2.AgentInfo:
        return agent_pb2.AgentInfo(
            node=self.name, data_address=self.address, capacity_bytes=self.capacity_bytes,
            allocated_bytes=self.allocated_bytes, state_format_version=STATE_FORMAT_VERSION,
            controllers=[agent_pb2.ControllerStatus(controller_id=cid, node=self.name, vfio_state=state,
                                                    namespace_bytes=size)
                         for cid, (size, state) in self.controllers.items()],
            sessions=[self._status(s, job_id) for job_id, s in self.sessions.items()])

    async def CreateController(self, request: agent_pb2.CreateControllerRequest,
                               context: grpc.aio.ServicerContext) -> agent_pb2.ControllerStatus:
        async def create() -> agent_pb2.ControllerStatus:
            cid, size = request.controller_id, request.namespace_bytes
            if cid in self.controllers:
                raise Refusal(grpc.StatusCode.ALREADY_EXISTS, f"controller {cid!r} already runs on node {self.name!r}")
            if size <= 0 or size % 4096:
                raise Refusal(grpc.StatusCode.INVALID_ARGUMENT,
                              f"namespace_bytes {size} must be a positive multiple of 4096")
            if self.allocated_bytes + size > self.capacity_bytes:
                raise Refusal(grpc.StatusCode.FAILED_PRECONDITION, f"node {self.name!r}: no room for {size} bytes")
            if not await self.store.claim_controller(ControllerRecord(controller_id=cid, node=self.name,
                                                                      namespace_bytes=size)):
                raise Refusal(grpc.StatusCode.ALREADY_EXISTS, f"controller {cid!r} already exists on another node")
            self.controllers[cid] = (size, "RUNNING")
            await self.publish()
            return agent_pb2.ControllerStatus(controller_id=cid, node=self.name, vfio_state="RUNNING",
                                              namespace_bytes=size)
        return await self._guard(context, "CreateController", "", create())

    async def GetController(self, request: agent_pb2.GetControllerRequest,
                            context: grpc.aio.ServicerContext) -> agent_pb2.ControllerStatus:
        async def get() -> agent_pb2.ControllerStatus:
            held = self.controllers.get(request.controller_id)
            if held is None:
                raise Refusal(grpc.StatusCode.NOT_FOUND,
                              f"controller {request.controller_id!r} does not run on node {self.name!r}")
            size, state = held
            return agent_pb2.ControllerStatus(controller_id=request.controller_id, node=self.name, vfio_state=state,
                                              namespace_bytes=size,
                                              stored_bytes=size if request.with_stored_bytes else 0)
        return await self._guard(context, "GetController", "", get())

    # ---- destination ----------------------------------------------------------------------------

    async def PrepareDestination(self, request: agent_pb2.PrepareDestinationRequest,
                                 context: grpc.aio.ServicerContext) -> agent_pb2.PrepareDestinationResponse:
        ref = request.ref

        async def prepare() -> agent_pb2.PrepareDestinationResponse:
            found = self._session(ref.job_id, ref.epoch, "destination")
            if found is not None:
                if found.stage == "aborted":
                    raise Refusal(grpc.StatusCode.FAILED_PRECONDITION,
                                  f"job {ref.job_id} was aborted on node {self.name!r}")
                return agent_pb2.PrepareDestinationResponse(data_address=self.address, token=found.token)
            if request.state_format_version != STATE_FORMAT_VERSION:
                raise Refusal(grpc.StatusCode.FAILED_PRECONDITION,
                              f"controller-state format version {request.state_format_version} is not supported")
            if ref.controller_id in self.controllers:
                raise Refusal(grpc.StatusCode.FAILED_PRECONDITION,
                              f"controller {ref.controller_id!r} already runs on node {self.name!r}")
            self._refuse_if_too_many_sessions()
            if self.allocated_bytes + request.namespace_bytes > self.capacity_bytes:
                raise Refusal(grpc.StatusCode.FAILED_PRECONDITION,
                              f"node {self.name!r}: no room for {request.namespace_bytes} bytes")
            session = SimSession(ref.job_id, ref.epoch, ref.controller_id, "destination", request.namespace_bytes,
                                 "resuming", token=secrets.token_hex(16))
            self.sessions[ref.job_id] = session
            self.destinations[ref.job_id] = request.namespace_bytes
            await self.publish()
            return agent_pb2.PrepareDestinationResponse(data_address=self.address, token=session.token)
        return await self._guard(context, "PrepareDestination", ref.job_id, prepare())

    async def ResumeDestination(self, request: agent_pb2.MigrationRef,
                                context: grpc.aio.ServicerContext) -> agent_pb2.SessionStatus:
        async def resume() -> agent_pb2.SessionStatus:
            session = self._required(request.job_id, request.epoch, "destination")
            if session.stage == "running":
                return self._status(session, request.job_id)
            if session.stage == "aborted":
                raise Refusal(grpc.StatusCode.FAILED_PRECONDITION, f"job {request.job_id} was aborted here")
            session.stage = "loaded"  # (simulated: the real source says so over the data plane)
            # As agent.host.destination_running: the claim of RUNNING in etcd comes before it runs.
            problem = await self.store.claim_running(session.controller_id, self.name)
            if problem:
                raise Refusal(grpc.StatusCode.FAILED_PRECONDITION, problem)
            self.destinations.pop(session.job_id, None)
            self.controllers[session.controller_id] = (session.namespace_bytes, "RUNNING")
            session.stage = "running"
            session.bytes_received = session.namespace_bytes
            session.digest = switchover_digest(session.controller_id, session.job_id, session.namespace_bytes)
            await self.publish()
            return self._status(session, request.job_id)
        return await self._guard(context, "ResumeDestination", request.job_id, resume())

    # ---- source ---------------------------------------------------------------------------------

    async def StartPrecopy(self, request: agent_pb2.StartPrecopyRequest,
                           context: grpc.aio.ServicerContext) -> agent_pb2.TransferResult:
        ref = request.ref

        async def precopy() -> agent_pb2.TransferResult:
            session = self._session(ref.job_id, ref.epoch, "source")
            if session is None or (session.stage == "aborted" and session.token != request.token):
                self._refuse_if_too_many_sessions()
                held = self.controllers.get(ref.controller_id)
                if held is None:
                    raise Refusal(grpc.StatusCode.NOT_FOUND,
                                  f"controller {ref.controller_id!r} does not run on node {self.name!r}")
                if held[1] != "RUNNING":
                    raise Refusal(grpc.StatusCode.FAILED_PRECONDITION,
                                  f"controller {ref.controller_id!r} is {held[1]} on node {self.name!r}, not RUNNING")
                session = SimSession(ref.job_id, ref.epoch, ref.controller_id, "source", held[0], "new",
                                     token=request.token)
                self.sessions[ref.job_id] = session
            if session.stage == "aborted":
                raise Refusal(grpc.StatusCode.ABORTED, f"job {ref.job_id} was aborted on node {self.name!r}")
            src = session

            async def copy() -> agent_pb2.TransferResult:
                src.stage = "precopy"
                self.controllers[src.controller_id] = (src.namespace_bytes, "PRE_COPY")
                await asyncio.sleep(self.settings.precopy_delay_s)
                src.bytes_sent += src.namespace_bytes
                src.dirty_left = min(self.settings.dirty_bytes, src.namespace_bytes)
                duration = max(self.settings.precopy_delay_s, 1e-3)
                return agent_pb2.TransferResult(bytes_sent=src.namespace_bytes, blocks_sent=src.namespace_bytes // 4096,
                                                duration_s=duration, dirty_bytes_remaining=src.dirty_left,
                                                dirty_rate_bytes_per_s=src.dirty_left / duration,
                                                total_bytes_sent=src.bytes_sent)
            return await self._step(src, "precopy", copy)
        return await self._guard(context, "StartPrecopy", ref.job_id, precopy())

    async def DirtyRound(self, request: agent_pb2.DirtyRoundRequest,
                         context: grpc.aio.ServicerContext) -> agent_pb2.TransferResult:
        ref = request.ref

        async def dirty_round() -> agent_pb2.TransferResult:
            session = self._required(ref.job_id, ref.epoch, "source")
            if session.stage not in ("precopy", "round"):
                raise Refusal(grpc.StatusCode.FAILED_PRECONDITION,
                              f"job {ref.job_id}: the source is {session.stage}, so it cannot go to round")

            async def copy() -> agent_pb2.TransferResult:
                session.stage = "round"
                await asyncio.sleep(self.settings.round_delay_s)
                sent, session.dirty_left = session.dirty_left, session.dirty_left // 10
                session.bytes_sent += sent
                duration = max(self.settings.round_delay_s, 1e-3)
                return agent_pb2.TransferResult(bytes_sent=sent, blocks_sent=sent // 4096, duration_s=duration,
                                                dirty_bytes_remaining=session.dirty_left,
                                                dirty_rate_bytes_per_s=session.dirty_left / duration,
                                                round=request.round, total_bytes_sent=session.bytes_sent)
            return await self._step(session, f"round {request.round}", copy)
        return await self._guard(context, "DirtyRound", ref.job_id, dirty_round())

    async def StopAndCopy(self, request: agent_pb2.MigrationRef,
                          context: grpc.aio.ServicerContext) -> agent_pb2.TransferResult:
        async def stop_and_copy() -> agent_pb2.TransferResult:
            session = self._required(request.job_id, request.epoch, "source")
            if session.stage not in ("precopy", "round", "stop-and-copy", "stopped"):
                raise Refusal(grpc.StatusCode.FAILED_PRECONDITION,
                              f"job {request.job_id}: the source is {session.stage}, so it cannot go to stop-and-copy")

            async def copy() -> agent_pb2.TransferResult:
                session.stage = "stop-and-copy"
                self.controllers[session.controller_id] = (session.namespace_bytes, "STOP_COPY")
                await asyncio.sleep(self.settings.stop_delay_s)
                sent, session.dirty_left = session.dirty_left, 0
                session.bytes_sent += sent + STATE_BYTES
                session.stage = "stopped"
                self.controllers[session.controller_id] = (session.namespace_bytes, "STOP")
                session.digest = switchover_digest(session.controller_id, session.job_id, session.namespace_bytes)
                result = agent_pb2.TransferResult(bytes_sent=sent, blocks_sent=sent // 4096,
                                                  duration_s=max(self.settings.stop_delay_s, 1e-3),
                                                  state_bytes=STATE_BYTES, total_bytes_sent=session.bytes_sent)
                if request.HasField("plan"):
                    await self._commit(request.plan, session, result)
                return result
            return await self._step(session, "stop-and-copy", copy)
        return await self._guard(context, "StopAndCopy", request.job_id, stop_and_copy())

    async def _commit(self, plan: agent_pb2.SwitchoverPlan, session: SimSession,
                      result: agent_pb2.TransferResult) -> None:
        """The switchover's commit, which the real destination sends once it loaded the state: sent
        here by the source, standing in for it (no data plane); the destination runs the
        controller when ResumeDestination comes, which finds it claimed already."""
        plan_owner = ControllerRecord.from_bytes(plan.controller_record)
        job = json.loads(plan.job_record)
        try:
            result.commit_revision = await self.store.commit_switchover(
                session.job_id, plan.job_record, plan.job_revision, plan_owner, plan.controller_revision,
                str(job["destination_node"]), plan.leader_term)
        except ConflictError as exc:
            session.stage = "aborted"
            self.controllers[session.controller_id] = (session.namespace_bytes, "RUNNING")
            result.switchover, result.switchover_note = agent_pb2.SWITCHOVER_NOT_COMMITTED, str(exc)
            return
        except EtcdError as exc:
            result.switchover, result.switchover_note = agent_pb2.SWITCHOVER_UNKNOWN, str(exc)
            return
        result.switchover = agent_pb2.SWITCHOVER_COMMITTED

    async def ReleaseSource(self, request: agent_pb2.MigrationRef,
                            context: grpc.aio.ServicerContext) -> agent_pb2.SessionStatus:
        async def release() -> agent_pb2.SessionStatus:
            session = self._required(request.job_id, request.epoch, "source")
            if session.stage == "released":
                return self._status(session, request.job_id)
            if session.stage != "stopped":
                raise Refusal(grpc.StatusCode.FAILED_PRECONDITION,
                              f"job {request.job_id}: the source is {session.stage}, so it cannot go to released")
            session.stage = "released"
            self.controllers.pop(session.controller_id, None)
            await self.publish()
            return self._status(session, request.job_id)
        return await self._guard(context, "ReleaseSource", request.job_id, release())

    # ---- either side ----------------------------------------------------------------------------

    async def AbortMigration(self, request: agent_pb2.MigrationRef,
                             context: grpc.aio.ServicerContext) -> agent_pb2.SessionStatus:
        async def abort() -> agent_pb2.SessionStatus:
            session = self.sessions.get(request.job_id)
            if session is None:
                return self._status(None, request.job_id)
            _check_epoch(session, request.epoch)
            if session.stage in ("aborted", "released", "running"):
                return self._status(session, request.job_id)
            if session.role == "source":
                if session.stage == "stopped" and not request.commit_never_sent:
                    # As agent.host.abort: past stop-and-copy, etcd says whether it may run here again.
                    owner = await self.store.get_controller(session.controller_id)
                    if owner is None or owner[0].node != self.name:
                        where = owner[0].node if owner else "nobody"
                        raise Refusal(grpc.StatusCode.FAILED_PRECONDITION,
                                      f"controller {session.controller_id!r} belongs to {where!r} since COMMIT")
                for task in session.running.values():
                    task.cancel()
                self.controllers[session.controller_id] = (session.namespace_bytes, "RUNNING")
            else:
                self.destinations.pop(session.job_id, None)
            session.stage = "aborted"
            self.publish_soon()
            return self._status(session, request.job_id)
        return await self._guard(context, "AbortMigration", request.job_id, abort())

    async def GetSession(self, request: agent_pb2.MigrationRef,
                         context: grpc.aio.ServicerContext) -> agent_pb2.SessionStatus:
        return self._status(self.sessions.get(request.job_id), request.job_id)


def _check_epoch(session: SimSession, epoch: int) -> None:
    if epoch < session.epoch:
        raise Refusal(grpc.StatusCode.FAILED_PRECONDITION,
                      f"stale epoch {epoch} for job {session.job_id}: epoch {session.epoch} already drives it",
                      stale=agent_errors.StaleEpochDetail(session.job_id, epoch, session.epoch))
    session.epoch = epoch


@dataclass
class SimProcess:
    """The simulated agents of one process: their servers, their leases (one shared lease thread),
    one etcd store for their controller claims."""

    names: list[str]
    etcd: str
    prefix: str = DEFAULT_PREFIX
    host: str = "127.0.0.1"
    capacity_bytes: int = 1 << 40
    lease_ttl_s: int = 5
    settings: SimSettings = field(default_factory=SimSettings)
    agents: list[SimAgent] = field(default_factory=list)
    events: list[dict[str, object]] = field(default_factory=list)

    async def start(self) -> None:
        self.store = EtcdStore(plain(self.etcd), prefix=self.prefix)
        await self.store.connect()
        self.lease_thread = StoreThread(self.store.config, self.prefix, "sim-node-leases")
        self.lease_thread.start()
        self.agents = [SimAgent(name, self.host, self.capacity_bytes, self.store, self.lease_thread,
                                self.lease_ttl_s, self.settings, self.events) for name in self.names]
        gate = asyncio.Semaphore(REGISTER_PARALLEL)

        async def start_one(agent: SimAgent) -> None:
            async with gate:
                await agent.start()
        await asyncio.gather(*(start_one(a) for a in self.agents))

    async def stop(self) -> None:
        await asyncio.gather(*(a.stop() for a in self.agents), return_exceptions=True)
        await asyncio.to_thread(self.lease_thread.stop, 5.0)
        await self.store.close()


async def _serve(args: argparse.Namespace) -> int:
    names = [f"{args.name_prefix}{i:04d}" for i in range(args.first, args.first + args.count)]
    sim = SimProcess(names, args.etcd, args.etcd_prefix, args.host, args.capacity_gib << 30, args.lease_ttl_s,
                     SimSettings(precopy_delay_s=args.precopy_delay_ms / 1000.0,
                                 round_delay_s=args.round_delay_ms / 1000.0, stop_delay_s=args.stop_delay_ms / 1000.0,
                                 dirty_bytes=args.dirty_bytes))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await sim.start()
        print(f"simulated agents {names[0]}..{names[-1]} registered ({len(names)})", flush=True)
        await stop.wait()
    finally:
        with contextlib.suppress(Exception):
            await sim.stop()
        if args.events is not None:
            args.events.write_text("".join(json.dumps(e) + "\n" for e in sim.events))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m e2e.sim_agents", description=__doc__.splitlines()[0])
    parser.add_argument("--etcd", required=True, help="etcd HOST:PORT")
    parser.add_argument("--etcd-prefix", default=DEFAULT_PREFIX)
    parser.add_argument("--name-prefix", default="sim-", help="simulated node names are this plus a 4-digit number")
    parser.add_argument("--first", type=int, default=0, help="number of the first simulated node")
    parser.add_argument("--count", type=int, default=250, help="simulated nodes in this process")
    parser.add_argument("--host", default="127.0.0.1", help="where their gRPC servers listen (each its own port)")
    parser.add_argument("--capacity-gib", type=int, default=1024)
    parser.add_argument("--lease-ttl-s", type=int, default=5)
    parser.add_argument("--precopy-delay-ms", type=float, default=50.0)
    parser.add_argument("--round-delay-ms", type=float, default=10.0)
    parser.add_argument("--stop-delay-ms", type=float, default=5.0)
    parser.add_argument("--dirty-bytes", type=int, default=1 << 20,
                        help="bytes left changed after precopy (0: straight to stop-and-copy)")
    parser.add_argument("--events", type=Path, default=None, help="write the step calls here (JSON lines) at exit")
    args = parser.parse_args(argv)
    for flag in ("count", "capacity_gib", "lease_ttl_s"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    if args.first < 0 or args.first + args.count > 10000:
        parser.error(f"--first {args.first} --count {args.count}: node numbers must lie in 0..9999")
    for flag in ("precopy_delay_ms", "round_delay_ms", "stop_delay_ms", "dirty_bytes"):
        if getattr(args, flag) < 0:
            parser.error(f"--{flag.replace('_', '-')} must be 0 or more, got {getattr(args, flag)}")
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    return asyncio.run(_serve(args))


if __name__ == "__main__":
    sys.exit(main())
