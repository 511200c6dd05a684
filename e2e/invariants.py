"""The five invariants of DESIGN.md, checked against a running e2e cluster after a fault.

An `Observer` thread asks every agent for the controller (GetController) and the orchestrators
for the job several times a second while a scenario runs, so "at most one node accepts I/O at
any moment" is checked over time and not only at the end. The check functions then look at the
end state, etcd's history of the job record, and the orchestrator logs; each returns an
`InvariantResult` that says what it checked and what it saw, and `print_results` prints them.

What counts as accepting guest I/O: vfio_state RUNNING or PRE_COPY (the source keeps running the
guest while its data is copied).

The Observer also keeps the guest's acknowledgement receipts it saw (the highest acknowledged
write and the run that wrote it, per run); `check_writes` hands them to Verify, so a guest that
resumed from an older image (and replayed the same writes over the lost ones) is caught.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import re
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import grpc

from e2e.multihost import MultiHostCluster
from orchctl.localcluster import ClusterError, wait_for
from orchestrator.jobs import ALLOWED, Phase
from proto.v1 import agent_pb2, agent_pb2_grpc, migration_pb2

ACCEPTING_IO = frozenset({"RUNNING", "PRE_COPY"})
SAMPLE_TIMEOUT_S = 0.5
VERIFY_TIMEOUT_S = 120.0
NAMES = {1: "one node runs it", 2: "no acknowledged write lost", 3: "terminal within deadline, with reason",
         4: "no job lost", 5: "one driver per job"}


@dataclass(frozen=True)
class NodeView:
    """One agent's answer about the controller: its vfio state ("ABSENT" when the agent does not
    have it) and the guest's acknowledged writes; `error` set when the agent did not answer."""

    state: str = ""
    acked: int = 0
    error: str = ""

    @property
    def accepting(self) -> bool:
        return not self.error and self.state in ACCEPTING_IO


@dataclass
class Round:
    at: float  # monotonic
    nodes: dict[str, NodeView]
    job_phase: str = ""
    job_epoch: int = 0


@dataclass
class InvariantResult:
    number: int
    held: bool | None  # None: could not apply (said why in detail)
    detail: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        return f"I{self.number}"

    def line(self) -> str:
        verdict = {True: "held", False: "VIOLATED", None: "n/a"}[self.held]
        return f"  I{self.number} {NAMES[self.number]}: {verdict} — " + "; ".join(self.detail)


class Observer(threading.Thread):
    """Samples every agent's view of one controller and the job, until `stop()`."""

    def __init__(self, bed: MultiHostCluster, controller_id: str, interval_s: float = 0.2) -> None:
        super().__init__(name=f"observer-{controller_id}", daemon=True)
        self.bed = bed
        self.controller_id = controller_id
        self.interval_s = interval_s
        self.job_id = ""
        self.rounds: list[Round] = []
        self._halt = threading.Event()
        self._channels: dict[str, grpc.Channel] = {}
        self._lock = threading.Lock()
        self._receipts: dict[int, agent_pb2.Receipt] = {}  # run id -> the highest receipt seen of it

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=10)
        for channel in self._channels.values():
            channel.close()

    def _stub(self, address: str) -> agent_pb2_grpc.AgentServiceStub:
        # one channel per agent address, kept: a new TCP connection per sample would cost more
        # than the sample
        channel = self._channels.get(address)
        if channel is None:
            channel = self._channels[address] = grpc.insecure_channel(address)
        return agent_pb2_grpc.AgentServiceStub(channel)

    def sample(self) -> Round:
        request = agent_pb2.GetControllerRequest(controller_id=self.controller_id)
        futures = {}
        for name in self.bed.agent_names:
            address = self.bed.agent_addresses.get(name)
            if address:
                futures[name] = self._stub(address).GetController.future(request, timeout=SAMPLE_TIMEOUT_S)
        at = time.monotonic()
        nodes: dict[str, NodeView] = {}
        for name, future in futures.items():
            try:
                status = future.result()
                nodes[name] = NodeView(state=status.vfio_state, acked=int(status.workload.acked_writes))
                if status.workload.HasField("receipt"):
                    self._keep_receipt(status.workload.receipt)
            except grpc.RpcError as exc:
                code = exc.code()  # type: ignore[attr-defined]
                nodes[name] = NodeView(state="ABSENT") if code == grpc.StatusCode.NOT_FOUND else \
                    NodeView(error=code.name)
        found = Round(at=at, nodes=nodes)
        if self.job_id:
            with contextlib.suppress(grpc.RpcError, Exception):
                job = self.bed.api(lambda s: s.GetMigration(migration_pb2.GetMigrationRequest(id=self.job_id),
                                                            timeout=SAMPLE_TIMEOUT_S))
                found.job_phase, found.job_epoch = migration_pb2.Phase.Name(job.phase), int(job.epoch)
        return found

    def run(self) -> None:
        while not self._halt.is_set():
            started = time.monotonic()
            try:
                got = self.sample()
            except Exception as exc:  # the observer must not die silently mid-scenario
                got = Round(at=started, nodes={}, job_phase=f"observer error: {exc}")
            with self._lock:
                self.rounds.append(got)
            self._halt.wait(max(0.0, self.interval_s - (time.monotonic() - started)))

    def _keep_receipt(self, receipt: agent_pb2.Receipt) -> None:
        with self._lock:
            kept = self._receipts.get(receipt.run_id)
            if kept is None or receipt.seq > kept.seq:
                self._receipts[receipt.run_id] = receipt

    def receipts(self) -> list[agent_pb2.Receipt]:
        """The highest acknowledged write seen of each run of the guest, for Verify."""
        with self._lock:
            return list(self._receipts.values())

    def snapshot(self) -> list[Round]:
        with self._lock:
            return list(self.rounds)


