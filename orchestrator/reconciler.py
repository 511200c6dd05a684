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

Which agents are asked (GetInfo) each pass is chosen too (`nodes_to_ask`, `due_next`, pure): at a
thousand agents, asking every one every pass was the orchestrator's largest background cost. Each
pass asks the nodes where a repair may be due (a node named by a job that ended since, one that
reported a session whose job is over but that has not settled, one that did not answer, one that
registered anew or owns a controller marked LOST or MISSING) and, in turn, enough of the others
that every live node is asked at least once per FULL_SWEEP_S (every node, every pass, in clusters
of up to MIN_ASKED_PER_PASS nodes). A leader's first pass asks every node.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import Awaitable, Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass

from cluster.node_cache import NodeSource
from cluster.records import LOST, MISSING, RUNNING, ControllerRecord
from cluster.store import EtcdError, EtcdStore
from orchestrator.agent_calls import AgentCallError, AgentCalls, Stub
from orchestrator.jobs import Job, ParsedJobs, Verification
from proto.v1 import agent_pb2

log = logging.getLogger(__name__)

RECONCILE_INTERVAL_S = 5.0
# Every live node is asked at least this often, whatever happened to it; a node where a repair
# may be due is asked at the next pass.
FULL_SWEEP_S = 60.0
MIN_ASKED_PER_PASS = 64
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


def nodes_to_ask(live: Collection[str], due: Collection[str], sweep: int, cursor: int) -> tuple[set[str], int]:
    """The live nodes asked this pass: every due one, and `sweep` others in turn (by name) from
    `cursor`; returns them and the cursor of the next pass."""
    names = sorted(live)
    if sweep >= len(names):
        return set(names), 0
    start = cursor % len(names)
    turn = names[start:start + sweep] + names[:max(0, start + sweep - len(names))]
    return set(turn) | (set(due) & set(names)), (start + sweep) % len(names)


def sweep_size(live: int) -> int:
    """How many nodes a pass asks in turn: all of them every FULL_SWEEP_S, at least MIN_ASKED_PER_PASS."""
    return max(MIN_ASKED_PER_PASS, math.ceil(live * RECONCILE_INTERVAL_S / FULL_SWEEP_S))


def job_nodes(job: Job) -> set[str]:
    """The nodes a job may have left a session on."""
    return {job.source_node, job.destination_node, *job.excluded_destinations} - {""}


def due_next(asked: Collection[str], reports: Mapping[str, agent_pb2.AgentInfo], jobs: Mapping[str, Job],
             newly_ended: Iterable[Job]) -> set[str]:
    """The nodes to ask at the next pass whatever the turn: asked but silent; holding a session
    that has not settled although its job is over (or unknown); named by a job that just ended."""
    due = {node for node in asked if node not in reports}
    for node, info in reports.items():
        for session in info.sessions:
            job = jobs.get(session.job_id)
            if session.stage not in SETTLED_STAGES and (job is None or job.terminal):
                due.add(node)
                break
    for job in newly_ended:
        due |= job_nodes(job)
    return due


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
        self._jobs = ParsedJobs()
        self._first = True  # a leader's first pass asks every node
        self._cursor = 0  # where the next pass's turn starts, in the sorted live nodes
        self._due: set[str] = set()  # asked at the next pass, whatever the turn
        self._ended: set[str] = set()  # ids of the terminal jobs seen so far (in the last listing)
        self._registrations: dict[str, tuple[str, float]] = {}  # node -> (address, started_at) last seen
        self.asked: set[str] = set()  # the nodes the last pass asked

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
        registrations = {n.name: (n.address, n.started_at) for n in nodes}
        # a node registered anew (an agent restarted: it may have restored sessions from disk)
        due = {name for name, seen in registrations.items() if self._registrations.get(name) != seen}
        due |= self._due | {c.node for c in controllers if c.state in (LOST, MISSING)}
        if self._first:
            asked, self._cursor = set(registrations), 0
        else:
            asked, self._cursor = nodes_to_ask(registrations, due, sweep_size(len(nodes)), self._cursor)
        for n in nodes:
            self.agents.remember(n.name, n.address)
        ordered = [n.name for n in nodes if n.name in asked]
        self.asked = asked
        infos = await asyncio.gather(*(self._report(name) for name in ordered))
        reports = {name: info for name, info in zip(ordered, infos, strict=True) if info is not None}
        jobs = {j.id: j for j in self._jobs.parse(v.value for v in await self.store.list_jobs())}
        ended = {job_id for job_id, j in jobs.items() if j.terminal}
        # On a leader's first pass every node was asked: what ended before is covered by it.
        newly_ended = [] if self._first else [jobs[job_id] for job_id in ended - self._ended]
        self._due = due_next(ordered, reports, jobs, newly_ended)
        self._ended, self._registrations, self._first = ended, registrations, False
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
