"""Reconciles what etcd says with what the agents report. Run by the leader, periodically.

- A migration session an agent still holds for a job that ended (or that etcd never heard of)
  is aborted there: the source goes back to RUNNING, a destination copy is discarded. Sessions
  past the point of no return (released source, running destination) refuse the abort.
- A controller marked LOST whose owner reports it RUNNING again (a hung agent that came back)
  is marked RUNNING; one the owner, alive, does not report at all is marked MISSING.
The decisions are in `plan`, pure; `Reconciler` does the calls.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import grpc
import grpc.aio

from cluster.records import ControllerRecord
from cluster.store import EtcdError, EtcdStore
from orchestrator.agent_client import AgentDirectory
from orchestrator.jobs import Job
from proto.v1 import agent_pb2

log = logging.getLogger(__name__)

RECONCILE_INTERVAL_S = 5.0
SETTLED_STAGES = frozenset({"released", "running", "aborted", "unknown"})


@dataclass(frozen=True)
class AbortSession:
    node: str
    job_id: str
    controller_id: str
    epoch: int
    why: str


@dataclass(frozen=True)
class SetControllerState:
    controller_id: str
    node: str
    state: str
    why: str


def plan(controllers: Sequence[ControllerRecord], reports: Mapping[str, agent_pb2.AgentInfo],
         jobs: Mapping[str, Job]) -> list[AbortSession | SetControllerState]:
    """What to repair, from etcd's records, the agents' reports (live nodes only) and the jobs."""
    actions: list[AbortSession | SetControllerState] = []
    for node, info in reports.items():
        for session in info.sessions:
            if session.stage in SETTLED_STAGES:
                continue
            job = jobs.get(session.job_id)
            if job is None or job.terminal:
                why = "job unknown to etcd" if job is None else f"job ended {job.phase}"
                epoch = max(session.epoch, job.epoch if job else 0)
                cid = job.controller_id if job else ""
                actions.append(AbortSession(node, session.job_id, cid, epoch, why))
    for record in controllers:
        owner = reports.get(record.node)
        if owner is None:
            continue  # owner not live: nothing to compare with yet
        reported = {c.controller_id: c for c in owner.controllers}
        status = reported.get(record.controller_id)
        if status is None:
            if record.state != "MISSING" and not any(
                    j.controller_id == record.controller_id and not j.terminal for j in jobs.values()):
                actions.append(SetControllerState(record.controller_id, record.node, "MISSING",
                                                  f"{record.node} is live but does not report it"))
        elif record.state in ("LOST", "MISSING") and status.vfio_state == "RUNNING":
            actions.append(SetControllerState(record.controller_id, record.node, "RUNNING",
                                              f"{record.node} reports it running again"))
    return actions


class Reconciler:
    def __init__(self, store: EtcdStore, agents: AgentDirectory) -> None:
        self.store = store
        self.agents = agents

    async def run_forever(self) -> None:
        while True:
            with contextlib.suppress(EtcdError):
                await self.reconcile_once()
            await asyncio.sleep(RECONCILE_INTERVAL_S)  # the period of a background repair loop

    async def _report(self, address: str) -> agent_pb2.AgentInfo | None:
        try:
            reply: agent_pb2.AgentInfo = await self.agents.stub(address).GetInfo(agent_pb2.GetInfoRequest(),
                                                                                 timeout=3.0)
            return reply
        except grpc.aio.AioRpcError:
            return None

    async def reconcile_once(self) -> list[AbortSession | SetControllerState]:
        nodes = await self.store.list_nodes()
        addresses = {n.name: n.address for n in nodes}
        infos = await asyncio.gather(*(self._report(a) for a in addresses.values()))
        reports = {name: info for name, info in zip(addresses, infos, strict=True) if info is not None}
        jobs = {j.id: j for j in (Job.from_bytes(v.value) for v in await self.store.list_jobs())}
        actions = plan(await self.store.list_controllers(), reports, jobs)
        for action in actions:
            log.info("reconcile: %s", action)
            if isinstance(action, AbortSession):
                ref = agent_pb2.MigrationRef(job_id=action.job_id, epoch=action.epoch,
                                             controller_id=action.controller_id)
                with contextlib.suppress(grpc.aio.AioRpcError):
                    await self.agents.stub(addresses[action.node]).AbortMigration(ref, timeout=10.0)
            else:
                await self.store.set_controller_state(action.controller_id, action.state,
                                                      only_if_node=action.node)
        return actions