# ---- invariant 1 -------------------------------------------------------------------------------


def overlaps(rounds: list[Round]) -> list[str]:
    """Two nodes accepting I/O in two consecutive samples. One sample alone is not proof: the
    agents are asked one after another, so a switchover between two answers could look like
    both. A real double run lasts, so it shows up twice in a row."""
    found = []
    for before, after in itertools.pairwise(rounds):
        a = {n for n, v in before.nodes.items() if v.accepting}
        b = {n for n, v in after.nodes.items() if v.accepting}
        both = a & b
        if len(both) > 1:
            found.append(f"{sorted(both)} both accepting I/O at t={before.at:.1f}..{after.at:.1f}")
    return found


def hidden_double_runs(rounds: list[Round]) -> list[str]:
    """A node that could not be asked for a while (hung, cut off) but was running before and
    after, with its guest's acknowledged writes grown, while another node was seen accepting I/O
    in consecutive samples in between: both took writes in that window."""
    found = []
    for name in sorted({n for r in rounds for n in r.nodes}):
        seen = [(i, r.nodes[name]) for i, r in enumerate(rounds) if name in r.nodes]
        pos = 0
        while pos < len(seen) - 1:
            i, before = seen[pos]
            if before.error or not seen[pos + 1][1].error:
                pos += 1
                continue
            back_pos = next((q for q in range(pos + 1, len(seen)) if not seen[q][1].error), None)
            if back_pos is None:
                break  # still blind at the end: the final check covers it
            k, back = seen[back_pos]
            pos = back_pos
            if not (before.accepting and back.accepting and back.acked > before.acked):
                continue
            others = [{n for n, v in r.nodes.items() if v.accepting and n != name} for r in rounds[i + 1:k]]
            twice: set[str] = set()
            for a, b in itertools.pairwise(others):
                twice |= a & b
            if twice:
                found.append(f"{name} could not be asked from t={rounds[i].at:.1f} to t={rounds[k].at:.1f} "
                             f"yet its guest acknowledged {back.acked - before.acked} writes then, while "
                             f"{sorted(twice)} accepted I/O")
    return found


def running_now(bed: MultiHostCluster, controller_id: str) -> tuple[list[str], dict[str, str]]:
    """Asks every agent that is not killed; returns the nodes accepting I/O and every answer."""
    answers: dict[str, str] = {}
    running = []
    request = agent_pb2.GetControllerRequest(controller_id=controller_id)
    for name in bed.agent_names:
        if name in bed.killed_agents:
            answers[name] = "agent killed"
            continue
        try:
            status = bed.agent(name, lambda s: s.GetController(request, timeout=5.0))
        except grpc.RpcError as exc:
            code = exc.code()  # type: ignore[attr-defined]
            answers[name] = "-" if code == grpc.StatusCode.NOT_FOUND else f"no answer ({code.name})"
            continue
        answers[name] = status.vfio_state
        if status.vfio_state in ACCEPTING_IO:
            running.append(name)
    return running, answers


