"""Reconciles what etcd says with what the agents report. Run by the leader, periodically.

For migration sessions an agent still holds for a job that ended (or that etcd never heard of):
- a destination holding the loaded controller that etcd says it owns (the job ended while it was
  unreachable after COMMIT) is resumed: it is the one node allowed to run it;
- a source frozen after stop-and-copy whose controller now runs elsewhere is released (sanitized)
  once its job's verification passed; while it is pending the verifier decides, and after it
  failed the copy is kept for an operator;
- anything else is aborted: a source goes back to RUNNING (the agent itself refuses when etcd
  says the controller belongs to another node), a destination copy is discarded.
For controllers: one marked LOST or MISSING whose owner reports it RUNNING is marked RUNNING;
one whose owner, alive, does not report it at all is marked MISSING.
The decisions are in `plan`, pure; `Reconciler` does the calls.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass

from cluster.node_cache import NodeSource
from cluster.records import LOST, MISSING, RUNNING, ControllerRecord
from cluster.store import EtcdError, EtcdStore
from orchestrator.agent_calls import AgentCallError, AgentCalls, Stub
from orchestrator.jobs import Job, Verification
from proto.v1 import agent_pb2

log = logging.getLogger(__name__)

RECONCILE_INTERVAL_S = 5.0
SETTLED_STAGES = frozenset({"released", "running", "aborted", "unknown"})


@dataclass(frozen=True)
class SessionAction:
    verb: str  # "abort", "resume" or "release"
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


def _session_action(node: str, session: agent_pb2.SessionStatus, job: Job | None,
                    records: Mapping[str, ControllerRecord]) -> SessionAction | None:
    if session.stage in SETTLED_STAGES or (job is not None and not job.terminal):
        return None
    epoch = max(session.epoch, job.epoch if job else 0)
    cid = job.controller_id if job else ""
    record = records.get(cid)
    ended = "job unknown to etcd" if job is None else f"job ended {job.phase}"
    if record is not None and session.role == "destination" and session.stage == "loaded" \
            and record.node == node and record.job_id == session.job_id:
        return SessionAction("resume", node, session.job_id, cid, epoch,
                             f"{ended}; {node} owns {cid} and holds it loaded")
    if record is not None and session.role == "source" and session.stage == "stopped" \
            and record.node != node and record.state == RUNNING:
        if job is not None and job.verification in (Verification.PENDING, Verification.FAILED):
            return None  # the verifier's to decide (PENDING), or kept for an operator (FAILED)
        return SessionAction("release", node, session.job_id, cid, epoch, f"{ended}; {cid} runs on {record.node}")
    return SessionAction("abort", node, session.job_id, cid, epoch, ended)


def plan(controllers: Sequence[ControllerRecord], reports: Mapping[str, agent_pb2.AgentInfo],
         jobs: Mapping[str, Job]) -> list[SessionAction | SetControllerState]:
    """What to repair, from etcd's records, the agents' reports (live nodes only) and the jobs."""
    records = {c.controller_id: c for c in controllers}
    actions: list[SessionAction | SetControllerState] = []
    for node, info in reports.items():
        for session in info.sessions:
            action = _session_action(node, session, jobs.get(session.job_id), records)
            if action is not None:
                actions.append(action)
    for record in controllers:
        owner = reports.get(record.node)
        if owner is None:
            continue  # owner not live: nothing to compare with yet
        reported = {c.controller_id: c for c in owner.controllers}
        status = reported.get(record.controller_id)
        if status is None:
            if record.state == RUNNING and not any(
                    j.controller_id == record.controller_id and not j.terminal for j in jobs.values()):
                actions.append(SetControllerState(record.controller_id, record.node, MISSING,
                                                  f"{record.node} is live but does not report it"))
        elif record.state in (LOST, MISSING) and status.vfio_state == "RUNNING":
            actions.append(SetControllerState(record.controller_id, record.node, RUNNING,
                                              f"{record.node} reports it running again"))
    return actions


CALL_BUDGET_S = 3.0
_SESSION_COMMANDS: dict[str, Callable[[Stub, agent_pb2.MigrationRef], Awaitable[agent_pb2.SessionStatus]]] = {
    "abort": lambda stub, ref: stub.AbortMigration(ref, timeout=10.0),
    "resume": lambda stub, ref: stub.ResumeDestination(ref, timeout=10.0),
    "release": lambda stub, ref: stub.ReleaseSource(ref, timeout=10.0),
}


class Reconciler:
    def __init__(self, store: EtcdStore, agents: AgentCalls, nodes: NodeSource | None = None) -> None:
        self.store = store
        # A node missing from a listing only delays its repairs (see reconcile_once): a moment old is fine.
        self.nodes: NodeSource = nodes or store
        self.agents = agents

    async def run_forever(self) -> None:
        while True:
            with contextlib.suppress(EtcdError):
                await self.reconcile_once()
            await asyncio.sleep(RECONCILE_INTERVAL_S)  # the period of a background repair loop

    async def _report(self, node: str) -> agent_pb2.AgentInfo | None:
        try:
            return await self.agents.call(node, "GetInfo", lambda s: s.GetInfo(agent_pb2.GetInfoRequest(),
                                                                               timeout=CALL_BUDGET_S),
                                          budget_s=CALL_BUDGET_S)
        except AgentCallError:
            return None

    async def reconcile_once(self) -> list[SessionAction | SetControllerState]:
        # Only registered nodes are asked. A node whose record is missing for a moment (a lease that
        # expired under load) is not reported this pass, which only delays its repairs: `plan`
        # takes nothing from a node's absence ("owner not live: nothing to compare with yet").
        # Ownership is read before the reports: a controller claimed after the reports were taken
        # (being created right now) would otherwise look MISSING on its live owner. The jobs are
        # read after them, so that every session reported has its job.
        controllers = await self.store.list_controllers()
        nodes = await self.nodes.list_nodes()
        for n in nodes:
            self.agents.remember(n.name, n.address)
        infos = await asyncio.gather(*(self._report(n.name) for n in nodes))
        reports = {n.name: info for n, info in zip(nodes, infos, strict=True) if info is not None}
        jobs = {j.id: j for j in (Job.from_bytes(v.value) for v in await self.store.list_jobs())}
        actions = plan(controllers, reports, jobs)
        for action in actions:
            log.info("reconcile: %s", action)
            if isinstance(action, SessionAction):
                ref = agent_pb2.MigrationRef(job_id=action.job_id, epoch=action.epoch,
                                             controller_id=action.controller_id)
                command = _SESSION_COMMANDS[action.verb]
                try:
                    await self.agents.call(action.node, f"{action.verb} {action.job_id}",
                                           lambda s, command=command, ref=ref: command(s, ref),  # type: ignore[misc]
                                           budget_s=CALL_BUDGET_S)
                except AgentCallError as exc:
                    log.info("reconcile: %s %s on %s refused: %s", action.verb, action.job_id, action.node,
                             exc.message)
            else:
                await self.store.set_controller_state(action.controller_id, action.state,
                                                      only_if_node=action.node)
        return actions
