"""Deletes finished jobs from etcd, so that etcd, `orchctl jobs` and the `nvmigrate_jobs` gauge do
not grow forever. Run by the leader beside the verifier; what goes is decided by
`job_retention.to_delete` (pure), and each delete is a transaction on the job's revision fenced
by the leader key, like every other leader write: a job changed meanwhile, or a leader that lost
its lease, deletes nothing.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from cluster.store import EtcdError, EtcdStore
from orchestrator import job_retention, metrics
from orchestrator.evacuation import Evacuation
from orchestrator.job_retention import Retention
from orchestrator.jobs import Job

log = logging.getLogger(__name__)

MIN_INTERVAL_S = 0.5
MAX_INTERVAL_S = 60.0


def interval_s(retention: Retention) -> float:
    """How often to look: a fraction of the retention period, between the bounds above."""
    return min(max(retention.retention_s / 4.0, MIN_INTERVAL_S), MAX_INTERVAL_S)


class JobCollector:
    def __init__(self, store: EtcdStore, term: int, retention: Retention, *,
                 wall: Callable[[], float] = time.time) -> None:
        self.store = store
        self.term = term
        self.retention = retention
        self.wall = wall

    async def run_forever(self) -> None:
        while True:
            try:
                await self.collect_once()
            except EtcdError as exc:
                log.warning("etcd unavailable, finished jobs not collected this time: %s", exc)
            await asyncio.sleep(interval_s(self.retention))

    async def collect_once(self) -> int:
        """One pass; returns how many jobs it deleted."""
        listed = await self.store.list_jobs()
        revisions: dict[str, int] = {}
        jobs: list[Job] = []
        for versioned in listed:
            job = Job.from_bytes(versioned.value)
            revisions[job.id] = versioned.mod_revision
            jobs.append(job)
        deleted = 0
        named = {a.job_id for ev in (Evacuation.from_bytes(v.value) for v in await self.store.list_evacuations())
                 if not ev.ended for m in ev.moves for a in m.attempts}
        for job in job_retention.to_delete(jobs, self.wall(), self.retention, kept=named):
            if not await self.store.delete_job(job.id, revisions[job.id], leader_term=self.term):
                continue  # changed meanwhile, or we no longer lead: the next pass decides again
            deleted += 1
            metrics.JOBS_DELETED.labels(job.phase.value).inc()
            log.debug("job %s deleted: %s %.0f s ago", job.id, job.phase.value,
                      job_retention.age_s(job, self.wall()))
        if deleted:
            log.info("deleted %d finished job(s) past retention", deleted)
        return deleted
