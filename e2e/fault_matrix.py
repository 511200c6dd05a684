"""The fault x phase matrix: one live migration per cell, one fault injected when the job reaches
the cell's phase, then the five invariants of DESIGN.md checked.

Faults (rows): kill the source agent, kill the destination agent, SIGSTOP the destination (a
hang), partition the destination (its link cut; SIGSTOP in loopback mode), kill the
orchestrator that leads, restart etcd, and:

- overload-source: the source stays alive but starved: 2 x cores busy-loop processes beside it
  from the fault on, and (made at set-up, for this row only) `Workload.busy_guests` more
  controllers of a few MiB on the source, each with a guest writing 100 times a second.
- disk-full-destination, disk-full-source: every agent's --data-dir is a small tmpfs of its own
  (this row only); at the fault the node's tmpfs is filled with a filler file until ENOSPC.
  Before COMMIT a destination out of space should be replaced by another; after it no write
  may be lost. The node is alive: never FAILED.
- freeze-source, freeze-destination, freeze-leader, freeze-etcd: SIGSTOP the process for its
  lease TTL + 3 s, then SIGCONT (a timer of the bed). A process that comes back must not leave
  the controller LOST or the job FAILED.
- clock-forward, clock-back: the orchestrators' wall clock steps +120 s / -120 s (libfaketime,
  this row only; CLOCK_MONOTONIC unchanged). Deadlines use the monotonic clock, so the job must
  not end by "job deadline passed".
- garbage-ports: for a few seconds every TCP port the orchestrators and agents listen on gets
  random bytes, HTTP/2 junk frames and gRPC calls with an undecodable body. The job should
  complete, and each process may log at most a few lines about it, with no traceback.

Phases (columns): PREPARING/PRECOPY (injected once
precopy data flows), DIRTY_ITERATION, STOP_AND_COPY, COMMIT/RESUMING. The trigger is an etcd
watch on the job record, so the fault lands within milliseconds of the phase being written,
before its actions have run (short phases such as STOP_AND_COPY are hit reliably).

Each cell gets a fresh cluster (etcd, 2 orchestrators, 4 agents on their own namespaces) and a
fresh controller with a prefilled namespace and a running guest workload; the migration has a
bandwidth limit so each phase lasts long enough. A hang or partition lasts until the job ends
(or its deadline passes): the product has to cope with it, not wait it out. Afterwards the
fault is healed, killed agents are restarted (a recovery step), and the invariants are checked
again against the recovered cluster.

    python -m e2e.fault_matrix            # the quick subset (the same cells CI runs)
    python -m e2e.fault_matrix --full     # every cell
    python -m e2e.fault_matrix --cells kill-destination@STOP_AND_COPY,etcd-restart@COMMIT
    python -m e2e.fault_matrix --cells freeze-etcd,garbage-ports    # whole rows
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import re
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import grpc

from e2e.garbage import burst_log_problems
from e2e.invariants import (
    InvariantResult,
    Observer,
    check_no_job_lost,
    check_one_driver,
    check_one_node,
    check_terminal,
    check_writes,
    owner_record,
    print_results,
)
from e2e.multihost import ETCD, FaultRecord, MultiHostCluster, MultiHostConfig
from orchctl.localcluster import ClusterError, wait_for
from proto.v1 import agent_pb2, migration_pb2

MiB = 1 << 20
TERMINAL = frozenset({"COMPLETED", "ROLLED_BACK", "FAILED", "CANCELLED"})
SOURCE = "n1"
CONTROLLER = "c1"


@dataclass(frozen=True)
class Workload:
    """What each cell migrates: sizes chosen so precopy takes a few seconds at the bandwidth cap
    and the guest dirties enough for several rounds, on 2 cores."""

    namespace_bytes: int = 16 * MiB
    write_iops: int = 300
    bandwidth_bytes_per_s: int = 4 * MiB
    # overload-source only: more controllers with busy guests on the source, made at set-up
    busy_guests: int = 20
    busy_guest_bytes: int = 4 * MiB
    busy_guest_write_iops: int = 100


# ---- the rows: faults ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Fault:
    key: str
    title: str
    inject: Callable[[MultiHostCluster, dict[str, Any]], FaultRecord]
    data_tmpfs_mib: int = 0  # > 0: every agent's data dir a tmpfs of this size (this row only)
    orchestrator_faketime: bool = False  # orchestrators under libfaketime (this row only)
    busy_guests: bool = False  # Workload.busy_guests more busy controllers on the source at set-up
    # extra expectations, checked once the job ended and the fault is healed: problems found
    check: Callable[[MultiHostCluster, CellResult], list[str]] | None = None
    # for a fault too slow to land inside a short phase (STOP_AND_COPY, COMMIT lasts milliseconds):
    # most of its work done when the job enters DIRTY_ITERATION; returns a note for the report
    stage: Callable[[MultiHostCluster, dict[str, Any]], str] | None = None


# A data dir holds the 16 MiB namespace (source) or its copy (destination), the controller
# metadata and the state file: 48 MiB leaves room for all that, and a filler takes the rest.
DISK_TMPFS_MIB = 48
# Once precopy is over, the destination's namespace copy is written whole and dirty rounds only
# overwrite it: a ballast can take all but this much of its disk without changing what happens
# before the fault; the fault fills the rest in a millisecond.
DISK_BALLAST_LEAVES_MIB = 4
SHORT_PHASES = ("STOP_AND_COPY", "COMMIT")
FREEZE_BEYOND_TTL_S = 3.0
CLOCK_STEP_S = 120.0
GARBAGE_BURST_S = 3.0
GARBAGE_MAX_LOG_LINES = 20  # per process, during the burst
GARBAGE_EVIDENCE_LINES = 8  # of an offending process's burst lines, the first ones go in the report


def _etcd_restart(bed: MultiHostCluster, job: dict[str, Any]) -> FaultRecord:
    """etcd goes down until every orchestrator and agent has noticed (a failed lease refresh or
    etcd call in its log, or 15 s), then comes back on the same port and data dir."""
    logs = [p.log_path for p in bed.live_orchestrators()] + \
        [bed.agent_proc(n).log_path for n in bed.agent_names if n not in bed.killed_agents]
    sizes = {path: path.stat().st_size for path in logs}
    fault = bed.stop_etcd()

    def everyone_noticed() -> bool:
        for path in logs:
            with open(path, "rb") as f:
                f.seek(sizes[path])
                text = f.read().decode(errors="replace")
            if "refresh failed" not in text and "etcd unavailable" not in text and "etcd is unavailable" not in text:
                return False
        return True

    try:
        wait_for("every process to notice etcd is down", everyone_noticed, 15.0, interval_s=0.1)
        fault.note = "etcd down until every orchestrator and agent logged a failed etcd call"
    except ClusterError:
        fault.note = "etcd down 15 s (not every process logged a failed etcd call)"
    bed.start_etcd_again()
    return fault


def _overload_source(bed: MultiHostCluster, job: dict[str, Any]) -> FaultRecord:
    cores = os.cpu_count() or 1
    return bed.overload(job["source_node"], 2 * cores, note=f"{2 * cores} busy-loop processes (2 x {cores} cores) "
                                                              "until healed")


def _freeze(who: Callable[[MultiHostCluster, dict[str, Any]], str]) -> Callable[[MultiHostCluster, dict[str, Any]],
                                                                                 FaultRecord]:
    """SIGSTOP for longer than the lease TTL, then SIGCONT: the process has lost its lease (and
    the others may have acted on that) by the time it runs again."""
    def inject(bed: MultiHostCluster, job: dict[str, Any]) -> FaultRecord:
        ttl = bed.config.lease_ttl_s
        frozen_s = ttl + FREEZE_BEYOND_TTL_S
        note = f"SIGSTOP for {frozen_s:g} s (lease TTL {ttl} s + {FREEZE_BEYOND_TTL_S:g} s), then SIGCONT"
        return bed.freeze(who(bed, job), frozen_s, note=note)
    return inject


def _garbage_ports(bed: MultiHostCluster, job: dict[str, Any]) -> FaultRecord:
    """The burst, then what each process logged meanwhile: a bounded few lines, no traceback."""
    logs = {**{p.name: p.log_path for p in bed.live_orchestrators()},
            **{n: p for n, p in bed.agent_logs().items() if n not in bed.killed_agents}}
    sizes = {name: path.stat().st_size for name, path in logs.items()}
    fault, tallies = bed.throw_garbage(GARBAGE_BURST_S)
    new_lines: dict[str, list[str]] = {}
    for name, path in logs.items():
        with open(path, "rb") as f:
            f.seek(sizes[name])
            new_lines[name] = f.read().decode(errors="replace").splitlines()
    fault.problems += burst_log_problems(new_lines, GARBAGE_MAX_LOG_LINES)
    sent = sum(t.connections for t in tallies.values())
    codes: dict[str, int] = {}
    for tally in tallies.values():
        for code, n in tally.grpc_codes.items():
            codes[code] = codes.get(code, 0) + n
    fault.note += (f"; {sent} connections, gRPC answers {dict(sorted(codes.items()))}; lines logged meanwhile: "
                   + ", ".join(f"{n} {len(lines)}" for n, lines in sorted(new_lines.items())))
    for name, lines in sorted(new_lines.items()):
        if any(problem.startswith(f"{name} ") for problem in fault.problems):
            fault.evidence += [f"{name} (during the burst): {ln[:300]}" for ln in lines[:GARBAGE_EVIDENCE_LINES]]
    return fault


def _fill_disk(role: str) -> Callable[[MultiHostCluster, dict[str, Any]], FaultRecord]:
    """Fills the disk of the job's `role` ("source_node" or "destination_node"); says where the
    job stood once the disk was full (a fast phase may be over by then)."""
    def inject(bed: MultiHostCluster, job: dict[str, Any]) -> FaultRecord:
        fault = bed.fill_disk(str(job[role]))
        with contextlib.suppress(OSError, ValueError, KeyError, IndexError):
            now = json.loads(str(bed.etcd_range(f"/nvmigrate/jobs/{job['id']}", timeout_s=2.0)[0]["value"]))
            fault.note += f"; the job was in {now['phase']} once the disk was full"
        return fault
    return inject


def _ballast(role: str) -> Callable[[MultiHostCluster, dict[str, Any]], str]:
    def stage(bed: MultiHostCluster, job: dict[str, Any]) -> str:
        taken = bed.ballast_disk(str(job[role]), DISK_BALLAST_LEAVES_MIB * MiB)
        return (f"{taken >> 20} MiB ballast on {job[role]} in DIRTY_ITERATION, leaving "
                f"{DISK_BALLAST_LEAVES_MIB} MiB for the fault to fill")
    return stage


def _not_lost(bed: MultiHostCluster, cell: CellResult) -> list[str]:
    """The faulty node lived (or came back): the controller must not be written off."""
    state = str(owner_record(bed, CONTROLLER).get("state", ""))
    if state.upper() == "LOST":
        return [f"controller {CONTROLLER} is marked LOST in etcd although no node died"]
    return []


def _not_by_wall_clock(bed: MultiHostCluster, cell: CellResult) -> list[str]:
    problems = _not_lost(bed, cell)
    if cell.by_job_deadline:
        problems.append(f"ended by the job deadline after a {CLOCK_STEP_S:g} s wall-clock step ({cell.reason}): "
                        "a deadline must follow the monotonic clock")
    return problems


FAULTS: dict[str, Fault] = {f.key: f for f in (
    Fault("kill-source", "kill source agent", lambda bed, job: bed.kill_agent(job["source_node"])),
    Fault("kill-destination", "kill destination agent", lambda bed, job: bed.kill_agent(job["destination_node"])),
    Fault("sigstop-destination", "SIGSTOP destination", lambda bed, job: bed.hang_agent(job["destination_node"])),
    Fault("partition-destination", "partition destination",
          lambda bed, job: bed.partition_agent(job["destination_node"])),
    Fault("kill-leader", "kill orchestrator leader", lambda bed, job: bed.kill_leader()),
    Fault("etcd-restart", "etcd restart", _etcd_restart),
    Fault("overload-source", "overload source", _overload_source, busy_guests=True, check=_not_lost),
    Fault("disk-full-destination", "disk full destination", _fill_disk("destination_node"),
          data_tmpfs_mib=DISK_TMPFS_MIB, check=_not_lost, stage=_ballast("destination_node")),
    Fault("disk-full-source", "disk full source", _fill_disk("source_node"), data_tmpfs_mib=DISK_TMPFS_MIB,
          check=_not_lost, stage=_ballast("source_node")),
    Fault("freeze-source", "freeze source (TTL+3 s)", _freeze(lambda bed, job: str(job["source_node"])),
          check=_not_lost),
    Fault("freeze-destination", "freeze destination (TTL+3 s)",
          _freeze(lambda bed, job: str(job["destination_node"])), check=_not_lost),
    Fault("freeze-leader", "freeze leader (TTL+3 s)", _freeze(lambda bed, job: bed.leader_proc().name),
          check=_not_lost),
    Fault("freeze-etcd", "freeze etcd (TTL+3 s)", _freeze(lambda bed, job: ETCD), check=_not_lost),
    Fault("clock-forward", "orchestrator clock +120 s", lambda bed, job: bed.step_orchestrator_clocks(CLOCK_STEP_S),
          orchestrator_faketime=True, check=_not_by_wall_clock),
    Fault("clock-back", "orchestrator clock -120 s", lambda bed, job: bed.step_orchestrator_clocks(-CLOCK_STEP_S),
          orchestrator_faketime=True, check=_not_by_wall_clock),
    Fault("garbage-ports", "garbage at every port", _garbage_ports, check=_not_lost),
)}


# ---- the columns: phases ------------------------------------------------------------------------


@dataclass(frozen=True)
class PhaseColumn:
    key: str
    title: str
    reached: Callable[[dict[str, Any]], bool]
    # once the record shows the phase, waits for what the record does not show (None: nothing)
    then: Callable[[MultiHostCluster, dict[str, Any]], None] | None = None


def _precopy_data_flowing(bed: MultiHostCluster, job: dict[str, Any]) -> None:
    """The runner writes a job's progress to etcd every few seconds only (a precopy may be over
    before the first), so the source is asked whether precopy data flows."""
    ref = agent_pb2.MigrationRef(job_id=str(job["id"]), controller_id=str(job["controller_id"]))

    def flowing() -> bool:
        try:  # the source's session begins with StartPrecopy, right after the phase is written
            return bed.agent(str(job["source_node"]), lambda s: s.GetSession(ref, timeout=2.0)).bytes_sent > 0
        except grpc.RpcError:
            return False
    wait_for(f"precopy data of job {job['id']} to flow", flowing, 30, interval_s=0.02)


PHASES: dict[str, PhaseColumn] = {p.key: p for p in (
    # mid-transfer: precopy bytes have flowed (as the source counts them)
    PhaseColumn("PRECOPY", "PREPARING/PRECOPY", lambda j: j["phase"] == "PRECOPY", then=_precopy_data_flowing),
    PhaseColumn("DIRTY_ITERATION", "DIRTY_ITERATION", lambda j: j["phase"] == "DIRTY_ITERATION"),
    PhaseColumn("STOP_AND_COPY", "STOP_AND_COPY", lambda j: j["phase"] == "STOP_AND_COPY"),
    PhaseColumn("COMMIT", "COMMIT/RESUMING", lambda j: j["phase"] in ("COMMIT", "RESUMING")),
)}

# What DESIGN.md's failure column says each cell should end as.
_ANY_SUCCESS = frozenset({"COMPLETED", "ROLLED_BACK"})
EXPECTED: dict[tuple[str, str], frozenset[str]] = {}
for _phase in PHASES:
    _before_stop = _phase in ("PRECOPY", "DIRTY_ITERATION")
    EXPECTED[("kill-source", _phase)] = frozenset({"COMPLETED"} if _phase == "COMMIT" else {"FAILED"})
    # After COMMIT a destination lost before it claimed the controller sends it back to the
    # source (ROLLED_BACK); one lost after its claim has switched over (COMPLETED, its silence in
    # the reason); FAILED stays possible only when the source does not take a moved-back
    # controller again.
    _after_commit = frozenset({"ROLLED_BACK", "FAILED", "COMPLETED"})
    for _dest_fault in ("kill-destination", "sigstop-destination", "partition-destination"):
        EXPECTED[(_dest_fault, _phase)] = (
            _ANY_SUCCESS if _before_stop
            else frozenset({"ROLLED_BACK"}) if _phase == "STOP_AND_COPY" else _after_commit)
    EXPECTED[("kill-leader", _phase)] = _ANY_SUCCESS
    EXPECTED[("etcd-restart", _phase)] = _ANY_SUCCESS
    # Every node stays alive (or comes back) in these: never FAILED.
    for _alive_fault in ("overload-source", "disk-full-destination", "disk-full-source", "freeze-source",
                         "freeze-destination", "freeze-leader", "freeze-etcd", "clock-forward", "clock-back"):
        EXPECTED[(_alive_fault, _phase)] = _ANY_SUCCESS
    # Garbage is no reason to give up a migration.
    EXPECTED[("garbage-ports", _phase)] = frozenset({"COMPLETED"})

# The cells CI runs: ones the product is expected to handle (see the lead's fault-handling work),
# and one per newer fault class, at the phase where it tells the most.
QUICK: list[tuple[str, str]] = [
    ("kill-destination", "PRECOPY"),
    ("kill-leader", "PRECOPY"),
    ("kill-source", "PRECOPY"),
    ("etcd-restart", "DIRTY_ITERATION"),
    # starved while the dirty rounds must converge
    ("overload-source", "DIRTY_ITERATION"),
    # the destination holds the only running copy soon: out of space there must lose no write
    ("disk-full-destination", "COMMIT"),
    # the source must still save its state (and the guest keep its writes) with no space left
    ("disk-full-source", "STOP_AND_COPY"),
    # the source's lease runs out while it still runs the guest and streams data
    ("freeze-source", "PRECOPY"),
    # a deadline computed from the wall clock would have passed at once
    ("clock-forward", "DIRTY_ITERATION"),
    # data and control planes both busy when the junk arrives
    ("garbage-ports", "DIRTY_ITERATION"),
]


@dataclass
class CellResult:
    fault: str
    phase: str
    mode: str = ""
    job_id: str = ""
    injected_in: str = ""
    target: str = ""
    end_phase: str = "?"
    reason: str = ""
    after_fault_s: float = 0.0
    duration_s: float = 0.0
    invariants: list[InvariantResult] = field(default_factory=list)
    expected: list[str] = field(default_factory=list)
    expectation_problems: list[str] = field(default_factory=list)
    error: str = ""
    log_excerpt: list[str] = field(default_factory=list)
    fault_note: str = ""
    guest_max_gap_ms: float = 0.0  # longest gap between the guest's I/O completions, where it runs at the end
    takeover_s: float = 0.0  # kill-leader: from the kill to a standby holding the leader key
    lease_ttl_s: float = 0.0

    @property
    def failed_invariants(self) -> list[str]:
        return [r.label for r in self.invariants if r.held is False]

    @property
    def invariants_held(self) -> bool:
        return not self.error and len(self.invariants) == 5 and not self.failed_invariants

    @property
    def as_expected(self) -> bool:
        return self.end_phase in self.expected and not self.expectation_problems

    @property
    def ok(self) -> bool:
        return self.invariants_held and self.as_expected

    @property
    def by_job_deadline(self) -> bool:
        """Ended by the orchestrator's job deadline: the fault itself went unnoticed."""
        return "deadline" in self.reason

    def short(self) -> str:
        if self.error:
            return "ERROR (harness)"
        verdict = "ok" if self.invariants_held else "FAIL " + ",".join(self.failed_invariants)
        return (f"{verdict} {self.end_phase}" + (" [deadline]" if self.by_job_deadline else "")
                + ("" if self.as_expected else " (unexpected)"))


