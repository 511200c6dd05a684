"""Owns the job runners of the leading orchestrator: starts one per unfinished job, bounded by the
concurrency limit, and cancels them all when leadership ends.

Jobs are found by scanning etcd (at start, when the API accepts a job, and periodically), so a
new leader picks up every job the previous one left in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from cluster.node_cache import NodeSource
from cluster.store import EtcdError, EtcdStore
from orchestrator.agent_calls import AgentCalls
from orchestrator.jobs import Job, Phase
from orchestrator.runner import JobRunner, RunnerSettings, run_job
from orchestrator.switchover_model import SwitchoverModel
from orchestrator.verifier import Verifier

log = logging.getLogger(__name__)

RESCAN_INTERVAL_S = 2.0


class JobDispatcher:
    def __init__(self, store: EtcdStore, agents: AgentCalls, epoch: int, max_concurrent: int,
                 settings: RunnerSettings | None = None, verifier: Verifier | None = None,
                 switchover_model: SwitchoverModel | None = None,
                 on_job_ended: Callable[[], None] = lambda: None, nodes: NodeSource | None = None) -> None:
        self.settings = settings or RunnerSettings()
        self.switchover_model = switchover_model or SwitchoverModel()
        # Told when a runner stops (its job ended, or it gave the job up): the evacuator starts
        # the next migration at once instead of finding the freed slot at its next poll.
        self.on_job_ended = on_job_ended
        self.verifier = verifier
        self.store = store
        self.nodes = nodes
        self.agents = agents
        self.epoch = epoch
        self._slots = asyncio.Semaphore(max_concurrent)
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._runners: dict[str, JobRunner] = {}
        self._scanned: dict[bytes, tuple[str, bool]] = {}  # a job record's bytes -> (its id, terminal?)
        self._wake = asyncio.Event()
        self._scanner: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._scanner = asyncio.create_task(self._scan_loop(), name="job-scan")

    def live_job(self, job_id: str, revision: int) -> Job | None:
        """The job as its runner here knows it (with progress not written yet), if etcd's record is
        still the one at `revision` that the runner last wrote or read; None otherwise."""
        runner = self._runners.get(job_id)
        return runner.live(revision) if runner is not None else None

    def poke(self, job_id: str | None = None) -> None:
        """A job was created: its runner starts now (a job named here), or a scan runs now instead
        of at the next interval. Each job of a burst of CreateMigration scanning every job record
        was the leader's (and etcd's) largest cost at hundreds of submissions."""
        if job_id is None:
            self._wake.set()
        elif job_id not in self._tasks:
            self._start(job_id)

    async def stop(self) -> None:
        tasks = [t for t in (self._scanner, *self._tasks.values()) if t is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks.clear()

    async def _scan_loop(self) -> None:
        while True:
            try:
                await self._scan()
            except EtcdError as exc:
                log.warning("job scan failed, retrying: %s", exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), RESCAN_INTERVAL_S)
            self._wake.clear()

    async def _scan(self) -> None:
        # Each job created pokes a scan, and each scan lists every job: a record unchanged since
        # the last scan is not parsed again (its bytes say what it was).
        seen: dict[bytes, tuple[str, bool]] = {}
        for versioned in await self.store.list_jobs():
            known = self._scanned.get(versioned.value)
            if known is None:
                job = Job.from_bytes(versioned.value)
                known = (job.id, job.terminal)
            seen[versioned.value] = known
            job_id, terminal = known
            if terminal or job_id in self._tasks:
                continue
            self._start(job_id)
        self._scanned = seen

    def _start(self, job_id: str) -> None:
        self._tasks[job_id] = asyncio.create_task(self._run(job_id), name=f"job-{job_id}")

    async def _run(self, job_id: str) -> None:
        try:
            async with self._slots:
                runner = JobRunner(self.store, self.agents, job_id, self.epoch, settings=self.settings,
                                   switchover_model=self.switchover_model, nodes=self.nodes)
                self._runners[job_id] = runner
                ended = await run_job(runner)
            if ended is not None and ended.phase is Phase.COMPLETED and self.verifier is not None:
                self.verifier.poke(job_id)
        finally:
            self._tasks.pop(job_id, None)
            self._runners.pop(job_id, None)
            self.on_job_ended()
