"""Drives one migration job through its phases by calling the agents.

The decisions live in pure modules (`jobs`, `convergence`, `scheduler`); this module does the
I/O. Every phase is written to etcd (a CAS on the job's revision) before its actions run, and
every agent command carries the job id and this leader's epoch, so a runner started after an
orchestrator restart picks the job up where etcd says it is and repeats the phase's commands;
the agents attach a repeated command to the work already running or return its result.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import grpc
import grpc.aio

from cluster.records import LOST, NodeRecord
from cluster.store import ConflictError, EtcdError, EtcdStore
from orchestrator import convergence, scheduler
from orchestrator.agent_client import TRANSIENT_CODES, AgentDirectory, AgentUnreachable, call_with_retry
from orchestrator.jobs import BEFORE_COMMIT, Job, Phase
from orchestrator.observer import JobObserver
from proto.v1 import agent_pb2, agent_pb2_grpc

log = logging.getLogger(__name__)
T = TypeVar("T")

STATE_FORMAT_VERSION = 1
LONG_CALL_DEADLINE_S = 20.0  # a long transfer call is re-issued (it attaches) after this
PROGRESS_INTERVAL_S = 0.5
DIGEST_WAIT_S = 120.0
MAX_DESTINATION_ATTEMPTS = 3
ADDRESS_CACHE_S = 1.0
# Phases in which a lost destination is replaced by another one (precopy starts over).
REPLACEABLE_DESTINATION = frozenset({Phase.PREPARING, Phase.PRECOPY, Phase.DIRTY_ITERATION})


@dataclass(frozen=True)
class RunnerSettings:
    agent_call_budget_s: float = 15.0  # how long an agent may stay unreachable before we call it lost
    job_deadline_s: float = 3600.0  # past this, a job not yet committed rolls back


class Superseded(Exception):
    """Another orchestrator (a newer epoch) drives this job now: stop touching it."""


class StepFailed(Exception):
    """A phase could not complete; `source_lost` tells rollback not to count on the source."""

    def __init__(self, reason: str, *, source_lost: bool = False, destination_lost: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.source_lost = source_lost
        self.destination_lost = destination_lost


class CancelRequested(Exception):
    pass


def _rpc_reason(exc: grpc.aio.AioRpcError) -> str:
    return f"{exc.details()} ({exc.code().name})"


class JobRunner:
    def __init__(self, store: EtcdStore, agents: AgentDirectory, job_id: str, epoch: int,
                 clock: Callable[[], float] = time.time, settings: RunnerSettings | None = None) -> None:
        self.settings = settings or RunnerSettings()
        self._addresses: dict[str, tuple[str, float]] = {}
        self.store = store
        self.agents = agents
        self.job_id = job_id
        self.epoch = epoch
        self.clock = clock
        self.job: Job | None = None
        self.revision = 0
        self.history: list[convergence.RoundFacts] = []
        self.suspended_at: float | None = None
        self.observer = JobObserver(job_id, epoch)  # trace, metrics and log context of the job

    # ---- persistence ----------------------------------------------------------------------

    async def _load(self) -> Job:
        got = await self.store.get_job(self.job_id)
        if got is None:
            raise Superseded(f"job {self.job_id} vanished from etcd")
        job = Job.from_bytes(got.value)
        if job.epoch > self.epoch:
            raise Superseded(f"job {self.job_id} is driven by epoch {job.epoch} > ours {self.epoch}")
        self.job, self.revision = job, got.mod_revision
        return job

    async def _save(self, new: Job, *, release: bool = False) -> Job:
        """CAS the job. A lost CAS re-reads: a newer epoch stops us; an operator's cancel (the
        only other writer) is merged into our change and the write retried."""
        before, new = self.j, self.observer.prepare(new)
        while True:
            try:
                self.revision = await self.store.update_job(
                    new.id, new.to_bytes(), self.revision,
                    release_controller=new.controller_id if release else None, leader_term=self.epoch)
                self.observer.written(before, new)
                self.job = new
                return new
            except ConflictError:
                term = await self.store.leader_term()
                if term != self.epoch:
                    raise Superseded(f"leadership moved (term {term}, ours {self.epoch})") from None
                fresh = await self._load()
                if fresh.terminal:
                    raise Superseded(f"job {self.job_id} already ended as {fresh.phase}") from None
                new = new.with_fields(new.updated_at, cancel_requested=fresh.cancel_requested or
                                      new.cancel_requested)

    def _now(self) -> float:
        return self.clock()

    @property
    def j(self) -> Job:
        assert self.job is not None
        return self.job

    def _ref(self) -> agent_pb2.MigrationRef:
        return agent_pb2.MigrationRef(job_id=self.j.id, epoch=self.epoch, controller_id=self.j.controller_id)

    # ---- agents ---------------------------------------------------------------------------

    async def _node(self, name: str) -> NodeRecord | None:
        return await self.store.get_node(name)

    async def _stub(self, name: str, *, role: str) -> agent_pb2_grpc.AgentServiceStub:
        # Addresses are remembered briefly: the switchover makes several calls within a few
        # milliseconds, and an etcd read before each would add to the guest's blackout.
        cached = self._addresses.get(name)
        if cached is not None and time.monotonic() - cached[1] < ADDRESS_CACHE_S:
            return self.agents.stub(cached[0])
        node = await self._node(name)
        if node is None:
            self._addresses.pop(name, None)
            raise StepFailed(f"{role} node {name!r} is not registered (its agent is down)",
                             source_lost=role == "source", destination_lost=role == "destination")
        self._addresses[name] = (node.address, time.monotonic())
        return self.agents.stub(node.address)

    async def _call(self, role: str, what: str, fn: Callable[[agent_pb2_grpc.AgentServiceStub], Awaitable[T]],
                    *, budget_s: float | None = None) -> T:
        budget_s = self.settings.agent_call_budget_s if budget_s is None else budget_s
        name = self.j.source_node if role == "source" else self.j.destination_node
        lost = {"source_lost": role == "source", "destination_lost": role == "destination"}
        try:
            stub = await self._stub(name, role=role)
            return await call_with_retry(f"{what} on {role} {name}", lambda: fn(stub), budget_s=budget_s)
        except AgentUnreachable as exc:
            raise StepFailed(str(exc), **lost) from exc
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.FAILED_PRECONDITION and "stale epoch" in (exc.details() or ""):
                raise Superseded(_rpc_reason(exc)) from exc
            raise StepFailed(f"{what} on {role} {name} failed: {_rpc_reason(exc)}") from exc

    async def _long_call(self, role: str, what: str,
                         fn: Callable[[agent_pb2_grpc.AgentServiceStub, float], Awaitable[T]]) -> T:
        """A transfer that may outlast one RPC deadline: re-issued (the agent attaches to the work
        in flight) while we watch for cancel and publish progress. A deadline alone does not make
        an agent lost; failing to answer a ping for the call budget does."""
        name = self.j.source_node if role == "source" else self.j.destination_node
        lost = {"source_lost": role == "source", "destination_lost": role == "destination"}
        silent_since: float | None = None
        while True:
            stub = await self._stub(name, role=role)
            task: asyncio.Future[T] = asyncio.ensure_future(fn(stub, LONG_CALL_DEADLINE_S))
            try:
                while True:
                    done, _ = await asyncio.wait({task}, timeout=PROGRESS_INTERVAL_S)
                    if done:
                        return task.result()
                    await self._poll_progress_and_cancel()
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.FAILED_PRECONDITION and "stale epoch" in (exc.details() or ""):
                    raise Superseded(_rpc_reason(exc)) from exc
                if exc.code() not in TRANSIENT_CODES:
                    raise StepFailed(f"{what} on {role} {name} failed: {_rpc_reason(exc)}") from exc
                if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED and await self._answers(stub):
                    silent_since = None
                    continue  # alive and still working: attach again
                now = time.monotonic()
                silent_since = silent_since or now
                if now - silent_since > self.settings.agent_call_budget_s:
                    raise StepFailed(f"{what}: {role} {name} did not answer for "
                                     f"{self.settings.agent_call_budget_s:.0f} s ({_rpc_reason(exc)})",
                                     **lost) from exc
                await asyncio.sleep(0.2)  # back off before the next attempt on an unreachable agent
            finally:
                if not task.done():
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await task

    async def _answers(self, stub: agent_pb2_grpc.AgentServiceStub) -> bool:
        try:
            await stub.GetSession(self._ref(), timeout=2.0)
        except grpc.aio.AioRpcError:
            return False
        return True

    async def _poll_progress_and_cancel(self) -> None:
        got = await self.store.get_job(self.job_id)
        if got is not None:
            fresh = Job.from_bytes(got.value)
            if fresh.epoch > self.epoch:
                raise Superseded(f"job {self.job_id} taken over by epoch {fresh.epoch}")
            if fresh.cancel_requested and not self.j.cancel_requested:
                self.job = self.j.with_fields(self.j.updated_at, cancel_requested=True)
                self.revision = got.mod_revision
                raise CancelRequested()
        with contextlib.suppress(StepFailed, grpc.aio.AioRpcError, AgentUnreachable):
            status = await self._call("source", "GetSession",
                                      lambda s: s.GetSession(self._ref(), timeout=2.0), budget_s=2.0)
            base = sum(p.bytes for p in self.j.phases[:-1])
            shown = base + int(status.bytes_sent)
            if shown > self.j.bytes_transferred:
                await self._save(self.j.with_fields(self._now(), bytes_transferred=shown))

    # ---- the phases ---------------------------------------------------------------------

    async def run(self) -> Job:
        job = await self._load()
        self.observer.adopt(job)
        if job.terminal:
            return job
        if job.epoch != self.epoch:
            note = f"taken over by epoch {self.epoch} (was {job.epoch})" if job.epoch else ""
            job = await self._save(job.with_fields(self._now(), epoch=self.epoch))
            if note:
                log.info("job %s: %s in phase %s", job.id, note, job.phase)
        while not self.j.terminal:
            try:
                if self.j.cancel_requested and self.j.phase in BEFORE_COMMIT:
                    raise CancelRequested()
                if self.j.phase in BEFORE_COMMIT and self._now() - self.j.created_at > self.settings.job_deadline_s:
                    raise StepFailed(f"job deadline of {self.settings.job_deadline_s:.0f} s passed before COMMIT")
                await self._step()
            except CancelRequested:
                await self._roll_back(Phase.CANCELLED, "cancelled by operator", source_lost=False)
            except StepFailed as exc:
                if self.j.phase not in BEFORE_COMMIT:
                    await self._save(self.j.end(Phase.FAILED, self._now(), exc.reason), release=True)
                elif (not exc.source_lost and self.j.phase in REPLACEABLE_DESTINATION
                      and not self.j.requested_destination
                      and len(self.j.excluded_destinations) + 1 < MAX_DESTINATION_ATTEMPTS
                      and await self._destination_lost(exc)):
                    await self._replace_destination(exc.reason)
                else:
                    await self._roll_back(Phase.ROLLED_BACK, exc.reason, source_lost=exc.source_lost)
        return self.j

    async def _destination_lost(self, exc: StepFailed) -> bool:
        """Was this failure the destination going away (rather than, say, corrupt data)?"""
        if exc.destination_lost:
            return True
        if not self.j.destination_node:
            return False
        try:
            status = await self._call("destination", "GetSession",
                                      lambda s: s.GetSession(self._ref(), timeout=2.0), budget_s=3.0)
        except StepFailed as probe:
            return probe.destination_lost
        # An agent that restarted has forgotten the job: that destination is gone for this job.
        return status.stage in ("unknown", "aborted")

    async def _replace_destination(self, reason: str) -> None:
        """Destination lost before COMMIT: the source takes the controller back to RUNNING, the
        lost node is excluded, and PREPARING picks another; precopy starts over."""
        lost = self.j.destination_node
        with contextlib.suppress(StepFailed):
            await self._call("destination", "AbortMigration",
                             lambda s: s.AbortMigration(self._ref(), timeout=5.0), budget_s=2.0)
        try:
            await self._call("source", "AbortMigration", lambda s: s.AbortMigration(self._ref(), timeout=10.0))
        except StepFailed as exc:
            await self._roll_back(Phase.FAILED, f"{reason}; then {exc.reason}", source_lost=True)
            return
        self.history = []
        job = self.j.with_fields(self._now(), destination_node="", destination_data_address="",
                                 destination_token="", throttle_percent=0,
                                 excluded_destinations=(*self.j.excluded_destinations, lost))
        await self._save(job.enter(Phase.PREPARING, self._now(),
                                   note=f"destination {lost} lost ({reason}); choosing another"))

    async def _step(self) -> None:
        phase = self.j.phase
        if phase is Phase.PENDING:
            await self._save(self.j.enter(Phase.PREPARING, self._now()))
        elif phase is Phase.PREPARING:
            await self._prepare()
        elif phase is Phase.PRECOPY:
            await self._precopy()
        elif phase is Phase.DIRTY_ITERATION:
            await self._dirty_round()
        elif phase is Phase.STOP_AND_COPY:
            await self._stop_and_copy()
        elif phase is Phase.COMMIT:
            await self._save(self.j.enter(Phase.RESUMING, self._now()))
        elif phase is Phase.RESUMING:
            await self._resume()

    async def _prepare(self) -> None:
        job = self.j
        owned = await self.store.get_controller(job.controller_id)
        if owned is None or owned[0].node != job.source_node:
            where = owned[0].node if owned else "nowhere"
            await self._save(job.end(Phase.FAILED, self._now(),
                                     f"controller {job.controller_id} is owned by {where}, "
                                     f"not the job's source {job.source_node}"), release=True)
            return
        if not job.destination_node:
            nodes = await self.store.list_nodes()
            cordoned = await self.store.cordoned_nodes()
            if job.requested_destination:
                node = next((n for n in nodes if n.name == job.requested_destination), None)
                problem = scheduler.node_problem(node, job.requested_destination, source=job.source_node,
                                                 namespace_bytes=job.namespace_bytes, cordoned=cordoned)
                if problem:
                    await self._save(job.end(Phase.FAILED, self._now(), problem), release=True)
                    return
                chosen = job.requested_destination
            else:
                placement = scheduler.choose_destination(nodes, source=job.source_node,
                                                         namespace_bytes=job.namespace_bytes, cordoned=cordoned,
                                                         excluded=job.excluded_destinations)
                if placement.node is None:
                    await self._save(job.end(Phase.FAILED, self._now(), placement.reason), release=True)
                    return
                chosen = placement.node.name
            # Recorded before the destination is touched, so a restart knows whom to clean up.
            earlier = job.phases[-1].note if job.phases else ""
            note = f"{earlier}; destination {chosen}" if earlier else f"destination {chosen}"
            job = await self._save(job.record(self._now(), note=note, destination_node=chosen))
        request = agent_pb2.PrepareDestinationRequest(
            ref=self._ref(), namespace_bytes=job.namespace_bytes,
            state_format_version=STATE_FORMAT_VERSION, source_node=job.source_node)
        try:
            reply = await self._call("destination", "PrepareDestination",
                                     lambda s: s.PrepareDestination(request, timeout=10.0))
        except StepFailed as exc:
            if exc.destination_lost and not job.requested_destination:
                await self._save(job.with_fields(
                    self._now(), destination_node="",
                    excluded_destinations=(*job.excluded_destinations, job.destination_node)))
                return  # stays PREPARING: the next step picks another node
            raise
        job = job.with_fields(self._now(), destination_data_address=reply.data_address,
                              destination_token=reply.token)
        await self._save(job.enter(Phase.PRECOPY, self._now()))

    async def _precopy(self) -> None:
        job = self.j
        request = agent_pb2.StartPrecopyRequest(
            ref=self._ref(), destination_data_address=job.destination_data_address, token=job.destination_token,
            bandwidth_bytes_per_s=job.policy.bandwidth_bytes_per_s)
        result = await self._long_call("source", "StartPrecopy",
                                       lambda s, t: s.StartPrecopy(request, timeout=t))
        facts = convergence.RoundFacts(0, result.bytes_sent, result.duration_s, result.dirty_bytes_remaining,
                                       result.dirty_rate_bytes_per_s)
        self.history = [facts]
        job = self.j.with_fields(self._now(), bytes_transferred=sum(p.bytes for p in self.j.phases[:-1]))
        job = job.record(self._now(), add_bytes=result.bytes_sent,
                         dirty_rate_bytes_per_s=result.dirty_rate_bytes_per_s)
        await self._save(job.enter(Phase.DIRTY_ITERATION, self._now()))

    async def _dirty_round(self) -> None:
        if self.history:
            decision = convergence.decide(self.j.policy, self.history, self.j.throttle_percent)
            if decision.action is convergence.Action.STOP_AND_COPY:
                await self._save(self.j.enter(Phase.STOP_AND_COPY, self._now(), note=decision.reason))
                return
            if decision.action is convergence.Action.ABORT:
                raise StepFailed(decision.reason)
            if decision.action is convergence.Action.THROTTLE:
                await self._save(self.j.record(self._now(), note=decision.reason,
                                               throttle_percent=decision.throttle_percent))
        round_no = self.j.rounds + 1
        request = agent_pb2.DirtyRoundRequest(ref=self._ref(), round=round_no,
                                              bandwidth_bytes_per_s=self.j.policy.bandwidth_bytes_per_s,
                                              throttle_percent=self.j.throttle_percent)
        with self.observer.round(self.j, round_no) as round_span:
            result = await self._long_call("source", f"DirtyRound {round_no}",
                                           lambda s, t: s.DirtyRound(request, timeout=t))
            round_span.result(result)
        self.history.append(convergence.RoundFacts(round_no, result.bytes_sent, result.duration_s,
                                                   result.dirty_bytes_remaining,
                                                   result.dirty_rate_bytes_per_s))
        job = self.j.with_fields(self._now(), bytes_transferred=sum(p.bytes for p in self.j.phases))
        await self._save(job.record(self._now(), add_bytes=result.bytes_sent, add_rounds=1,
                                    dirty_rate_bytes_per_s=result.dirty_rate_bytes_per_s))

    async def _stop_and_copy(self) -> None:
        # Read before the guest is paused: the commit's CAS still catches any change since.
        owned = await self.store.get_controller(self.j.controller_id)
        if owned is None or owned[0].node != self.j.source_node:
            raise StepFailed(f"controller {self.j.controller_id} ownership changed under the job")
        await self._stub(self.j.destination_node, role="destination")  # its address, for the resume
        self.suspended_at = self._now()
        result = await self._long_call("source", "StopAndCopy",
                                       lambda s, t: s.StopAndCopy(self._ref(), timeout=t))
        job = self.j.record(self._now(), add_bytes=result.bytes_sent + result.state_bytes)
        committed = self.observer.prepare(
            job.enter(Phase.COMMIT, self._now(), note=f"owner {job.source_node} -> {job.destination_node}"))
        try:
            self.revision = await self.store.commit_ownership(
                job.id, committed.to_bytes(), self.revision, owned[0], owned[1], job.destination_node,
                leader_term=self.epoch)
        except ConflictError:
            fresh = await self._load()
            if fresh.phase is Phase.COMMIT:
                return  # our write landed before the conflict was reported
            if fresh.cancel_requested:
                raise CancelRequested() from None
            raise StepFailed(f"commit refused: job or controller {job.controller_id} changed") from None
        self.observer.written(self.j, committed)
        self.job = committed

    async def _resume(self) -> None:
        # After COMMIT the destination owns the controller: retry until it runs it, or until it is
        # declared lost (its liveness lease expired, or it answers that it cannot resume).
        while True:
            try:
                await self._call("destination", "ResumeDestination",
                                 lambda s: s.ResumeDestination(self._ref(), timeout=10.0))
                break
            except StepFailed as exc:
                dest = self.j.destination_node
                declared_lost = await self.store.get_node(dest) is None
                if declared_lost or not exc.destination_lost:
                    why = "its agent is gone (lease expired)" if declared_lost else exc.reason
                    await self._destination_lost_after_commit(dest, why)
                    return
                log.warning("job %s: destination %s not answering after COMMIT, retrying: %s",
                            self.j.id, dest, exc.reason)
        downtime_ms = (self._now() - self.suspended_at) * 1000.0 if self.suspended_at else 0.0
        job = self.j.with_fields(self._now(), downtime_ms=round(downtime_ms, 3))
        job = await self._save(job)
        source_digest = ""
        try:
            released = await self._call("source", "ReleaseSource",
                                        lambda s: s.ReleaseSource(self._ref(), timeout=DIGEST_WAIT_S))
            source_digest = released.digest
        except StepFailed as exc:
            log.warning("job %s: source release failed (the controller stays suspended there): %s",
                        job.id, exc.reason)
        dest_digest = await self._destination_digest()
        status = await self._call("destination", "GetSession", lambda s: s.GetSession(self._ref(), timeout=5.0))
        reason = "" if source_digest == dest_digest or not source_digest else (
            f"namespace digest differs: source {source_digest[:16]} destination {dest_digest[:16]}")
        job = job.with_fields(self._now(), source_digest=source_digest, destination_digest=dest_digest,
                              guest_blackout_ms=status.guest_blackout_ms)
        await self._save(job.end(Phase.COMPLETED, self._now(), reason), release=True)

    async def _destination_lost_after_commit(self, dest: str, why: str) -> None:
        """If the destination never claimed RUNNING in etcd, it never ran the controller: ownership
        goes back to the source (one CAS, which a late claim by the destination then loses), and
        the source, still frozen at the switchover image, runs it again. Otherwise the controller
        stays the destination's, marked lost."""
        job, cid = self.j, self.j.controller_id
        lead = f"destination {dest} cannot resume after COMMIT ({why})"
        if await self.store.move_back(cid, dest, job.source_node, leader_term=self.epoch):
            try:
                await self._call("source", "AbortMigration", lambda s: s.AbortMigration(self._ref(), timeout=10.0))
            except StepFailed as exc:
                await self.store.set_controller_state(cid, LOST, only_if_node=job.source_node)
                await self._save(job.end(Phase.FAILED, self._now(),
                                         f"{lead}; ownership went back to {job.source_node}, which did not "
                                         f"resume ({exc.reason}): controller {cid} marked lost"), release=True)
                return
            await self._save(job.end(Phase.ROLLED_BACK, self._now(),
                                     f"{lead}; it never ran the controller, so ownership went back to "
                                     f"{job.source_node}, which runs it again"), release=True)
            return
        await self.store.set_controller_state(cid, LOST, only_if_node=dest)
        await self._save(job.end(Phase.FAILED, self._now(),
                                 f"{lead} after it had claimed the controller: {cid} marked lost on {dest}"),
                         release=True)

    async def _destination_digest(self) -> str:
        deadline = time.monotonic() + DIGEST_WAIT_S
        while time.monotonic() < deadline:
            status = await self._call("destination", "GetSession",
                                      lambda s: s.GetSession(self._ref(), timeout=5.0))
            if status.digest or status.error:
                return status.digest
            await asyncio.sleep(0.1)  # polling an agent-side computation; bounded by the deadline
        return ""

    async def _roll_back(self, ending: Phase, reason: str, *, source_lost: bool) -> None:
        """Before COMMIT: the source takes the controller back, the destination discards."""
        job = self.j
        notes = []
        if job.destination_node:
            try:
                await self._call("destination", "AbortMigration",
                                 lambda s: s.AbortMigration(self._ref(), timeout=10.0), budget_s=5.0)
            except StepFailed as exc:
                notes.append(f"destination cleanup pending: {exc.reason}")
        if not source_lost:
            try:
                await self._call("source", "AbortMigration",
                                 lambda s: s.AbortMigration(self._ref(), timeout=10.0))
            except StepFailed as exc:
                source_lost = True
                notes.append(f"source did not confirm it runs again: {exc.reason}")
        if source_lost:
            ending = Phase.FAILED
            reason = f"{reason}; source {job.source_node} lost: controller {job.controller_id} marked lost"
            await self.store.set_controller_state(job.controller_id, LOST, only_if_node=job.source_node)
        full = "; ".join([reason, *notes])
        await self._save(self.j.end(ending, self._now(), full), release=True)


async def run_job(runner: JobRunner) -> Job | None:
    """Runs a job to its end; a lost leadership or newer epoch just stops this runner."""
    try:
        with runner.observer.running():
            return await runner.run()
    except Superseded as exc:
        log.info("job %s: stopping: %s", runner.job_id, exc)
    except EtcdError as exc:
        log.error("job %s: etcd unavailable, stopping this runner (a later pass resumes it): %s",
                  runner.job_id, exc)
    return None