def owner_record(bed: MultiHostCluster, controller_id: str) -> dict[str, object]:
    got = bed.etcd_range(f"/nvmigrate/controllers/{controller_id}")
    return json.loads(str(got[0]["value"])) if got else {}


def placement_problems(running: list[str], owner: str, died: set[str], when: str) -> list[str]:
    """Where the controller accepts I/O now versus its owner in etcd: exactly there, or nowhere
    when the owner's node died."""
    if len(running) > 1:
        return [f"{when}: runs on {len(running)} nodes {running}"]
    if running and running[0] != owner:
        return [f"{when}: runs on {running[0]} but etcd says {owner or 'nobody'} owns it"]
    if not running and owner not in died:
        return [f"{when}: runs on no node although its owner {owner or '?'} did not die"]
    return []


def check_one_node(bed: MultiHostCluster, observer: Observer, controller_id: str, died: set[str],
                   settle_s: float, when: str) -> InvariantResult:
    """Invariant 1, over the samples so far and at the end: at most one node ever, exactly one
    now (the owner in etcd), or none when the owner's node died. The end state may take
    `settle_s` to converge (a healed agent reconciling); the samples meanwhile still count."""
    seen: dict[str, Any] = {}

    def settled() -> bool:
        seen["running"], seen["answers"] = running_now(bed, controller_id)
        seen["owner"] = owner_record(bed, controller_id)
        return not placement_problems(seen["running"], str(seen["owner"].get("node", "")), died, when)

    with contextlib.suppress(ClusterError):
        wait_for(f"{controller_id} to run on exactly its owner", settled, settle_s, interval_s=0.2)
    running, owner = seen["running"], seen["owner"]
    node = str(owner.get("node", ""))
    rounds = observer.snapshot()
    problems = overlaps(rounds) + hidden_double_runs(rounds) + placement_problems(running, node, died, when)
    detail = [f"{len(rounds)} samples of {len(bed.agent_names)} agents",
              f"{when}: accepting I/O on {running or 'no node'}; answers {seen['answers']}; etcd owner "
              f"{node or '?'} state {owner.get('state', '?')}"]
    if not running and node in died:
        detail.append(f"runs nowhere: its node {node} died (allowed)")
    return InvariantResult(1, not problems, problems + detail)


# ---- invariant 2 -------------------------------------------------------------------------------


def check_writes(bed: MultiHostCluster, controller_id: str,
                 receipts: list[agent_pb2.Receipt] | None = None) -> InvariantResult:
    """Verify on the node that runs the controller: every acknowledged block reads back, and every
    receipt (writes the Observer saw acknowledged) is still in the guest's history."""
    running, _ = running_now(bed, controller_id)
    if not running:
        return InvariantResult(2, None, ["the controller runs nowhere (its node died): nothing to read back"])
    detail: list[str] = []
    held: bool | None = True
    killed = {fault.target for fault in bed.faults if fault.kind == "SIGKILL agent"}  # restarted since, maybe
    request = agent_pb2.VerifyRequest(controller_id=controller_id, receipts=receipts or [])
    for name in running:
        try:
            result = bed.agent(name, lambda s: s.Verify(request, timeout=VERIFY_TIMEOUT_S))
        except grpc.RpcError as exc:
            if name in killed and exc.code() == grpc.StatusCode.FAILED_PRECONDITION \
                    and "no guest workload" in (exc.details() or ""):  # type: ignore[attr-defined]
                # The built-in guest lives in the agent's process: killed after the switchover, its
                # node took the guest (and its record of acknowledged writes) along, as a host that
                # dies takes its VM. The controller runs there again, guestless: nothing to read back.
                held = None if held else held
                detail.append(f"{name} was killed after it ran the controller: its guest died with it, so its "
                              "acknowledged writes cannot be read back (the controller runs there again)")
                continue
            held = False
            detail.append(f"Verify on {name} failed: {exc.details()}")  # type: ignore[attr-defined]
            continue
        acked = result.controller.workload.acked_writes
        if result.ok and result.blocks_checked > 0:
            detail.append(f"Verify on {name}: {result.blocks_checked} blocks, {acked} acknowledged writes read back, "
                          f"{result.receipts_checked} receipts in the guest's history; "
                          f"longest guest I/O gap {result.controller.workload.max_gap_ms:.0f} ms")
        else:
            held = False
            detail.append(f"Verify on {name}: {result.mismatches} mismatches of {result.blocks_checked} blocks; "
                          f"first: {result.first_mismatch}")
    return InvariantResult(2, held, detail)


