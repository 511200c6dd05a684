"""Checks completed migrations off their critical path, and lets the source copy go once they pass.

Run by the leader beside the dispatcher: a job that completes is handed over at once (`poke`),
and etcd is scanned now and then for completed jobs still PENDING (another leader completed them,
or this one restarted). For each, the two agents' digests of the switchover image are read
(GetSession) and judged (`verification`, pure); the verdict is written into the job record (a CAS
fenced by the leader key). PASSED releases (sanitizes) the source copy; FAILED raises the alarm
(metric `nvmigrate_verifications_total{outcome="FAILED"}`, an error log, the reason in the job)
and keeps the source copy for an operator.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from cluster.store import ConflictError, EtcdError, EtcdStore
from orchestrator import metrics, tracing, verification
from orchestrator.agent_calls import AgentCalls, AgentRefused, AgentUnreachable, StaleEpoch
from orchestrator.jobs import Job, ParsedJobs, Phase, Verification, since_wall
from orchestrator.verification import DigestReport, Verdict
from proto.v1 import agent_pb2

log = logging.getLogger(__name__)

POLL_INTERVAL_S = 0.2  # while a job waits for its digests
SCAN_INTERVAL_S = 5.0  # etcd scan for pending jobs this process was not told about
CALL_BUDGET_S = 2.0
RELEASE_BUDGET_S = 10.0


class Verifier:
    def __init__(self, store: EtcdStore, agents: AgentCalls, epoch: int, *,
                 wall: Callable[[], float] = time.time, monotonic: Callable[[], float] = time.monotonic) -> None:
        self.store = store
        self.agents = agents
        self.epoch = epoch
        self.wall = wall
        self.monotonic = monotonic
        self._pending: set[str] = set()
        self._since: dict[str, tuple[float, float]] = {}  # job id -> (elapsed when first seen, monotonic then)
        # job id -> (revision, the record parsed): a pending job is read every poll, parsed once
        self._read: dict[str, tuple[int, Job]] = {}
        self._scanned = ParsedJobs()
        self._wake = asyncio.Event()
        self._last_scan = float("-inf")

    def poke(self, job_id: str) -> None:
        """A job just completed: verify it now rather than at the next scan."""
        self._pending.add(job_id)
        self._wake.set()

    async def run_forever(self) -> None:
        while True:
            try:
                await self.verify_once()
            except EtcdError as exc:
                log.warning("verification pass failed, retrying: %s", exc)
            interval = POLL_INTERVAL_S if self._pending else SCAN_INTERVAL_S
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), interval)  # the period of a background loop
            self._wake.clear()

    async def verify_once(self) -> list[Job]:
        """One pass over the pending jobs; returns the ones that got a verdict."""
        if self.monotonic() - self._last_scan >= SCAN_INTERVAL_S:
            self._last_scan = self.monotonic()
            for job in self._scanned.parse(v.value for v in await self.store.list_jobs()):
                if job.phase is Phase.COMPLETED and job.verification is Verification.PENDING:
                    self._pending.add(job.id)
        judged = await asyncio.gather(*(self._verify(job_id) for job_id in sorted(self._pending)))
        return [job for job in judged if job is not None]

    def _elapsed_s(self, job: Job) -> float:
        """Since the job completed: from its record the first time, then on the monotonic clock."""
        first = self._since.get(job.id)
        if first is None:
            completed_at = job.phases[-1].started_at if job.phases else job.updated_at
            first = (since_wall(self.wall(), completed_at), self.monotonic())
            self._since[job.id] = first
        return first[0] + (self.monotonic() - first[1])

    def _forget(self, job_id: str) -> None:
        self._pending.discard(job_id)
        self._since.pop(job_id, None)
        self._read.pop(job_id, None)

    async def _verify(self, job_id: str) -> Job | None:
        got = await self.store.get_job(job_id)
        if got is None:
            self._forget(job_id)
            return None
        read = self._read.get(job_id)
        if read is not None and read[0] == got.mod_revision:
            job = read[1]
        else:
            job = Job.from_bytes(got.value)
            self._read[job_id] = (got.mod_revision, job)
        if job.phase is not Phase.COMPLETED or job.verification is not Verification.PENDING:
            self._forget(job_id)
            return None
        with tracing.verifying(job):
            return await self._judge(job, got.mod_revision)

    async def _judge(self, job: Job, revision: int) -> Job | None:
        ref = agent_pb2.MigrationRef(job_id=job.id, epoch=self.epoch, controller_id=job.controller_id)
        source, destination = await asyncio.gather(self._report(job.source_node, ref),
                                                   self._report(job.destination_node, ref))
        judgement = verification.judge(source, destination, elapsed_s=self._elapsed_s(job),
                                       deadline=verification.deadline_s(job))
        if judgement.verdict is Verdict.WAIT:
            return None
        now = self.wall()
        if judgement.verdict is Verdict.PASSED:
            new = job.verified(source.digest, destination.digest, now)
        else:
            new = job.verification_failed(judgement.reason, source.digest, destination.digest, now)
        try:
            await self.store.update_job(job.id, new.to_bytes(), revision, leader_term=self.epoch)
        except ConflictError:
            return None  # changed meanwhile (or we no longer lead): the next pass reads it again
        self._forget(job.id)
        metrics.job_written(job, new)
        tracing.verification_settled(new)
        if new.verification is Verification.PASSED:
            log.info("job %s: verification passed (%s); releasing the source copy on %s", job.id,
                     judgement.reason, job.source_node)
            await self._release_source(job, ref)
        else:
            log.error("job %s: VERIFICATION FAILED: %s; controller %s runs on %s, the source copy on %s is kept "
                      "for an operator", job.id, judgement.reason, job.controller_id, job.destination_node,
                      job.source_node)
        return new

    async def _report(self, node: str, ref: agent_pb2.MigrationRef) -> DigestReport:
        try:
            status = await self.agents.call(node, "GetSession", lambda s: s.GetSession(ref, timeout=CALL_BUDGET_S),
                                            budget_s=CALL_BUDGET_S)
        except (AgentUnreachable, AgentRefused, StaleEpoch):
            return DigestReport(reachable=False)
        return DigestReport(digest=status.digest, error=status.digest_error)

    async def _release_source(self, job: Job, ref: agent_pb2.MigrationRef) -> None:
        try:
            await self.agents.call(job.source_node, "ReleaseSource", lambda s: s.ReleaseSource(ref, timeout=5.0),
                                   budget_s=RELEASE_BUDGET_S)
        except (AgentUnreachable, AgentRefused, StaleEpoch) as exc:
            # The reconciler releases it once the source answers: the job says PASSED.
            log.warning("job %s: source release on %s pending: %s", job.id, job.source_node, exc)
