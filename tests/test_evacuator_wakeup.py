"""The evacuator hears of a freed slot from the dispatcher at once, not at its next poll: the
dispatcher tells whoever listens (the evacuator, in the orchestrator) when a runner stops. And a
job the API just created, named to the dispatcher, runs without waiting for a scan of every job.

Real etcd, a real dispatcher and runner; the job is for a node that does not exist, so its runner
ends it quickly without any agent."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from cluster.store import EtcdStore
from orchestrator.agent_calls import AgentCalls
from orchestrator.dispatcher import JobDispatcher
from orchestrator.jobs import Job, Policy, pending_job


async def run_ghost_job(store: EtcdStore, kick: Callable[[JobDispatcher, str], None]) -> Job:
    """A job for a node that does not exist, created in etcd, then `kick(dispatcher, job id)`;
    returns the job's record once the dispatcher said its runner stopped."""
    lease = await store.grant_lease(10)
    term = await store.try_become_leader("orch-test", lease)
    assert term is not None
    job = pending_job("job-ghost", controller_id="ghost", source_node="nowhere", namespace_bytes=1 << 20,
                      policy=Policy(), now=0.0)
    await store.create_job(job.id, job.controller_id, job.to_bytes())
    told = asyncio.Event()
    agents = AgentCalls(store, node_grace_s=0.2)
    dispatcher = JobDispatcher(store, agents, term, max_concurrent=1, on_job_ended=told.set)
    kick(dispatcher, job.id)
    try:
        await asyncio.wait_for(told.wait(), 60)
        (record,) = [Job.from_bytes(v.value) for v in await store.list_jobs()]
    finally:
        await dispatcher.stop()
        await agents.close()
        await store.revoke_lease(lease)
    return record


async def test_the_dispatcher_tells_when_a_job_it_ran_ended(store: EtcdStore) -> None:
    record = await run_ghost_job(store, lambda dispatcher, _: dispatcher.start())
    assert record.terminal, f"told before the job ended: it is {record.phase}"


async def test_a_job_named_to_the_dispatcher_runs_without_a_scan(store: EtcdStore) -> None:
    # not started: no scan of etcd ever runs; the job id alone starts its runner
    record = await run_ghost_job(store, lambda dispatcher, job_id: dispatcher.poke(job_id))
    assert record.terminal, f"told before the job ended: it is {record.phase}"
    assert record.epoch > 0  # driven by this dispatcher's term