def _create_call(request: agent_pb2.CreateControllerRequest) -> Callable[[Any], Any]:
    return lambda stub: stub.CreateController(request, timeout=60)


def _create_busy_guests(bed: MultiHostCluster, workload: Workload) -> None:
    """More controllers on the source, each with a guest writing: the source agent's event loop
    and disk serve them all while it migrates c1."""
    for i in range(workload.busy_guests):
        request = agent_pb2.CreateControllerRequest(
            controller_id=f"busy-{i + 1}", namespace_bytes=workload.busy_guest_bytes, prefill=False,
            workload=agent_pb2.WorkloadSpec(write_iops=workload.busy_guest_write_iops, seed=100 + i))
        bed.agent(SOURCE, _create_call(request))


def _merge_one_node(first: InvariantResult, second: InvariantResult) -> InvariantResult:
    held = first.held is not False and second.held is not False
    return InvariantResult(1, held, first.detail + second.detail)


def _log_excerpt(bed: MultiHostCluster, job_id: str, lines: int = 12) -> list[str]:
    """Orchestrator lines about the job and every warning or error, and agents' errors."""
    out: list[str] = []
    for name, path in {**bed.orchestrator_logs(), **bed.agent_logs()}.items():
        with contextlib.suppress(OSError):
            text = path.read_text(errors="replace").splitlines()
            keep = [ln for ln in text if job_id in ln or " WARNING " in ln or " ERROR " in ln or "Traceback" in ln]
            out += [f"{name}: {ln[:300]}" for ln in keep[-lines:]]
    return out