# ---- invariant 3 -------------------------------------------------------------------------------


def check_terminal(job: migration_pb2.Migration | None, after_fault_s: float, deadline_s: float,
                   last_seen: str) -> InvariantResult:
    if job is None:
        return InvariantResult(3, False, [f"not terminal {deadline_s:.0f} s after the fault; last seen {last_seen}"])
    end = migration_pb2.Phase.Name(job.phase)
    if end != "COMPLETED" and not job.reason.strip():
        return InvariantResult(3, False, [f"ended {end} {after_fault_s:.1f} s after the fault with no reason"])
    why = f" ({job.reason})" if job.reason else ""
    return InvariantResult(3, True, [f"{end} {after_fault_s:.1f} s after the fault (deadline {deadline_s:.0f} s){why}"])


# ---- invariant 4 -------------------------------------------------------------------------------


def check_no_job_lost(bed: MultiHostCluster, created: list[str], job_id: str, epoch_at_fault: int,
                      leader_changed: bool) -> InvariantResult:
    detail, problems = [], []
    try:
        listed = bed.api(lambda s: s.ListMigrations(migration_pb2.ListMigrationsRequest(), timeout=10.0))
        ids = {m.id for m in listed.migrations}
    except grpc.RpcError as exc:
        return InvariantResult(4, False, [f"ListMigrations failed: {exc.details()}"])  # type: ignore[attr-defined]
    in_etcd = {str(kv["key"]).rsplit("/", 1)[-1] for kv in bed.etcd_range("/nvmigrate/jobs/", prefix=True)}
    for jid in created:
        if jid not in ids:
            problems.append(f"job {jid} missing from ListMigrations")
        if jid not in in_etcd:
            problems.append(f"job {jid} missing from etcd")
    detail.append(f"{len(created)} created job(s) all in ListMigrations and etcd" if not problems else "")
    job = next((m for m in listed.migrations if m.id == job_id), None)
    if job is not None:
        pendings = [p for p in job.phases if p.phase == migration_pb2.PENDING]
        if len(pendings) != 1:
            problems.append(f"job {job_id} restarted from PENDING ({len(pendings)} PENDING entries)")
        if leader_changed:
            if job.epoch > epoch_at_fault:
                detail.append(f"taken over by the new leader: epoch {epoch_at_fault} -> {job.epoch}")
            else:
                problems.append(f"the leader changed but the job's epoch stayed {job.epoch} (was {epoch_at_fault} "
                                "at the fault): no new leader continued it")
    return InvariantResult(4, not problems, problems + [d for d in detail if d])


# ---- invariant 5 -------------------------------------------------------------------------------

# Text log lines start with logging's asctime; the message comes from orchestrator.main.
_STAMP = r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+) .*?"
LEADS = re.compile(_STAMP + r"(\S+) leads with epoch (\d+)")
LOST = re.compile(_STAMP + r"(\S+) lost the leader lease")


def _log_time(stamp: str) -> float:
    return datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()


def leadership_terms(logs: dict[str, Path]) -> list[tuple[str, int, float, float | None]]:
    """(orchestrator, epoch, from, until) per leadership term, from the orchestrator logs."""
    terms: list[tuple[str, int, float, float | None]] = []
    for path in logs.values():
        try:
            lines = path.read_text(errors="replace").splitlines()
        except OSError:
            continue
        for line in lines:
            if m := LEADS.match(line):
                terms.append((m.group(2), int(m.group(3)), _log_time(m.group(1)), None))
            elif (m := LOST.match(line)) and terms and terms[-1][0] == m.group(2):
                who, epoch, start, _ = terms[-1]
                terms[-1] = (who, epoch, start, _log_time(m.group(1)))
    return terms


