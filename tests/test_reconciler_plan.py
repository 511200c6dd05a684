"""`orchestrator.reconciler.plan`, table-driven: one row per rule of its docstring (and the cases
that sit next to a rule), from etcd's records, the live agents' reports and the jobs."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from cluster.records import COMMITTED, LOST, MISSING, RUNNING, ControllerRecord
from orchestrator.jobs import Job, Phase, Policy, Verification
from orchestrator.reconciler import SETTLED_STAGES, SessionAction, SetControllerState, plan
from proto.v1 import agent_pb2

JOB = "mig-000000000001"
OTHER_JOB = "mig-000000000002"
MiB = 1 << 20


def job(phase: Phase, *, job_id: str = JOB, cid: str = "c1", epoch: int = 5,
        verification: Verification = Verification.NONE) -> Job:
    return Job(id=job_id, controller_id=cid, source_node="n1", destination_node="n2", namespace_bytes=MiB,
               policy=Policy(), created_at=1.0, phase=phase, epoch=epoch, verification=verification)


def verified(outcome: Verification = Verification.PASSED) -> Job:
    return job(Phase.COMPLETED, verification=outcome)


def owned(node: str, state: str = RUNNING, *, job_id: str = JOB, cid: str = "c1") -> ControllerRecord:
    history = ("n1",) if node != "n1" else ()
    return ControllerRecord(controller_id=cid, node=node, namespace_bytes=MiB, job_id=job_id, state=state,
                            history=history)


@dataclass(frozen=True)
class Session:
    role: str
    stage: str
    epoch: int = 5
    job_id: str = JOB

    def message(self) -> agent_pb2.SessionStatus:
        return agent_pb2.SessionStatus(job_id=self.job_id, role=self.role, stage=self.stage, epoch=self.epoch)


@dataclass(frozen=True)
class Report:
    """What a live agent answers to GetInfo: its controllers (id -> vfio state) and sessions."""

    controllers: dict[str, str] = field(default_factory=dict)
    sessions: tuple[Session, ...] = ()

    def message(self, node: str) -> agent_pb2.AgentInfo:
        return agent_pb2.AgentInfo(
            node=node,
            controllers=[agent_pb2.ControllerStatus(controller_id=cid, node=node, vfio_state=state)
                         for cid, state in self.controllers.items()],
            sessions=[s.message() for s in self.sessions])


@dataclass(frozen=True)
class Row:
    records: tuple[ControllerRecord, ...]
    reports: dict[str, Report]
    jobs: tuple[Job, ...]
    expected: tuple[SessionAction | SetControllerState, ...]


def run(row: Row) -> list[SessionAction | SetControllerState]:
    return plan(list(row.records), {node: r.message(node) for node, r in row.reports.items()},
                {j.id: j for j in row.jobs})


def resume(node: str, why: str, epoch: int = 5) -> SessionAction:
    return SessionAction("resume", node, JOB, "c1", epoch, why)


def release(node: str, why: str, epoch: int = 5) -> SessionAction:
    return SessionAction("release", node, JOB, "c1", epoch, why)


def abort(node: str, why: str, epoch: int = 5, cid: str = "c1", job_id: str = JOB) -> SessionAction:
    return SessionAction("abort", node, job_id, cid, epoch, why)


# The controller's own report is left out of most session rows (its owner then reports it
# RUNNING), so that each row shows one rule at work.
SESSION_ROWS: dict[str, Row] = {
    # ---- resume: a loaded destination that owns the controller, after the job ended
    "resume: job failed after COMMIT while the loaded destination was unreachable": Row(
        (owned("n2", COMMITTED),),
        {"n2": Report({"c1": "STOP"}, (Session("destination", "loaded"),))},
        (job(Phase.FAILED),),
        (resume("n2", "job ended FAILED; n2 owns c1 and holds it loaded"),)),
    "resume: it had claimed RUNNING already": Row(
        (owned("n2", RUNNING),),
        {"n2": Report({"c1": "STOP"}, (Session("destination", "loaded"),))},
        (job(Phase.FAILED),),
        (resume("n2", "job ended FAILED; n2 owns c1 and holds it loaded"),)),
    "resume: the job's epoch is newer than the session's": Row(
        (owned("n2", COMMITTED),),
        {"n2": Report({"c1": "STOP"}, (Session("destination", "loaded", epoch=3),))},
        (job(Phase.FAILED, epoch=7),),
        (resume("n2", "job ended FAILED; n2 owns c1 and holds it loaded", epoch=7),)),
    "abort, not resume: ownership went back to the source": Row(
        (owned("n1", RUNNING),),
        {"n1": Report({"c1": "RUNNING"}), "n2": Report({}, (Session("destination", "loaded"),))},
        (job(Phase.ROLLED_BACK),),
        (abort("n2", "job ended ROLLED_BACK"),)),
    "abort, not resume: the record names another job": Row(
        (owned("n2", RUNNING, job_id=OTHER_JOB),),
        {"n2": Report({"c1": "RUNNING"}, (Session("destination", "loaded"),))},
        (job(Phase.FAILED),),
        (abort("n2", "job ended FAILED"),)),
    "abort, not resume: the destination had not loaded it yet": Row(
        (owned("n1", RUNNING),),
        {"n1": Report({"c1": "RUNNING"}), "n2": Report({}, (Session("destination", "received round 2"),))},
        (job(Phase.CANCELLED),),
        (abort("n2", "job ended CANCELLED"),)),
    # ---- release: a stopped source whose controller runs elsewhere, once verification passed
    "release: source frozen after stop-and-copy, the destination runs it, verified": Row(
        (owned("n2", RUNNING),),
        {"n1": Report({"c1": "STOP"}, (Session("source", "stopped"),)), "n2": Report({"c1": "RUNNING"})},
        (verified(),),
        (release("n1", "job ended COMPLETED; c1 runs on n2"),)),
    "release: even when the destination is not live (etcd says it runs there)": Row(
        (owned("n2", RUNNING),),
        {"n1": Report({"c1": "STOP"}, (Session("source", "stopped", epoch=9),))},
        (verified(),),
        (release("n1", "job ended COMPLETED; c1 runs on n2", epoch=9),)),
    "release: a job that never verified (its record predates verification)": Row(
        (owned("n2", RUNNING),),
        {"n1": Report({"c1": "STOP"}, (Session("source", "stopped"),))},
        (job(Phase.COMPLETED),),
        (release("n1", "job ended COMPLETED; c1 runs on n2"),)),
    "nothing: verification pending (the verifier releases it)": Row(
        (owned("n2", RUNNING),),
        {"n1": Report({"c1": "STOP"}, (Session("source", "stopped"),)), "n2": Report({"c1": "RUNNING"})},
        (verified(Verification.PENDING),),
        ()),
    "nothing: verification failed (the copy is kept for an operator)": Row(
        (owned("n2", RUNNING),),
        {"n1": Report({"c1": "STOP"}, (Session("source", "stopped"),)), "n2": Report({"c1": "RUNNING"})},
        (verified(Verification.FAILED),),
        ()),
    "abort, not release: the destination never claimed it": Row(
        (owned("n2", COMMITTED),),
        {"n1": Report({"c1": "STOP"}, (Session("source", "stopped"),))},
        (job(Phase.FAILED),),
        (abort("n1", "job ended FAILED"),)),
    "abort, not release: the source still owns it": Row(
        (owned("n1", RUNNING),),
        {"n1": Report({"c1": "STOP"}, (Session("source", "stopped"),))},
        (job(Phase.ROLLED_BACK),),
        (abort("n1", "job ended ROLLED_BACK"),)),
    "abort, not release: the source was not stopped yet": Row(
        (owned("n1", RUNNING),),
        {"n1": Report({"c1": "PRE_COPY"}, (Session("source", "precopy"),))},
        (job(Phase.CANCELLED),),
        (abort("n1", "job ended CANCELLED"),)),
    # ---- abort: a session of a job etcd never heard of
    "abort: a job unknown to etcd (a stale orchestrator's)": Row(
        (owned("n1", RUNNING),),
        {"n1": Report({"c1": "PRE_COPY"}, (Session("source", "precopy", epoch=2, job_id=OTHER_JOB),))},
        (),
        (abort("n1", "job unknown to etcd", epoch=2, cid="", job_id=OTHER_JOB),)),
    # ---- left alone: running jobs
    "nothing: the job still runs (a loaded destination mid-switchover)": Row(
        (owned("n2", COMMITTED),),
        {"n1": Report({"c1": "STOP"}, (Session("source", "stopped"),)),
         "n2": Report({"c1": "STOP"}, (Session("destination", "loaded"),))},
        (job(Phase.RESUMING),),
        ()),
    "nothing: the job still runs (precopy)": Row(
        (owned("n1", RUNNING),),
        {"n1": Report({"c1": "PRE_COPY"}, (Session("source", "precopy"),)),
         "n2": Report({}, (Session("destination", "received round 1"),))},
        (job(Phase.PRECOPY),),
        ()),
}


@pytest.mark.parametrize("row", SESSION_ROWS.values(), ids=SESSION_ROWS.keys())
def test_sessions(row: Row) -> None:
    assert run(row) == list(row.expected)


@pytest.mark.parametrize("stage", sorted(SETTLED_STAGES))
@pytest.mark.parametrize("role", ["source", "destination"])
def test_settled_sessions_are_left_alone(stage: str, role: str) -> None:
    for ended in (job(Phase.COMPLETED), None):  # known and unknown jobs alike
        row = Row((owned("n2", RUNNING),), {"n2": Report({"c1": "RUNNING"}, (Session(role, stage),))},
                  (ended,) if ended else (), ())
        assert run(row) == []


CONTROLLER_ROWS: dict[str, Row] = {
    # ---- a controller marked LOST or MISSING that its owner reports RUNNING
    "LOST, owner reports it RUNNING -> RUNNING": Row(
        (owned("n1", LOST),), {"n1": Report({"c1": "RUNNING"})}, (),
        (SetControllerState("c1", "n1", RUNNING, "n1 reports it running again"),)),
    "MISSING, owner reports it RUNNING -> RUNNING": Row(
        (owned("n2", MISSING),), {"n2": Report({"c1": "RUNNING"})}, (),
        (SetControllerState("c1", "n2", RUNNING, "n2 reports it running again"),)),
    "LOST, owner back but keeps it stopped: nothing (an operator decides)": Row(
        (owned("n1", LOST),), {"n1": Report({"c1": "STOP"})}, (job(Phase.FAILED),), ()),
    "LOST, reported RUNNING by a node that does not own it: nothing": Row(
        (owned("n1", LOST),), {"n1": Report({}), "n2": Report({"c1": "RUNNING"})}, (), ()),
    "RUNNING and reported RUNNING: nothing": Row(
        (owned("n1", RUNNING),), {"n1": Report({"c1": "RUNNING"})}, (), ()),
    # ---- a live owner that does not report it
    "RUNNING, live owner does not report it -> MISSING": Row(
        (owned("n1", RUNNING),), {"n1": Report({})}, (),
        (SetControllerState("c1", "n1", MISSING, "n1 is live but does not report it"),)),
    "RUNNING, not reported, only ended jobs moved it -> MISSING": Row(
        (owned("n2", RUNNING),), {"n2": Report({})}, (job(Phase.COMPLETED),),
        (SetControllerState("c1", "n2", MISSING, "n2 is live but does not report it"),)),
    "RUNNING, reported as still being created: nothing": Row(
        (owned("n1", RUNNING),), {"n1": Report({"c1": "CREATING"})}, (), ()),
    "MISSING, reported as still being created: nothing (it is not running yet)": Row(
        (owned("n1", MISSING),), {"n1": Report({"c1": "CREATING"})}, (), ()),
    "RUNNING, not reported, a job is moving it: nothing": Row(
        (owned("n1", RUNNING),), {"n1": Report({})}, (job(Phase.PREPARING),), ()),
    "RUNNING, not reported, a job moves another controller -> MISSING": Row(
        (owned("n1", RUNNING),), {"n1": Report({})}, (job(Phase.PRECOPY, cid="c2"),),
        (SetControllerState("c1", "n1", MISSING, "n1 is live but does not report it"),)),
    "COMMITTED, not reported: nothing (the job's runner decides)": Row(
        (owned("n2", COMMITTED),), {"n2": Report({})}, (job(Phase.FAILED),), ()),
    "LOST, not reported: nothing (already marked)": Row(
        (owned("n1", LOST),), {"n1": Report({})}, (), ()),
    # ---- a dead owner
    "dead owner, RUNNING: nothing": Row(
        (owned("n1", RUNNING),), {"n2": Report({})}, (), ()),
    "dead owner, LOST: nothing": Row(
        (owned("n1", LOST),), {"n2": Report({"c1": "RUNNING"})}, (), ()),
    "no live agent at all: nothing": Row(
        (owned("n1", RUNNING), owned("n2", MISSING, cid="c2")), {}, (), ()),
}


@pytest.mark.parametrize("row", CONTROLLER_ROWS.values(), ids=CONTROLLER_ROWS.keys())
def test_controllers(row: Row) -> None:
    assert run(row) == list(row.expected)


def test_one_pass_covers_every_node_and_controller() -> None:
    # the rules combine: sessions first (in report order), then controllers (in record order)
    row = Row(
        (owned("n2", RUNNING), owned("n3", LOST, cid="c2", job_id=""), owned("n3", RUNNING, cid="c3", job_id="")),
        {"n1": Report({"c1": "STOP"}, (Session("source", "stopped"),)),
         "n2": Report({"c1": "RUNNING"}),
         "n3": Report({"c2": "RUNNING"}, (Session("source", "precopy", job_id=OTHER_JOB, epoch=1),))},
        (verified(),),
        (release("n1", "job ended COMPLETED; c1 runs on n2"),
         abort("n3", "job unknown to etcd", epoch=1, cid="", job_id=OTHER_JOB),
         SetControllerState("c2", "n3", RUNNING, "n3 reports it running again"),
         SetControllerState("c3", "n3", MISSING, "n3 is live but does not report it")))
    assert run(row) == list(row.expected)