def _job_dict(raw: str) -> dict[str, Any]:
    return dict(json.loads(raw))


class Trigger(threading.Thread):
    """Reads the etcd watch of the job records; injects the fault the moment the job's record
    shows the cell's phase (in this thread: waiting for the main thread would lose the phase)."""

    def __init__(self, bed: MultiHostCluster, fault: Fault, column: PhaseColumn) -> None:
        super().__init__(name="fault-trigger", daemon=True)
        self.bed, self.fault, self.column = bed, fault, column
        self.job_id = ""
        # From the revision before the job exists: etcdctl may take a moment to start watching, and a
        # phase is written once (its progress every few seconds only), so a late watch would miss it.
        self.watch = bed.watch_prefix("/nvmigrate/jobs/", since_revision=bed.etcd_revision() + 1)
        self.fired = threading.Event()
        self.record: FaultRecord | None = None
        self.job_at_fault: dict[str, Any] = {}
        self.error = ""
        self.stage_note = ""
        self._staged = fault.stage is None or column.key not in SHORT_PHASES
        self._pending: list[dict[str, Any]] = []

    def run(self) -> None:
        assert self.watch.stdout is not None
        try:
            for line in self.watch.stdout:
                if self.fired.is_set():
                    break
                with contextlib.suppress(ValueError, KeyError):
                    for event in json.loads(line).get("Events") or []:
                        job = _job_dict(base64.b64decode(event["kv"]["value"]).decode())
                        self._pending.append(job)
                while self.job_id and self._pending:
                    job = self._pending.pop(0)
                    if job.get("id") != self.job_id:
                        continue
                    if not self._staged and job["phase"] == "DIRTY_ITERATION":
                        self._staged = True
                        assert self.fault.stage is not None
                        try:
                            self.stage_note = self.fault.stage(self.bed, job)
                        except Exception as exc:
                            self.error = f"preparing {self.fault.title} failed: {exc}"
                            self.fired.set()
                            break
                    if self.column.reached(job):
                        self.job_at_fault = job
                        try:
                            if self.column.then is not None:
                                self.column.then(self.bed, job)
                            self.record = self.fault.inject(self.bed, job)
                        except Exception as exc:
                            self.error = f"injecting {self.fault.title} failed: {exc}"
                        self.fired.set()
                        break
                    if job["phase"] in TERMINAL:
                        self.error = (f"the job ended {job['phase']} ({job.get('reason', '')}) before reaching "
                                      f"{self.column.title}")
                        self.fired.set()
                        break
        finally:
            self.close()

    def close(self) -> None:
        if self.watch.poll() is None:
            self.watch.kill()
            self.watch.wait(timeout=10)


