"""Drives one migration job through its phases by calling the agents.

The decisions live in pure modules (`jobs`, `convergence`, `scheduler`, `recovery`); this module
does the I/O. Every phase is written to etcd (a CAS on the job's revision) before its actions
run, and every agent command carries the job id and this leader's epoch, so a runner started
after an orchestrator restart picks the job up where etcd says it is and repeats the phase's
commands; the agents attach a repeated command to the work already running or return its result.

What happens inside a phase (bytes moved, a dirty round's result, a throttle step) is kept in
the runner's job (`self.job`, served by the API on this leader) and written at most every
PROGRESS_PERSIST_INTERVAL_S, or with the next phase change, whichever comes first: etcd's load
per job does not grow with every poll or round. Nothing is lost by it: a runner that takes the
job over repeats the phase's commands, and the source answers a repeated round with its result.
Phase changes made in one step go out in one write (PENDING -> PREPARING with the destination
chosen; a precopy that left nothing dirty goes on to STOP_AND_COPY; a round's result goes with
the STOP_AND_COPY it leads to).

Durations (phase timings, the switchover, the job's deadline) are measured on the monotonic
clock; the wall clock only stamps the record (and gives the age of a job another leader started).
The job completes as soon as the destination runs the controller; checking the namespace against
the source's (`verification`) happens afterwards, off the job's critical path (`verifier`).
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

from cluster.node_cache import NodeSource
from cluster.records import LOST, RUNNING, ControllerRecord
from cluster.retrying import of_types, retry_transient
from cluster.store import TRANSIENT_ETCD_ERRORS, ConflictError, EtcdError, EtcdStore
from cluster.switchover_marks import mark
from orchestrator import convergence, metrics, recovery, scheduler, switchover_model
from orchestrator.agent_calls import AgentCalls, AgentRefused, AgentUnreachable, StaleEpoch, Stub
from orchestrator.jobs import BEFORE_COMMIT, Job, Phase
from orchestrator.observer import JobObserver
from orchestrator.progress_watch import DEFAULT_PROGRESS_TIMEOUT_S, ProgressWatch
from orchestrator.recovery import Action, Failure, FailureKind
from orchestrator.switchover_model import SwitchoverModel
from proto.v1 import agent_pb2

log = logging.getLogger(__name__)
T = TypeVar("T")
A = TypeVar("A")
B = TypeVar("B")

STATE_FORMAT_VERSION = 1
# How often a transfer step's progress (and an operator's cancel) is read: from the source and
# from etcd. Reads only: the progress is written at most every PROGRESS_PERSIST_INTERVAL_S.
PROGRESS_INTERVAL_S = 0.5
# At most this long between two writes of a job's progress to etcd. What another orchestrator
# shows of a running job is as old as this at most; and a leader that takes the job over reads
# its age from the last write (plus the wall-clock gap, clamped to jobs.MAX_UNWATCHED_GAP_S).
PROGRESS_PERSIST_INTERVAL_S = 5.0
NO_PROGRESS = "no progress"  # how the reason of a job rolled back by the progress timeout begins
PROBE_BUDGET_S = 3.0
# After the source resumed for want of a commit, the rolled-back job is written once etcd answers
# again (within this long; past it a later pass finds the source aborted and rolls back anyway).
ROLLBACK_WRITE_BUDGET_S = 120.0
NOT_COMMITTED = "the destination did not commit the switchover; the guest resumed on the source"
MISSING_DESTINATION_POLL_S = 0.5
# Refusals of PrepareDestination that say "not this node" (no room, an unknown state format):
# another node may well take the controller.
_UNFIT_CODES = frozenset({grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.RESOURCE_EXHAUSTED})
# How an agent says a disk is full (agent.session_states.ErrorKind.NO_SPACE).
_NO_SPACE_CODE = grpc.StatusCode.RESOURCE_EXHAUSTED


@dataclass(frozen=True)
class RunnerSettings:
    agent_call_budget_s: float = 15.0  # how long an agent may stay unreachable before we call it lost
    job_deadline_s: float = 3600.0  # past this, a job not yet committed rolls back
    # How long etcd may take to answer the check right before the guest pauses, and the
    # destination's commit: the guest's blackout must not wait on an etcd that is out (a commit
    # not confirmed in time leaves the guest paused until etcd says whether it landed).
    etcd_check_timeout_s: float = 1.0
    # A transfer step whose bytes stop moving this long rolls the job back (orchestrator/progress_watch.py).
    progress_timeout_s: float = DEFAULT_PROGRESS_TIMEOUT_S


async def _both(first: Awaitable[A], second: Awaitable[B]) -> tuple[A, B]:
    """Runs the two at once and returns their results; the first to fail cancels the other and its
    own error is raised (not a group): the callers handle each error by its type."""
    tasks = (asyncio.ensure_future(first), asyncio.ensure_future(second))
    try:
        await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(BaseException):
                await task
        raise
    return tasks[0].result(), tasks[1].result()


@dataclass(frozen=True)
class SwitchoverReads:
    """What the switchover reads from etcd before the guest pauses: the controller's record and
    its revision (None: no record), read alongside etcd's quick check."""
    controller: tuple[ControllerRecord, int] | None


