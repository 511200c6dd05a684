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

from cluster.node_cache import NodeSource
from cluster.records import NodeRecord
from cluster.store import ConflictError, EtcdError, EtcdStore
from orchestrator import evacuation, health_policy, metrics, tracing
from orchestrator.api import new_job_id
from orchestrator.evacuation import Evacuation, Limits, Reason, Start
from orchestrator.health_policy import HealthPolicy
from orchestrator.jobs import Job, Policy, pending_job

log = logging.getLogger(__name__)

# The dispatcher pokes the evacuator when a job's runner stops, so a freed slot is refilled at
# once; the tick is the fallback for what nobody tells (a controller deleted, a node gone).
TICK_S = 0.5


class Evacuator:
    def __init__(self, store: EtcdStore, term: int, limits: Limits, on_job_created: Callable[[], None],
                 clock: Callable[[], float] = time.time, health: HealthPolicy | None = None,
                 nodes: NodeSource | None = None) -> None:
        self.health = health  # None: no automatic evacuation on predicted failures
        self.store = store
        self.nodes: NodeSource = nodes or store  # planning takes nodes a moment old: each move is checked again
        self.term = term
        self.limits = limits
        self.on_job_created = on_job_created
        self.clock = clock
        self._wake = asyncio.Event()
        self._held_back_logged: set[str] = set()

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
        everything = [(Evacuation.from_bytes(v.value), v.mod_revision) for v in await self.store.list_evacuations()]
        for ev, revision in everything:
            if not ev.ended:
                versioned[ev.node] = (ev, revision)
        nodes = await self.nodes.list_nodes()
        cordoned = await self.store.cordoned_nodes()
        failing: set[str] = set()
        if self.health is not None:
            predictions = await self.store.predictions()
            failing = health_policy.failing(nodes, self.health, predictions)
            # An emptied node stays cordoned until an operator has dealt with its drive: it is not
            # evacuated again meanwhile (uncordoned while still failing, it is).
            settled = {ev.node for ev, _ in everything if ev.ended} & cordoned
            if await self._start_automatic(nodes, versioned, {ev.node: rev for ev, rev in everything}, settled,
                                           predictions):
                self.poke()
                return  # the next tick (right away) plans what was just written
        if not versioned:
            return
        controllers = {c.controller_id: c for c in await self.store.list_controllers()}
        jobs = {j.id: j for j in (Job.from_bytes(v.value) for v in await self.store.list_jobs())}
        # a node whose drive predicts a failure is never a destination, evacuating yet or not
        cordoned |= failing
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

    async def _start_automatic(self, nodes: list[NodeRecord], active: dict[str, tuple[Evacuation, int]],
                               revisions: dict[str, int], settled: set[str], predictions: dict[str, str]) -> bool:
        """Evacuations the health policy asks for, within its storm guard; True when one was written."""
        assert self.health is not None
        triggers = health_policy.automatic_evacuations(
            nodes, self.health, evacuating_automatically={n for n, (ev, _) in active.items() if ev.automatic},
            evacuating=set(active) | settled, predictions=predictions)
        for node, reasons in triggers.held_back:
            if node not in self._held_back_logged:
                log.warning("node %s predicts a drive failure (%s) but %d automatic evacuation(s) already run "
                            "(the storm guard); it waits its turn", node, "; ".join(reasons), self.health.max_automatic)
                self._held_back_logged.add(node)
        started = False
        controllers = await self.store.list_controllers() if triggers.start else []
        for node, reasons in triggers.start:
            ev = evacuation.new_evacuation(node, Reason.PREDICTED_FAILURE, controllers, self.clock(),
                                           note="automatic: " + "; ".join(reasons), automatic=True)
            await self.store.set_cordon(node, True)
            try:
                await self.store.put_evacuation(node, ev.to_bytes(), revisions.get(node, 0), leader_term=self.term)
            except ConflictError:
                continue  # someone (an operator) asked at the same moment: theirs stands
            self._held_back_logged.discard(node)
            metrics.automatic_evacuation_triggered(node)
            log.warning("node %s predicts a drive failure (%s): evacuating its %d controllers automatically", node,
                        "; ".join(reasons), len(ev.moves))
            started = True
        return started

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
