"""Drives node evacuations while this orchestrator leads: reads etcd, asks `evacuation.step`
what to do, writes the evacuation records (CAS, only while it holds the leader key) and creates
the jobs the dispatcher then runs.

Order of writes for a new migration: the job id goes into the evacuation record first, then the
job is created under that id. A leader stopped in between leaves an id without a job; the next
leader creates that same job (creation refuses an existing id and a controller already being
moved), so a controller is never migrated twice by one evacuation.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from cluster.store import ConflictError, EtcdError, EtcdStore
from orchestrator import evacuation, metrics, tracing
from orchestrator.api import new_job_id
from orchestrator.evacuation import Evacuation, Limits, Start
from orchestrator.jobs import Job, Policy, pending_job

log = logging.getLogger(__name__)

TICK_S = 0.5  # how often progress is read back from etcd (jobs end without telling us)


class Evacuator:
    def __init__(self, store: EtcdStore, term: int, limits: Limits, on_job_created: Callable[[], None],
                 clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.term = term
        self.limits = limits
        self.on_job_created = on_job_created
        self.clock = clock
        self._wake = asyncio.Event()

    def poke(self) -> None:
        """An evacuation was written: look now."""
        self._wake.set()

    async def run_forever(self) -> None:
        while True:
            try:
                await self.tick()
            except EtcdError as exc:
                log.warning("evacuation tick failed, retrying: %s", exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), TICK_S)
            self._wake.clear()

    async def tick(self) -> None:
        versioned = {}
        for v in await self.store.list_evacuations():
            ev = Evacuation.from_bytes(v.value)
            if not ev.ended:
                versioned[ev.node] = (ev, v.mod_revision)
        if not versioned:
            return
        nodes = await self.store.list_nodes()
        controllers = {c.controller_id: c for c in await self.store.list_controllers()}
        jobs = {j.id: j for j in (Job.from_bytes(v.value) for v in await self.store.list_jobs())}
        cordoned = await self.store.cordoned_nodes()
        before = [ev for ev, _ in versioned.values()]
        decision = evacuation.step(before, nodes=nodes, controllers=controllers, jobs=jobs, cordoned=cordoned,
                                   limits=self.limits, now=self.clock(), new_job_id=new_job_id)
        changed = {e.node for e in decision.changed(before)}
        written: set[str] = set()
        for ev in decision.evacuations:
            old, revision = versioned[ev.node]
            if ev.node in changed:
                try:
                    await self.store.put_evacuation(ev.node, ev.to_bytes(), revision, leader_term=self.term)
                except ConflictError:
                    log.info("evacuation of %s changed meanwhile (or leadership moved); next tick decides again",
                             ev.node)
                    continue
                metrics.evacuation_written(old, ev)
                if ev.ended:
                    log.info("evacuation of %s ended %s %s", ev.node, ev.state, ev.failure)
            written.add(ev.node)
        created = False
        for start in decision.starts:
            if start.node in written:
                created |= await self._create(start, controllers[start.controller_id].namespace_bytes)
        if created:
            self.on_job_created()

    async def _create(self, start: Start, namespace_bytes: int) -> bool:
        now = self.clock()
        job = pending_job(start.job_id, controller_id=start.controller_id, source_node=start.node,
                          namespace_bytes=namespace_bytes, policy=Policy(), now=now,
                          requested_destination=start.destination, trace_context=tracing.new_job_context())
        try:
            await self.store.create_job(job.id, job.controller_id, job.to_bytes())
        except ConflictError as exc:
            # The job exists already, or another job moves the controller: the next tick adopts it.
            log.info("evacuation of %s: job %s for %s not created: %s", start.node, start.job_id,
                     start.controller_id, exc)
            return False
        log.info("evacuation of %s: job %s moves %s to %s", start.node, job.id, job.controller_id, start.destination)
        return True