def run_cell(fault_key: str, phase_key: str, *, config: MultiHostConfig | None = None,
             workload: Workload | None = None, deadline_s: float = 90.0, settle_s: float = 20.0,
             keep_logs: bool = False) -> CellResult:
    fault, column = FAULTS[fault_key], PHASES[phase_key]
    config = config or MultiHostConfig()
    if fault.data_tmpfs_mib:
        config = replace(config, data_tmpfs_bytes=fault.data_tmpfs_mib * MiB)
    if fault.orchestrator_faketime:
        config = replace(config, orchestrator_faketime=True)
    workload = workload or Workload()
    cell = CellResult(fault_key, phase_key, expected=sorted(EXPECTED[(fault_key, phase_key)]))
    started = time.monotonic()
    print(f"\n=== cell: {fault.title} @ {column.title} ===", flush=True)
    bed = MultiHostCluster(config=config, keep_workdir=keep_logs)
    observer: Observer | None = None
    trigger: Trigger | None = None
    step = "starting the cluster"
    try:
        bed.start()
        cell.mode = bed.mode
        step = f"creating controller {CONTROLLER} on {SOURCE} (prefilled, guest writing)"
        bed.agent(SOURCE, lambda s: s.CreateController(agent_pb2.CreateControllerRequest(
            controller_id=CONTROLLER, namespace_bytes=workload.namespace_bytes, prefill=True,
            workload=agent_pb2.WorkloadSpec(write_iops=workload.write_iops, seed=7)), timeout=120))
        request = agent_pb2.GetControllerRequest(controller_id=CONTROLLER)
        wait_for("guest writes on the source", lambda: bed.agent(
            SOURCE, lambda s: s.GetController(request, timeout=5)).workload.acked_writes > 50, 60)
        busy = workload.busy_guests if fault.busy_guests else 0
        if busy:
            step = f"creating {busy} busy guests on {SOURCE}"
            _create_busy_guests(bed, workload)
        observer = Observer(bed, CONTROLLER)
        observer.start()
        trigger = Trigger(bed, fault, column)
        trigger.start()
        step = "creating the migration"
        job = bed.api(lambda s: s.CreateMigration(migration_pb2.CreateMigrationRequest(
            controller_id=CONTROLLER, policy=migration_pb2.ConvergencePolicy(
                bandwidth_bytes_per_s=workload.bandwidth_bytes_per_s)), timeout=10))
        cell.job_id = trigger.job_id = observer.job_id = job.id
        created = [job.id]
        leader_before = bed.leader()
        step = f"waiting for the job to reach {column.title} and injecting the fault"
        if not trigger.fired.wait(timeout=180):
            raise ClusterError(f"the job did not reach {column.title} within 180 s")
        if trigger.error:
            raise ClusterError(trigger.error)
        assert trigger.record is not None
        cell.injected_in = str(trigger.job_at_fault["phase"])
        cell.target = trigger.record.target
        notes = [trigger.record.note, trigger.stage_note]
        if busy:
            notes.append(f"{busy} busy guests ({workload.busy_guest_bytes >> 20} MiB, "
                         f"{workload.busy_guest_write_iops} writes/s) on {SOURCE} since set-up")
        cell.fault_note = "; ".join(n for n in notes if n)
        epoch_at_fault = int(trigger.job_at_fault.get("epoch", 0))
        fault_at = trigger.record.at_monotonic
        print(f"fault {trigger.record.kind} {trigger.record.target} injected with the job in {cell.injected_in} "
              f"(epoch {epoch_at_fault}, destination {trigger.job_at_fault.get('destination_node') or '-'})"
              + (f"; {trigger.record.note}" if trigger.record.note else ""), flush=True)

        if fault_key == "kill-leader":
            # A measure, not a test: DESIGN asks for a takeover within the lease TTL plus a second.
            bed.wait_leader(timeout_s=60, other_than=leader_before or "")
            cell.takeover_s, cell.lease_ttl_s = time.monotonic() - fault_at, config.lease_ttl_s
            print(f"standby took the lead {cell.takeover_s:.2f} s after the kill (lease TTL {config.lease_ttl_s} s)",
                  flush=True)

        # Invariant 3: terminal within the deadline, the fault still in place
        step = "waiting for the job to end, then healing and checking the invariants"
        last_seen = ["?"]

        def terminal() -> migration_pb2.Migration | None:
            with contextlib.suppress(grpc.RpcError, ClusterError):
                got = bed.job(job.id)
                last_seen[0] = f"{migration_pb2.Phase.Name(got.phase)} ({got.reason or 'no reason'})"
                return got if migration_pb2.Phase.Name(got.phase) in TERMINAL else None
            return None
        ended: migration_pb2.Migration | None = None
        with contextlib.suppress(ClusterError):
            ended = wait_for(f"job {job.id} to end", terminal, max(0.0, deadline_s - (time.monotonic() - fault_at)),
                             interval_s=0.1)
        cell.after_fault_s = time.monotonic() - fault_at
        i3 = check_terminal(ended, cell.after_fault_s, deadline_s, last_seen[0])
        healed = bed.heal()
        if ended is None:
            # the product did not finish under the fault; give it the deadline again healed, so
            # the other invariants are judged on an ended job where possible
            with contextlib.suppress(ClusterError):
                ended = wait_for(f"job {job.id} to end after healing", terminal, deadline_s, interval_s=0.1)
        if ended is not None:
            cell.end_phase, cell.reason = migration_pb2.Phase.Name(ended.phase), ended.reason
        else:
            cell.end_phase = last_seen[0].split(" ")[0]
        died = set(bed.killed_agents)
        i1 = check_one_node(bed, observer, CONTROLLER, died, settle_s,
                            "after the job ended" + (f" and {', '.join(healed)}" if healed else ""))
        if bed.restart_killed_agents():
            i1 = _merge_one_node(i1, check_one_node(bed, observer, CONTROLLER, died, settle_s,
                                                    "after restarting killed agents"))
        i2 = check_writes(bed, CONTROLLER, observer.receipts())
        gaps = re.findall(r"longest guest I/O gap (\d+) ms", " ".join(i2.detail))
        cell.guest_max_gap_ms = max((float(g) for g in gaps), default=0.0)
        leader_after = bed.leader()
        i4 = check_no_job_lost(bed, created, job.id, epoch_at_fault,
                               leader_changed=fault_key == "kill-leader" or leader_after != leader_before)
        i5 = check_one_driver(bed, job.id)
        cell.invariants = [i1, i2, i3, i4, i5]
        print_results(cell.invariants, f"after {fault.title} @ {column.title}")
        if fault_key == "kill-source" and cell.end_phase == "FAILED":
            state = str(owner_record(bed, CONTROLLER).get("state", ""))
            if state.upper() != "LOST":
                cell.expectation_problems.append(f"source lost but controller {CONTROLLER} is not marked lost in "
                                                 f"etcd (state {state!r})")
        if cell.end_phase not in cell.expected:
            cell.expectation_problems.append(f"ended {cell.end_phase}, expected {' or '.join(cell.expected)}")
        cell.expectation_problems += trigger.record.problems
        if fault.check is not None:
            cell.expectation_problems += fault.check(bed, cell)
    except (ClusterError, grpc.RpcError, OSError, AssertionError) as exc:
        details = exc.details() if isinstance(exc, grpc.RpcError) else str(exc)  # type: ignore[attr-defined]
        cell.error = f"while {step}: {type(exc).__name__}: {details}"
        print(f"cell error: {cell.error}", flush=True)
    finally:
        try:
            if trigger is not None:
                trigger.close()
            if observer is not None:
                observer.stop()
            if cell.job_id and not cell.ok and bed.cluster is not None:
                evidence = trigger.record.evidence if trigger is not None and trigger.record is not None else []
                cell.log_excerpt = evidence + _log_excerpt(bed, cell.job_id)
        finally:
            bed.close()  # whatever failed above, no process or namespace outlives the cell
        cell.duration_s = time.monotonic() - started
    if keep_logs:
        print(f"logs kept in {bed.workdir}", flush=True)
    print(f"=== {fault.title} @ {column.title}: {cell.short()} in {cell.duration_s:.0f} s ===", flush=True)
    return cell