class Superseded(Exception):
    """Another orchestrator (a newer epoch) drives this job now: stop touching it."""


class SwitchedOver(Exception):
    """The destination's commit is in etcd though this runner had not seen it (a write of ours lost
    its CAS to it): the job goes on from etcd's record, which `_load` has read."""


class StepFailed(Exception):
    """A step could not complete; `failure` is what the recovery decision needs to know."""

    def __init__(self, failure: Failure) -> None:
        super().__init__(failure.reason)
        self.failure = failure


class JobRunner:
    def __init__(self, store: EtcdStore, agents: AgentCalls, job_id: str, epoch: int, *,
                 wall: Callable[[], float] = time.time, monotonic: Callable[[], float] = time.monotonic,
                 settings: RunnerSettings | None = None, switchover_model: SwitchoverModel | None = None,
                 nodes: NodeSource | None = None) -> None:
        self.settings = settings or RunnerSettings()
        # Shared by the runners of one orchestrator: each completed switchover refits it.
        self.switchover_model = switchover_model or SwitchoverModel()
        self.store = store
        # Placement reads nodes that may be a moment old (the destination refuses what does not
        # fit); whether a silent source still holds its lease is read from etcd.
        self.nodes: NodeSource = nodes or store
        self.agents = agents
        self.job_id = job_id
        self.epoch = epoch
        self.wall = wall
        self.monotonic = monotonic
        self.job: Job | None = None  # the job as this runner knows it: etcd's record plus unwritten progress
        self.revision = 0  # of the job's record in etcd, as this runner last wrote or read it
        self._written: Job | None = None  # the job as last written or read (`self.job` is it: nothing unwritten)
        self._written_at = monotonic()
        self._cancel_checked_at = monotonic()
        self.history: list[convergence.RoundFacts] = []
        self.suspended_at: float | None = None  # monotonic, when stop-and-copy began
        # What the source sent before it paused the guest, inside StopAndCopy (not downtime).
        self.pre_pause_ms = 0.0
        self.pre_pause_bytes = 0
        self.switched_over_at: float | None = None  # monotonic, when StopAndCopy reported the commit
        # Read alongside the write that entered STOP_AND_COPY, for the stop-and-copy right after.
        self._switchover_reads: SwitchoverReads | None = None
        self._age_at_load_s = 0.0
        self._loaded_at = monotonic()
        self._opened_phase: tuple[int, float] | None = None  # (index, monotonic start) of a phase we entered
        self.observer = JobObserver(job_id, epoch)  # trace, metrics and log context of the job
        self.progress = ProgressWatch(self.settings.progress_timeout_s)

    # ---- persistence ----------------------------------------------------------------------

    async def _load(self) -> Job:
        got = await self.store.get_job(self.job_id)
        if got is None:
            raise Superseded(f"job {self.job_id} vanished from etcd")
        job = Job.from_bytes(got.value)
        if job.epoch > self.epoch:
            raise Superseded(f"job {self.job_id} is driven by epoch {job.epoch} > ours {self.epoch}")
        self.job, self.revision = job, got.mod_revision
        self._written, self._written_at = job, self.monotonic()
        return job

    def live(self, revision: int) -> Job | None:
        """The job with its unwritten progress, if etcd's record is still at `revision` (the one this
        runner last wrote or read): what the API shows of it on the leader."""
        return self.job if self.job is not None and revision == self.revision else None

    def _advance(self, new: Job) -> None:
        """The job changed in memory only (never its phase): written with the next phase change,
        or by `_persist_if_due`."""
        if len(new.phases) != len(self.j.phases):
            raise AssertionError(f"job {new.id}: a phase change must be written, not kept in memory")
        self.observer.progressed(self.j, new)
        self.job = new

    async def _persist_if_due(self) -> None:
        """Writes what changed in memory once PROGRESS_PERSIST_INTERVAL_S passed since the last write."""
        if self.job is not self._written and self.monotonic() - self._written_at >= PROGRESS_PERSIST_INTERVAL_S:
            await self._save(self.j)

    async def _save(self, new: Job, *, release: bool = False) -> Job:
        """CAS the job. A lost CAS re-reads: a newer epoch stops us; an operator's cancel (the
        only other writer) is merged into our change and the write retried."""
        before = self.j
        new = self.observer.prepare(self._timed(before, new).aged(self._age_s()))
        while True:
            try:
                self.revision = await self.store.update_job(
                    new.id, new.to_bytes(), self.revision,
                    release_controller=new.controller_id if release else None, leader_term=self.epoch)
                break
            except ConflictError:
                term = await self.store.leader_term()
                if term != self.epoch:
                    raise Superseded(f"leadership moved (term {term}, ours {self.epoch})") from None
                fresh = await self._load()
                if fresh.terminal:
                    raise Superseded(f"job {self.job_id} already ended as {fresh.phase}") from None
                if before.phase in BEFORE_COMMIT and fresh.phase not in BEFORE_COMMIT:
                    raise SwitchedOver(f"job {self.job_id} is {fresh.phase} in etcd: the destination committed "
                                       "the switchover") from None
                if fresh.cancel_requested and not new.cancel_requested:
                    new = new.cancel_asked(new.updated_at)
        self.observer.written(before, new)
        self.job = self._written = new
        self._written_at = self.monotonic()
        return new

    def _timed(self, before: Job, new: Job) -> Job:
        """A phase this runner entered and now closes gets its duration from the monotonic clock (a
        phase entered before its write, PREPARING from PENDING, has its opening noted already)."""
        if len(new.phases) > len(before.phases):
            opened = self._opened_phase
            closing = len(before.phases) - 1
            if opened is not None and opened[0] == closing:
                new = new.with_phase_duration(closing, (self.monotonic() - opened[1]) * 1000.0)
            if opened is None or opened[0] != len(new.phases) - 1:
                self._opened_phase = (len(new.phases) - 1, self.monotonic())
        return new

    def _now(self) -> float:
        return self.wall()

    def _age_s(self) -> float:
        """How long the job has existed: its age when loaded (Job.age_at_load), then this process's
        monotonic clock, so a step of the wall clock neither expires nor extends its deadline."""
        return self._age_at_load_s + (self.monotonic() - self._loaded_at)

    @property
    def j(self) -> Job:
        assert self.job is not None
        return self.job

    def _ref(self) -> agent_pb2.MigrationRef:
        return agent_pb2.MigrationRef(job_id=self.j.id, epoch=self.epoch, controller_id=self.j.controller_id)

    # ---- agents ---------------------------------------------------------------------------

    def _node(self, role: str) -> str:
        return self.j.source_node if role == "source" else self.j.destination_node

    async def _failure(self, role: str, exc: AgentUnreachable | AgentRefused, silent_for_s: float) -> Failure:
        if isinstance(exc, AgentUnreachable):
            if role == "source" and await self._source_busy(silent_for_s):
                return Failure(FailureKind.STEP_FAILED,
                               f"{exc.message}; source {self.j.source_node} is alive (its lease is kept) but too busy "
                               "to answer: it keeps the controller")
            kind = FailureKind.SOURCE_LOST if role == "source" else FailureKind.DESTINATION_LOST
            return Failure(kind, exc.message)
        if exc.code == _NO_SPACE_CODE:
            # The destination's disk is full: refused by it, or by a source whose transfer it
            # refused (a source writes nothing while it sends). Another node may take it.
            return Failure(FailureKind.DESTINATION_UNFIT, exc.message)
        return Failure(FailureKind.STEP_FAILED, exc.message)

    async def _source_busy(self, silent_for_s: float) -> bool:
        """A source silent for longer than the grace window whose node record is still in etcd is
        alive: its lease is refreshed from a thread of its own, so a dead or frozen process would
        have lost it by now. It is busy (a host loaded past answering), not lost."""
        if silent_for_s < self.agents.node_grace_s:
            return False
        return await self.store.get_node(self.j.source_node) is not None

    async def _call(self, role: str, what: str, fn: Callable[[Stub], Awaitable[T]], *,
                    budget_s: float | None = None, etcd_down: bool = False) -> T:
        budget_s = self.settings.agent_call_budget_s if budget_s is None else budget_s
        try:
            return await self.agents.call(self._node(role), what, fn, budget_s=budget_s, etcd_down=etcd_down)
        except StaleEpoch as exc:
            raise Superseded(exc.message) from exc
        except (AgentUnreachable, AgentRefused) as exc:
            raise StepFailed(await self._failure(role, exc, silent_for_s=budget_s)) from exc

    async def _long_call(self, role: str, what: str, fn: Callable[[Stub, float], Awaitable[T]]) -> T:
        self.progress.step_started(self.monotonic())
        try:
            return await self.agents.long_call(self._node(role), what, fn,
                                               silence_budget_s=self.settings.agent_call_budget_s,
                                               tick=self._poll_progress_and_cancel,
                                               tick_interval_s=PROGRESS_INTERVAL_S)
        except StaleEpoch as exc:
            raise Superseded(exc.message) from exc
        except (AgentUnreachable, AgentRefused) as exc:
            raise StepFailed(await self._failure(role, exc, silent_for_s=self.settings.agent_call_budget_s)) from exc

    async def _check_cancel(self) -> None:
        """Reads the job's record (a read, no write): an operator's cancel stops the step; a newer
        epoch stops this runner."""
        self._cancel_checked_at = self.monotonic()
        got = await self.store.get_job(self.job_id)
        if got is not None and got.mod_revision != self.revision:  # else it is the record this runner wrote
            fresh = Job.from_bytes(got.value)
            if fresh.epoch > self.epoch:
                raise Superseded(f"job {self.job_id} taken over by epoch {fresh.epoch}")
            if fresh.cancel_requested and not self.j.cancel_requested:
                # The operator's write is the record now; ours (unwritten progress) goes on top of it.
                self.job, self.revision = self.j.cancel_asked(fresh.updated_at), got.mod_revision
                self._written = fresh
                raise StepFailed(Failure(FailureKind.CANCELLED, "cancelled by operator"))

    async def _poll_progress_and_cancel(self) -> None:
        await self._check_cancel()
        try:
            status = await self.agents.call(self.j.source_node, "GetSession",
                                            lambda s: s.GetSession(self._ref(), timeout=2.0), budget_s=2.0)
        except (AgentUnreachable, AgentRefused, StaleEpoch):
            return  # progress is best effort; the transfer call itself reports a lost source
        stalled_s = self.progress.observe(int(status.bytes_sent), self.monotonic())
        if stalled_s is not None and self.j.phase in BEFORE_COMMIT:
            raise StepFailed(Failure(FailureKind.STEP_FAILED, f"{NO_PROGRESS}: no byte moved for {stalled_s:.0f} s "
                                     f"(--progress-timeout-s {self.settings.progress_timeout_s:g}) at "
                                     f"{int(status.bytes_sent)} bytes sent"))
        job = self.j.progressed(int(status.bytes_sent), self._now())
        if job is not self.j:
            self._advance(job)
        await self._persist_if_due()

    # ---- the phases ---------------------------------------------------------------------

    async def run(self) -> Job:
        job = await self._load()
        self._age_at_load_s = job.age_at_load(self._now())
        self._loaded_at = self.monotonic()
        self.observer.adopt(job)
        if job.terminal:
            return job
        if job.epoch != self.epoch:
            note = f"taken over by epoch {self.epoch} (was {job.epoch})" if job.epoch else ""
            if job.phase is Phase.PENDING:
                # No agent has heard of a PENDING job: the takeover goes out with its first write.
                self._advance(job.taken_over(self.epoch, self._now()))
            else:
                job = await self._save(job.taken_over(self.epoch, self._now()))
            if note:
                log.info("job %s: %s in phase %s", job.id, note, job.phase)
        while not self.j.terminal:
            try:
                try:
                    if self.j.phase in BEFORE_COMMIT:
                        if self.j.cancel_requested:
                            raise StepFailed(Failure(FailureKind.CANCELLED, "cancelled by operator"))
                        if self._age_s() > self.settings.job_deadline_s:
                            raise StepFailed(Failure(FailureKind.STEP_FAILED, f"job deadline of "
                                                     f"{self.settings.job_deadline_s:.0f} s passed before COMMIT"))
                    await self._step()
                except StepFailed as exc:
                    self._switchover_reads = None
                    await self._recover(exc.failure)
            except SwitchedOver as exc:
                log.warning("job %s: %s; finishing it", self.job_id, exc)
        return self.j

    async def _step(self) -> None:
        phase = self.j.phase
        if phase in (Phase.PENDING, Phase.PREPARING):
            await self._prepare()
        elif phase is Phase.PRECOPY:
            await self._precopy()
        elif phase is Phase.DIRTY_ITERATION:
            await self._dirty_round()
        elif phase is Phase.STOP_AND_COPY:
            await self._stop_and_copy()
        elif phase is Phase.COMMIT:
            # Written by the orchestrator-driven commit of earlier versions (the destination's
            # commit goes straight to RESUMING): a rolling upgrade may find one.
            await self._save(self.j.enter(Phase.RESUMING, self._now()))
        elif phase is Phase.RESUMING:
            await self._resume()

    async def _prepare(self) -> None:
        job = self.j
        if job.phase is Phase.PENDING:
            # PREPARING goes out with the destination chosen (or the job's end), before any agent is asked.
            job = job.enter(Phase.PREPARING, self._now())
            self._opened_phase = (len(job.phases) - 1, self.monotonic())
        owned = await self.store.get_controller(job.controller_id)
        if owned is None or owned[0].node != job.source_node:
            where = owned[0].node if owned else "nowhere"
            await self._save(job.end(Phase.FAILED, self._now(),
                                     f"controller {job.controller_id} is owned by {where}, "
                                     f"not the job's source {job.source_node}"), release=True)
            return
        if not job.destination_node:
            cordoned = await self.store.cordoned_nodes()
            stored = await self.agents.stored_bytes(job.source_node, job.controller_id, budget_s=PROBE_BUDGET_S)
            source_record = await self.nodes.get_node(job.source_node)
            if job.requested_destination:
                node = await self.nodes.get_node(job.requested_destination)
                if node is None and not await self.agents.is_lost(job.requested_destination):
                    # Unregistered for a moment (its lease expired under load) but not lost:
                    # its record, which the checks need, comes back when it registers again.
                    await asyncio.sleep(MISSING_DESTINATION_POLL_S)
                    return
                problem = scheduler.node_problem(node, job.requested_destination, source=job.source_node,
                                                 namespace_bytes=job.namespace_bytes, cordoned=cordoned,
                                                 stored_bytes=stored, source_record=source_record)
                if problem:
                    await self._save(job.end(Phase.FAILED, self._now(), problem), release=True)
                    return
                chosen = job.requested_destination
            else:
                placement = scheduler.choose_destination(await self.nodes.list_nodes(), source=job.source_node,
                                                         namespace_bytes=job.namespace_bytes, cordoned=cordoned,
                                                         excluded=job.excluded_destinations, stored_bytes=stored,
                                                         source_record=source_record)
                if placement.node is None:
                    await self._save(job.end(Phase.FAILED, self._now(), placement.reason), release=True)
                    return
                chosen = placement.node.name
            # Recorded before the destination is touched, so a restart knows whom to clean up.
            job = await self._save(job.destination_chosen(chosen, self._now()))
        request = agent_pb2.PrepareDestinationRequest(
            ref=self._ref(), namespace_bytes=job.namespace_bytes,
            state_format_version=STATE_FORMAT_VERSION, source_node=job.source_node)
        try:
            reply = await self._call("destination", "PrepareDestination",
                                     lambda s: s.PrepareDestination(request, timeout=10.0))
        except StepFailed as exc:
            if exc.failure.kind is FailureKind.DESTINATION_LOST and not job.requested_destination:
                await self._save(job.without_destination(self._now()))
                return  # stays PREPARING: the next step picks another node
            cause = exc.__cause__
            if isinstance(cause, AgentRefused) and cause.code in _UNFIT_CODES:
                raise StepFailed(Failure(FailureKind.DESTINATION_UNFIT, exc.failure.reason)) from exc
            raise
        job = job.destination_prepared(reply.data_address, reply.token, self._now())
        await self._save(job.enter(Phase.PRECOPY, self._now()))

    async def _precopy(self) -> None:
        job = self.j
        request = agent_pb2.StartPrecopyRequest(
            ref=self._ref(), destination_data_address=job.destination_data_address, token=job.destination_token,
            bandwidth_bytes_per_s=job.policy.bandwidth_bytes_per_s, destination_node=job.destination_node)
        result = await self._long_call("source", "StartPrecopy", lambda s, t: s.StartPrecopy(request, timeout=t))
        self.history = [convergence.RoundFacts(0, result.bytes_sent, result.duration_s,
                                               result.dirty_bytes_remaining, result.dirty_rate_bytes_per_s)]
        self._advance(self._step_done(result, rounds=0))
        entered = self.monotonic()
        job = self.j.enter(Phase.DIRTY_ITERATION, self._now())
        decision = convergence.decide(job.policy, self.history, job.throttle_percent, self.switchover_model.fixed_ms)
        if decision.action is convergence.Action.STOP_AND_COPY:
            # Nothing left to iterate on: both phase changes go out in one write.
            iterated = len(job.phases) - 1
            job = job.enter(Phase.STOP_AND_COPY, self._now(), note=decision.reason).predicted(
                decision.estimated_downtime_ms)
            job = job.with_phase_duration(iterated, (self.monotonic() - entered) * 1000.0)
            await self._enter_stop_and_copy(job)
            return
        await self._save(job)

    def _step_done(self, result: agent_pb2.TransferResult, *, rounds: int, guest_running: bool = True) -> Job:
        """What a transfer step moved: into its phase, and the job's total from the source's count.
        A step with the guest running also measured its dirty rate; stop-and-copy (guest paused) did not."""
        now = self._now()
        job = self.j.record(now, add_bytes=result.bytes_sent + result.state_bytes, add_rounds=rounds)
        if guest_running:
            job = job.round_measured(result.dirty_rate_bytes_per_s, now)
        job = job.remaining(int(result.dirty_bytes_remaining), now)
        return job.progressed(int(result.total_bytes_sent), now)

    async def _dirty_round(self) -> None:
        if self.history:
            decision = convergence.decide(self.j.policy, self.history, self.j.throttle_percent,
                                          self.switchover_model.fixed_ms)
            if decision.action is convergence.Action.STOP_AND_COPY:
                # With the results of the rounds kept in memory since the last write.
                await self._enter_stop_and_copy(self.j.enter(Phase.STOP_AND_COPY, self._now(), note=decision.reason)
                                                .predicted(decision.estimated_downtime_ms))
                return
            if decision.action is convergence.Action.ABORT:
                raise StepFailed(Failure(FailureKind.STEP_FAILED, decision.reason))
            if decision.action is convergence.Action.THROTTLE:
                # A runner that takes over unwritten throttling starts from the last written one.
                self._advance(self.j.throttled(decision.throttle_percent, decision.reason, self._now()))
        if self.monotonic() - self._cancel_checked_at >= PROGRESS_INTERVAL_S:
            # Rounds shorter than a poll, back to back, write nothing that a cancel would conflict with.
            await self._check_cancel()
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
        # A runner that takes over after an unwritten round asks the source for it again, which
        # answers with its result.
        self._advance(self._step_done(result, rounds=1))
        await self._persist_if_due()

    async def _enter_stop_and_copy(self, job: Job) -> None:
        """Writes STOP_AND_COPY and, at the same time, makes the reads the switchover needs: each
        etcd round trip before the pause is one more wait on a loaded orchestrator and etcd (at
        hundreds of jobs in flight, this step was the slowest), and neither depends on the other."""
        _, self._switchover_reads = await _both(self._save(job), self._read_for_switchover())

    async def _read_for_switchover(self) -> SwitchoverReads:
        """The controller's record, and etcd's quick check: the guest pauses only while etcd
        answers, as the destination's commit needs it within the blackout (not answering in time
        raises an EtcdError: this runner stops and a later pass starts the step again)."""
        owned, _ = await _both(self.store.get_controller(self.j.controller_id),
                               self.store.answers(self.settings.etcd_check_timeout_s))
        return SwitchoverReads(owned)

    async def _stop_and_copy(self) -> None:
        """The switchover. What it needs is read and prepared while the guest still runs: the
        controller's record, the agents' addresses, and the commit itself (a SwitchoverPlan: the
        job as it reads once committed, the revisions and the leader term the commit requires).
        The source then pauses the guest and sends the last data and the state straight to the
        destination, which loads them, commits in one etcd transaction and runs the controller;
        the orchestrator is off that path and writes the job's end afterwards."""
        job = self.j
        # Read alongside the STOP_AND_COPY write; read here when a runner takes the job over in it.
        reads, self._switchover_reads = self._switchover_reads, None
        if reads is None:
            reads = await self._read_for_switchover()
        owned = reads.controller
        if owned is None or owned[0].node != job.source_node:
            raise StepFailed(Failure(FailureKind.STEP_FAILED,
                                     f"controller {job.controller_id} ownership changed under the job"))
        try:
            await self.agents.address(job.destination_node)  # remembered for the resume right after
        except AgentUnreachable as exc:
            raise StepFailed(Failure(FailureKind.DESTINATION_LOST, exc.message)) from exc
        # The source's address too, for StopAndCopy: not read from etcd after the clock starts.
        with contextlib.suppress(AgentUnreachable):
            await self.agents.address(job.source_node)  # unreachable: StopAndCopy's own lookup says so
        now = self._now()
        committed = self.observer.prepare(job.enter(Phase.COMMIT, now, note=f"owner {job.source_node} -> "
                                                                             f"{job.destination_node}")
                                          .enter(Phase.RESUMING, now).aged(self._age_s()))
        ref = self._ref()
        ref.plan.CopyFrom(agent_pb2.SwitchoverPlan(
            job_record=committed.to_bytes(), job_revision=self.revision, controller_record=owned[0].to_bytes(),
            controller_revision=owned[1], leader_term=self.epoch,
            commit_timeout_s=self.settings.etcd_check_timeout_s))
        self.suspended_at = self.monotonic()
        mark(self.job_id, "orch.stop_and_copy_sent")
        try:
            result = await self._long_call("source", "StopAndCopy", lambda s, t: s.StopAndCopy(ref, timeout=t))
        except StepFailed:
            # Whatever became of the source's answer, the destination may have committed.
            if await self._commit_landed():
                return
            raise
        mark(self.job_id, "orch.stop_and_copy_returned")
        if result.switchover == agent_pb2.SWITCHOVER_COMMITTED:
            self._switched_over(committed, result)
            return
        if result.switchover == agent_pb2.SWITCHOVER_NOT_COMMITTED:
            # The source resumed the guest already, and no commit can land: no etcd needed.
            raise StepFailed(Failure(FailureKind.STEP_FAILED, f"{NOT_COMMITTED}: {result.switchover_note}",
                                     commit_never_sent=True))
        if await self._commit_landed():
            return
        raise StepFailed(Failure(FailureKind.STEP_FAILED, f"the switchover did not commit "
                                                          f"({result.switchover_note or 'no outcome reported'}); "
                                                          "its commit can no longer land"))

    async def _commit_landed(self) -> bool:
        """Settles a switchover whose outcome this runner did not learn: a write on the revision the
        plan was made on fences the destination's commit (it can never land after it); a write
        that loses its CAS reads whether the commit landed. Needs etcd, so the paused guest waits
        for it (an EtcdError stops this runner; a later pass asks the source again, which answers
        with the same outcome, and settles it the same way)."""
        fenced = self.observer.prepare(self.j.record(self._now()))
        try:
            self.revision = await self.store.update_job(self.job_id, fenced.to_bytes(), self.revision,
                                                        leader_term=self.epoch)
        except ConflictError:
            fresh = await self._load()
            if fresh.phase not in BEFORE_COMMIT:
                log.info("job %s: the destination's commit landed (%s in etcd)", self.job_id, fresh.phase)
                return True
            term = await self.store.leader_term()
            if term != self.epoch:
                raise Superseded(f"leadership moved (term {term}, ours {self.epoch})") from None
            return False  # another write (an operator's cancel) fenced the commit
        self.observer.written(self.j, fenced)
        self.job = self._written = fenced
        self._written_at = self.monotonic()
        return False

    def _switched_over(self, committed: Job, result: agent_pb2.TransferResult) -> None:
        """The destination's commit landed (`committed` is the record it wrote): what the
        stop-and-copy moved and how long it took go with the job's next write."""
        self.switched_over_at = self.monotonic()
        self.pre_pause_ms, self.pre_pause_bytes = result.pre_pause_ms, result.pre_pause_bytes
        if result.switchover_note:
            log.warning("job %s: %s", self.job_id, result.switchover_note)
        stop_index = len(committed.phases) - 3  # STOP_AND_COPY, then COMMIT and RESUMING
        opened = self._opened_phase
        job = committed.with_phase_bytes(stop_index, result.bytes_sent + result.state_bytes)
        if opened is not None and opened[0] == stop_index:
            # STOP_AND_COPY lasted until the commit was reported; COMMIT as long as the
            # destination's transaction took (inside the stop-and-copy: the phases overlap).
            job = job.with_phase_duration(stop_index, (self.switched_over_at - opened[1]) * 1000.0)
        job = job.with_phase_duration(stop_index + 1, result.commit_ms)
        job = job.remaining(int(result.dirty_bytes_remaining), self._now()).progressed(int(result.total_bytes_sent),
                                                                                      self._now())
        self._opened_phase = (len(job.phases) - 1, self.switched_over_at)
        # etcd holds `committed`; what was measured of it (`job`) goes with the next write, and
        # into the spans of the phases it closed now.
        self.observer.written(self.j, job)
        self._written, self.job = committed, job
        self.revision = result.commit_revision
        self._written_at = self.monotonic()

    async def _resume(self) -> None:
        """After the commit the destination owns the controller and runs it (it claimed RUNNING in
        the same transaction). ResumeDestination confirms it (or runs it, when the destination did
        not learn that its commit landed, or restarted); the job completes then. Verification and
        the source's release follow off the critical path."""
        dest = self.j.destination_node
        mark(self.job_id, "orch.resume_sent")
        try:
            await self.agents.call(dest, "ResumeDestination", lambda s: s.ResumeDestination(self._ref(), timeout=10.0),
                                   budget_s=self.settings.agent_call_budget_s)
        except StaleEpoch as exc:
            raise Superseded(exc.message) from exc
        except AgentUnreachable as exc:
            # A destination that hangs right after it resumed has claimed the controller in etcd:
            # the switchover happened, whatever became of the reply.
            if await self._claimed_by(dest):
                raise StepFailed(Failure(FailureKind.DESTINATION_LOST, exc.message, destination_claimed=True)) from exc
            # Lost by the rule every call follows (unregistered past the grace window, and silent):
            # a record missing for a moment (a lease that expired under load) is not enough.
            declared = await self.agents.is_lost(dest)
            raise StepFailed(Failure(FailureKind.DESTINATION_LOST,
                                     "its agent is gone (lease expired)" if declared else exc.message,
                                     destination_declared_lost=declared)) from exc
        except AgentRefused as exc:
            # A refusal comes before the claim (the destination claims only once it can run it):
            # recovery hands ownership back to the source unless the claim had landed after all.
            raise StepFailed(await self._failure("destination", exc, silent_for_s=0.0)) from exc
        mark(self.job_id, "orch.resume_returned")
        # The switchover as the orchestrator saw it: from StopAndCopy sent to the commit reported
        # (or, when it was settled otherwise, to the resume confirmed), less what the source sent
        # before it paused the guest.
        ended_at = self.switched_over_at if self.switched_over_at is not None else self.monotonic()
        downtime_ms = max(0.0, (ended_at - self.suspended_at) * 1000.0 - self.pre_pause_ms) \
            if self.suspended_at is not None else 0.0
        blackout_ms = 0.0
        try:
            status = await self.agents.call(dest, "GetSession", lambda s: s.GetSession(self._ref(), timeout=2.0),
                                            budget_s=2.0)
            blackout_ms = status.guest_blackout_ms
        except (AgentUnreachable, AgentRefused, StaleEpoch) as exc:
            log.warning("job %s: guest blackout not read from %s: %s", self.j.id, dest, exc)
        job = self.j.switched_over(downtime_ms, blackout_ms, self._now())
        self._refit_switchover(job)
        note = ""
        if job.downtime_budget_exceeded:
            note = switchover_model.Budget(job.policy.max_downtime_ms, job.predicted_downtime_ms, job.downtime_ms,
                                           job.guest_blackout_ms).message()
            log.warning("job %s: %s", job.id, note)
            self.observer.over_budget(note)
        # The job succeeded: the budget note goes on its COMPLETED entry, not in its reason.
        ended = job.end(Phase.COMPLETED, self._now(), "")
        await self._save(ended.record(ended.updated_at, note=note) if note else ended, release=True)

    def _refit_switchover(self, job: Job) -> None:
        """Feeds a measured switchover back into the model the next predictions use."""
        if self.suspended_at is None or not self.history:
            return  # the suspend time was lost with an earlier leader: nothing measured here
        final = next((p.bytes for p in reversed(job.phases) if p.phase is Phase.STOP_AND_COPY), 0)
        final = max(0, final - self.pre_pause_bytes)  # sent while the guest still ran
        rate = convergence.transfer_rate_bytes_per_s(self.history, job.policy)
        self.switchover_model.observe(job.downtime_ms, final, rate)
        metrics.SWITCHOVER_FIXED_COST.set(self.switchover_model.fixed_ms / 1000.0)

    async def _claimed_by(self, node: str) -> bool:
        owned = await self.store.get_controller(self.j.controller_id)
        return owned is not None and owned[0].node == node and owned[0].state == RUNNING

    # ---- recovery -----------------------------------------------------------------------

    async def _recover(self, failure: Failure) -> None:
        """Carries out what `recovery.decide` chooses; a recovery step that fails is decided again."""
        if failure.kind is FailureKind.STEP_FAILED and recovery.destination_replaceable(self.j) \
                and self.j.destination_node and await self._destination_gone():
            failure = Failure(FailureKind.DESTINATION_LOST, failure.reason)
        while True:
            decided = recovery.decide(self.j, failure)
            try:
                await self._carry_out(decided)
                return
            except StepFailed as again:
                failure = again.failure

    async def _destination_gone(self) -> bool:
        """Was a failure the destination going away (rather than, say, corrupt data)?"""
        try:
            status = await self.agents.call(self.j.destination_node, "GetSession",
                                            lambda s: s.GetSession(self._ref(), timeout=2.0), budget_s=PROBE_BUDGET_S)
        except AgentUnreachable:
            return True
        except (AgentRefused, StaleEpoch):
            return False
        # An agent that restarted has forgotten the job: that destination is gone for this job.
        return status.stage in ("unknown", "aborted")

    async def _carry_out(self, decided: recovery.Recovery) -> None:
        job, action = self.j, decided.action
        if action is Action.RETRY:
            log.warning("job %s: %s", job.id, decided.reason)
        elif action is Action.REPLACE_DESTINATION:
            await self._abort_destination(budget_s=2.0)
            await self._abort_source(decided.reason)
            self.history = []
            await self._save(job.destination_replaced(decided.reason, self._now()))
        elif action is Action.ROLL_BACK and decided.commit_never_sent:
            # The guest waits paused on the source: resume it first (the destination, never
            # given the controller, cannot run it), then write the ending once etcd answers.
            await self._abort_source(decided.reason, commit_never_sent=True)
            notes = await self._abort_destination(budget_s=5.0, etcd_down=True)
            await self._save_when_etcd_answers(self.j.end(_ending(decided), self._now(),
                                                          "; ".join([decided.reason, *notes])))
        elif action is Action.ROLL_BACK:
            notes = await self._abort_destination(budget_s=5.0)
            notes += await self._abort_source(decided.reason, pending_if_busy=True)
            await self._save(self.j.end(_ending(decided), self._now(), "; ".join([decided.reason, *notes])),
                             release=True)
        elif action is Action.FAIL_SOURCE_LOST:
            notes = await self._abort_destination(budget_s=5.0) if job.phase in BEFORE_COMMIT else []
            await self.store.set_controller_state(job.controller_id, LOST, only_if_node=job.source_node)
            await self._save(job.end(_ending(decided), self._now(), "; ".join([decided.reason, *notes])),
                             release=True)
        elif action is Action.MOVE_BACK:
            if not await self.store.move_back(job.controller_id, job.destination_node, job.source_node,
                                              leader_term=self.epoch):
                raise StepFailed(Failure(FailureKind.DESTINATION_LOST, decided.reason, destination_claimed=True))
            await self._abort_source(decided.reason, moved_back=True)
            # Its loaded copy can never run now (its claim would lose): discard it while we are
            # here; one that does not answer is left to the reconciler.
            notes = await self._abort_destination(budget_s=2.0)
            await self._save(job.end(_ending(decided), self._now(), "; ".join([decided.reason, *notes])),
                             release=True)
        elif action is Action.COMPLETE_CLAIMED:
            # No downtime or blackout is recorded: the resume was never confirmed, so neither was measured.
            log.warning("job %s: %s", job.id, decided.reason)
            await self._save(job.end(_ending(decided), self._now(), decided.reason), release=True)

    async def _abort_destination(self, *, budget_s: float, etcd_down: bool = False) -> list[str]:
        """Best effort: a destination that does not answer is cleaned up by the reconciler later."""
        if not self.j.destination_node:
            return []
        try:
            await self.agents.call(self.j.destination_node, "AbortMigration",
                                   lambda s: s.AbortMigration(self._ref(), timeout=5.0), budget_s=budget_s,
                                   etcd_down=etcd_down)
        except (AgentUnreachable, AgentRefused) as exc:
            return [f"destination cleanup pending: {exc.message}"]
        except StaleEpoch as exc:
            raise Superseded(exc.message) from exc
        return []

    async def _save_when_etcd_answers(self, new: Job) -> None:
        """`_save(new, release=True)`, retried while etcd does not answer. Safe: a write that
        landed unseen makes the retry's CAS lose, and `_save` then finds the job ended."""
        await retry_transient(lambda: self._save(new, release=True), transient=of_types(*TRANSIENT_ETCD_ERRORS),
                              budget_s=ROLLBACK_WRITE_BUDGET_S, first_wait_s=0.1, max_wait_s=2.0)

    async def _abort_source(self, reason: str, *, moved_back: bool = False, commit_never_sent: bool = False,
                            pending_if_busy: bool = False) -> list[str]:
        """The source takes the controller back (RUNNING); if it cannot, it counts as lost. With
        `pending_if_busy`, a source too busy to confirm (alive: see `_source_busy`) is left to the
        reconciler, which aborts the sessions of ended jobs once their agent answers."""
        ref = self._ref()
        ref.commit_never_sent = commit_never_sent
        try:
            await self._call("source", "AbortMigration", lambda s: s.AbortMigration(ref, timeout=10.0),
                             etcd_down=commit_never_sent)
        except StepFailed as exc:
            busy = exc.failure.kind is FailureKind.STEP_FAILED and isinstance(exc.__cause__, AgentUnreachable)
            if busy and pending_if_busy:
                return [f"source abort pending (the reconciler finishes it): {exc.failure.reason}"]
            if busy and not moved_back:
                raise StepFailed(Failure(FailureKind.STEP_FAILED, f"{reason}; then {exc.failure.reason}")) from exc
            raise StepFailed(Failure(FailureKind.SOURCE_LOST, f"{reason}; then the source did not confirm it "
                                                              f"runs again: {exc.failure.reason}",
                                     moved_back=moved_back)) from exc
        return []


def _ending(decided: recovery.Recovery) -> Phase:
    if decided.ending is None:
        raise AssertionError(f"recovery {decided.action} must end the job")
    return decided.ending


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