def history_problems(steps: list[tuple[int, int, tuple[str, ...]]], owners: dict[int, set[str]]) -> list[str]:
    """`steps`: (mod revision, epoch, the phases the record went through, its current one last)
    of every version of a job record, oldest first; `owners`: which orchestrators announced each
    epoch. One driver at a time means: the epoch never goes back, every phase change is one the
    state machine allows (a version may enter several phases in one write: the destination's
    commit enters COMMIT and RESUMING), and each epoch in the record was announced by exactly one
    orchestrator."""
    problems = []
    for (_, epoch_a, phases_a), (rev_b, epoch_b, phases_b) in itertools.pairwise(steps):
        if epoch_b < epoch_a:
            problems.append(f"epoch went back {epoch_a} -> {epoch_b} at revision {rev_b}")
        entered = phases_b[len(phases_a):] if phases_b[:len(phases_a)] == phases_a else phases_b[-1:]
        for phase_a, phase_b in itertools.pairwise((phases_a[-1], *entered)):
            if Phase(phase_b) not in ALLOWED[Phase(phase_a)]:
                problems.append(f"illegal phase change {phase_a} -> {phase_b} at revision {rev_b} (epochs "
                                f"{epoch_a}, {epoch_b})")
    for epoch in sorted({e for _, e, _ in steps if e}):
        claimants = owners.get(epoch, set())
        if len(claimants) > 1:
            problems.append(f"epoch {epoch} claimed by {sorted(claimants)}")
        elif not claimants:
            problems.append(f"epoch {epoch} in the job record was announced by no orchestrator's log")
    return problems


def runner_segments(logs: dict[str, Path], job_id: str) -> list[tuple[str, int]]:
    """Which orchestrator's runner logged the job's phase changes, in time order, as (name,
    count) runs: `[("orch-2", 3), ("orch-1", 5)]` is one hand-over."""
    changes = re.compile(_STAMP + re.escape(f"job {job_id}: ") + r"\S+ -> \S+ after")
    stamped: list[tuple[float, str]] = []
    for name, path in logs.items():
        with contextlib.suppress(OSError):
            for line in path.read_text(errors="replace").splitlines():
                if m := changes.match(line):
                    stamped.append((_log_time(m.group(1)), name))
    segments: list[tuple[str, int]] = []
    for _, name in sorted(stamped):
        if segments and segments[-1][0] == name:
            segments[-1] = (name, segments[-1][1] + 1)
        else:
            segments.append((name, 1))
    return segments


def check_one_driver(bed: MultiHostCluster, job_id: str) -> InvariantResult:
    """Invariant 5: the job record's epoch never goes back across every version etcd holds, every
    phase change in that history is one the state machine allows (two drivers interleaving would
    break one or the other), and each epoch belongs to exactly one orchestrator."""
    detail: list[str] = []
    history = bed.etcd_history(f"/nvmigrate/jobs/{job_id}")
    steps = []
    for kv in history:
        record = json.loads(str(kv["value"]))
        phases = tuple(str(p["phase"]) for p in record.get("phases", ())) or (str(record["phase"]),)
        steps.append((int(kv["mod_revision"]), int(record.get("epoch", 0)), phases))  # type: ignore[call-overload]
    terms = leadership_terms(bed.orchestrator_logs())
    owners: dict[int, set[str]] = {}
    for who, epoch, _, _ in terms:
        owners.setdefault(epoch, set()).add(who)
    problems = history_problems(steps, owners)
    epochs = sorted({e for _, e, _ in steps if e})
    by_whom = ", ".join(f"{e}={'/'.join(sorted(owners.get(e, set()))) or '?'}" for e in epochs)
    detail.append(f"{len(steps)} versions of the job in etcd; epochs {epochs} ({by_whom}), checked never to go "
                  "back, every phase change legal")
    segments = runner_segments(bed.orchestrator_logs(), job_id)
    detail.append("phase changes logged by " + (", then ".join(f"{n} x{c}" for n, c in segments) or "no runner"))
    # Two leaders at once is not itself a violation (the fencing epoch protects the jobs) but
    # the lead will want to know when it happened.
    for a in terms:
        for b in terms:
            if a[0] < b[0] and a[2] < (b[3] or float("inf")) and b[2] < (a[3] or float("inf")) \
                    and a[0] not in bed.killed_orchestrators and b[0] not in bed.killed_orchestrators:
                detail.append(f"note: {a[0]} (epoch {a[1]}) and {b[0]} (epoch {b[1]}) both believed they led "
                              "for a while")
    leader = bed.leader()
    live = set(bed.orchestrator_addresses())
    if leader is not None and leader not in live:
        with contextlib.suppress(Exception):
            leader = bed.wait_leader(timeout_s=3 * bed.config.lease_ttl_s + 5, other_than=leader)
    if leader is None or leader not in live:
        problems.append(f"leader key names {leader!r}, not a live orchestrator ({sorted(live)})")
    else:
        detail.append(f"one leader key: {leader}")
    return InvariantResult(5, not problems, problems + detail)


def print_results(results: list[InvariantResult], title: str) -> None:
    print(f"invariants {title}:", flush=True)
    for result in results:
        print(result.line(), flush=True)