# ---- the report ---------------------------------------------------------------------------------


def render_table(cells: list[CellResult]) -> str:
    by = {(c.fault, c.phase): c for c in cells}
    faults = [f for f in FAULTS if any(c.fault == f for c in cells)]
    phases = [p for p in PHASES if any(c.phase == p for c in cells)]
    first = max(len(FAULTS[f].title) for f in faults)
    def text(c: CellResult) -> str:
        return f"{c.short()} {c.duration_s:.0f}s"
    width = max(26, *(len(text(by[(f, p)])) + 1 for f in faults for p in phases if (f, p) in by))
    lines = [" " * first + " | " + " | ".join(PHASES[p].title.ljust(width) for p in phases)]
    lines.append("-" * len(lines[0]))
    for f in faults:
        row = [text(by[(f, p)]) if (f, p) in by else "-" for p in phases]
        lines.append(FAULTS[f].title.ljust(first) + " | " + " | ".join(r.ljust(width) for r in row))
    return "\n".join(lines)


def render_details(cells: list[CellResult]) -> str:
    out = []
    for c in cells:
        head = f"[{FAULTS[c.fault].title} @ {PHASES[c.phase].title}] {c.short()} (cell {c.duration_s:.0f} s)"
        out.append(head)
        if c.error:
            out.append(f"  harness: {c.error}")
        if c.injected_in:
            out.append(f"  injected on {c.target} with the job in {c.injected_in}; ended {c.end_phase} "
                       f"{c.after_fault_s:.1f} s after the fault; reason: {c.reason or '(none)'}")
        if c.fault_note:
            out.append(f"  fault: {c.fault_note}")
        if c.guest_max_gap_ms:
            out.append(f"  guest: longest I/O gap {c.guest_max_gap_ms:.0f} ms")
        if c.takeover_s:
            out.append(f"  leader takeover: {c.takeover_s:.2f} s after the kill (lease TTL {c.lease_ttl_s:g} s, "
                       f"target TTL + 1 s)")
        out.append(f"  expected: {' or '.join(c.expected)}" +
                   ("" if not c.expectation_problems else " — " + "; ".join(c.expectation_problems)))
        for r in c.invariants:
            if r.held is False:
                out.append(r.line())
        if c.log_excerpt:
            out.append("  logs:")
            out += [f"    {ln}" for ln in c.log_excerpt]
    return "\n".join(out)


def parse_cells(text: str) -> list[tuple[str, str]]:
    cells = []
    for item in filter(None, (t.strip() for t in text.split(","))):
        fault, _, phase = item.partition("@")
        if fault not in FAULTS:
            raise argparse.ArgumentTypeError(f"unknown fault {fault!r}; one of {', '.join(FAULTS)}")
        for p in [phase] if phase else list(PHASES):
            if p not in PHASES:
                raise argparse.ArgumentTypeError(f"unknown phase {p!r}; one of {', '.join(PHASES)}")
            cells.append((fault, p))
    return cells


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m e2e.fault_matrix", description=__doc__.splitlines()[0])
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--quick", action="store_true", help="the CI subset (default)")
    which.add_argument("--full", action="store_true", help="every fault x phase cell")
    which.add_argument("--cells", type=parse_cells, help="FAULT@PHASE,... (FAULT alone: its whole row)")
    parser.add_argument("--mode", choices=["auto", "netns", "loopback"], default="auto",
                        help="agents on network namespaces (root) or 127.0.0.x")
    parser.add_argument("--deadline-s", type=float, default=90.0, help="invariant 3: seconds after the fault")
    parser.add_argument("--busy-guests", type=int, default=Workload.busy_guests, metavar="N",
                        help="overload-source: busy controllers made on the source at set-up "
                             f"(default {Workload.busy_guests})")
    parser.add_argument("--keep-logs", action="store_true", help="keep each cell's process logs")
    parser.add_argument("--json", type=Path, help="also write the results as JSON here")
    args = parser.parse_args(argv)
    if args.busy_guests < 0:
        parser.error(f"--busy-guests must be 0 or more, got {args.busy_guests}")
    cells = args.cells or ([(f, p) for f in FAULTS for p in PHASES] if args.full else QUICK)
    started = time.monotonic()
    workload = Workload(busy_guests=args.busy_guests)
    results = [run_cell(f, p, config=MultiHostConfig(mode=args.mode), workload=workload, deadline_s=args.deadline_s,
                        keep_logs=args.keep_logs) for f, p in cells]
    total_s = time.monotonic() - started
    modes = sorted({c.mode for c in results if c.mode})
    print(f"\nfault matrix ({len(results)} cells, {total_s:.0f} s, mode {'/'.join(modes) or '?'}); "
          "a cell: invariants (ok, or FAIL with the violated ones), the job's end phase; [deadline]: ended by the "
          "orchestrator's job deadline (the fault itself went unnoticed); (unexpected): not the end DESIGN.md "
          "describes for that fault and phase")
    print(render_table(results))
    print()
    print(render_details(results))
    if args.json:
        args.json.write_text(json.dumps({"total_s": total_s, "cells": [asdict(c) for c in results]}, indent=2))
    return 0 if all(c.ok for c in results) else 1


if __name__ == "__main__":
    sys.exit(main())
