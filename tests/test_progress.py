"""Progress is counted once, from one source: the job's bytes_transferred and the orchestrator's
nvmigrate_bytes_moved_total, sampled while slow dirty rounds run, never exceed what the source
agent has sent and never go down. (Adding the session's running total to the closed phases once
showed about twice the namespace during a round.)

Progress is written to etcd every few seconds only: the leader shows its runner's live view, a
standby orchestrator etcd's, a few seconds old at most; a cancel is still seen within a poll."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass

import grpc
from prometheus_client.parser import text_string_to_metric_families

from e2e.etcd_writes import JobWrites, WriteRecorder
from orchctl.localcluster import LocalCluster, wait_for
from orchestrator.runner import PROGRESS_PERSIST_INTERVAL_S
from proto.v1 import agent_pb2, migration_pb2, migration_pb2_grpc
from tests.clusterprobe import TERMINAL, create_controller, get_job, migrate, wait_phase
from tests.test_etcd_writes import MAX_JOB_WRITES

MiB = 1 << 20


def bytes_moved_metric(cluster: LocalCluster) -> float:
    with urllib.request.urlopen(f"http://{cluster.orchestrators[0].http_address}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    return sum(s.value for family in text_string_to_metric_families(text) for s in family.samples
               if s.name == "nvmigrate_bytes_moved_total")


@dataclass(frozen=True)
class Sample:
    phase: int
    job_bytes: int
    metric_bytes: float
    sent_after: int  # the source's own count, read after the other two


def test_progress_never_exceeds_what_was_sent_and_never_goes_down(cluster: LocalCluster) -> None:
    # A guest writing 4 MB/s against a 4 MiB/s link: every dirty round has seconds of changed blocks
    # to send, far longer than the orchestrator's progress poll; two rounds, then forced stop-and-copy.
    create_controller(cluster, "n1", "c1", 16 * MiB, write_iops=1000)
    job = migrate(cluster, "c1", to="n2", bandwidth_bytes_per_s=4 * MiB, max_rounds=2,
                  on_no_convergence=migration_pb2.FORCE)
    wait_phase(cluster, job.id, {migration_pb2.PRECOPY})
    channel, source = cluster.agent_stub("n1")
    ref = agent_pb2.MigrationRef(job_id=job.id, controller_id="c1")
    samples: list[Sample] = []

    def sample() -> migration_pb2.Migration | None:
        seen = get_job(cluster, job.id)
        metric = bytes_moved_metric(cluster)
        sent = source.GetSession(ref, timeout=10).bytes_sent
        samples.append(Sample(seen.phase, seen.bytes_transferred, metric, sent))
        return seen if seen.phase in TERMINAL else None

    with channel:
        ended = wait_for(f"job {job.id} to end while sampling its progress", sample, 180, interval_s=0.1)
    assert migration_pb2.Phase.Name(ended.phase) == "COMPLETED", ended.reason

    for earlier, later in itertools.pairwise(samples):
        assert later.job_bytes >= earlier.job_bytes, (earlier, later)
        assert later.metric_bytes >= earlier.metric_bytes, (earlier, later)
    for s in samples:
        assert s.job_bytes <= s.sent_after, s
        assert s.metric_bytes <= s.sent_after, s
    # The rounds were slow enough to be seen moving: the total grew between two samples taken
    # inside DIRTY_ITERATION, so progress was reported mid-round, not only at its end.
    dirty = [s for s in samples if s.phase == migration_pb2.DIRTY_ITERATION]
    assert any(b.job_bytes > a.job_bytes for a, b in itertools.pairwise(dirty)), dirty
    final = samples[-1]
    assert ended.bytes_transferred == final.job_bytes == final.metric_bytes
    assert ended.bytes_transferred == sum(p.bytes for p in ended.phases)  # one count, the phases agree
    assert ended.bytes_transferred > 16 * MiB and ended.rounds == 2


def _bytes_seen(address: str, job_id: str) -> tuple[int, int]:
    """(phase, bytes_transferred) of the job as the orchestrator at `address` shows it."""
    with grpc.insecure_channel(address) as channel:
        job = migration_pb2_grpc.MigrationServiceStub(channel).GetMigration(
            migration_pb2.GetMigrationRequest(id=job_id), timeout=10)
    return job.phase, job.bytes_transferred


def test_progress_shows_live_on_the_leader_and_within_seconds_on_a_standby(cluster: LocalCluster) -> None:
    # The runner writes progress to etcd every PROGRESS_PERSIST_INTERVAL_S only: the leader serves
    # its runner's newer view; a standby orchestrator shows etcd's, a few seconds old at most.
    standby = cluster.start_orchestrator(name="orch-2")
    leader_address, standby_address = cluster.orchestrator_address, standby.address  # type: ignore[attr-defined]
    create_controller(cluster, "n1", "c1", 24 * MiB, write_iops=100)
    job = migrate(cluster, "c1", to="n2", bandwidth_bytes_per_s=2 * MiB)  # about 12 s of precopy
    samples: list[tuple[float, tuple[int, int], tuple[int, int]]] = []  # (time, leader's, standby's)

    def sample() -> bool:
        # the standby first: what it shows was written before the leader's view is read
        standby_seen = _bytes_seen(standby_address, job.id)
        samples.append((time.monotonic(), _bytes_seen(leader_address, job.id), standby_seen))
        return samples[-1][1][0] not in (migration_pb2.PENDING, migration_pb2.PREPARING, migration_pb2.PRECOPY)

    wait_for(f"job {job.id} to leave PRECOPY while sampling its progress", sample, 120, interval_s=0.1)
    ended = wait_phase(cluster, job.id, TERMINAL, timeout_s=120)
    assert migration_pb2.Phase.Name(ended.phase) == "COMPLETED", ended.reason

    in_precopy = [(t, leader[1], standby[1]) for t, leader, standby in samples
                  if leader[0] == standby[0] == migration_pb2.PRECOPY]
    leader_values = sorted({b for _, b, _ in in_precopy})
    assert len(leader_values) >= 5, f"the leader showed too few distinct values during precopy: {leader_values}"
    # The standby saw etcd's progress move mid-precopy, and each move came within the persist
    # interval (plus slack for a loaded machine) of the one before, or of the phase's start.
    times = [t for t, _, _ in in_precopy]
    moves = [times[0]] + [t for (_, _, a), (t, _, b) in itertools.pairwise(in_precopy) if b > a]
    assert len(moves) >= 2, f"the standby never saw progress move during precopy: {in_precopy}"
    gaps = [round(b - a, 2) for a, b in itertools.pairwise(moves)]
    assert max(gaps) <= PROGRESS_PERSIST_INTERVAL_S + 3.0, f"standby's progress went stale for too long: {gaps}"
    # Never ahead of the leader's own view, read after it.
    assert all(s <= le for _, le, s in in_precopy), in_precopy
    # `orchctl get` on the standby shows the job as etcd has it (the last progress with its phase).
    shown = json.loads(subprocess.run(
        [sys.executable, "-m", "orchctl.cli", "--server", standby_address, "-o", "json", "get", job.id],
        capture_output=True, text=True, timeout=60, check=True).stdout)
    assert int(shown["bytes_transferred"]) == ended.bytes_transferred


def test_cancel_is_seen_within_a_poll_although_progress_is_written_rarely(cluster: LocalCluster) -> None:
    create_controller(cluster, "n1", "c2", 32 * MiB, write_iops=100)
    recorder = WriteRecorder(cluster.etcd_endpoint, cluster.etcd_prefix)
    job = migrate(cluster, "c2", to="n2", bandwidth_bytes_per_s=2 * MiB)  # 16 s of precopy
    wait_phase(cluster, job.id, {migration_pb2.PRECOPY}, also=lambda j: j.bytes_transferred > 2 * MiB)
    channel, source = cluster.agent_stub("n1")
    with channel:
        sent_at_cancel = source.GetSession(agent_pb2.MigrationRef(job_id=job.id, controller_id="c2"),
                                           timeout=10).bytes_sent
    channel, api = cluster.migration_stub()
    with channel:
        api.CancelMigration(migration_pb2.CancelMigrationRequest(id=job.id), timeout=10)
    ended = wait_phase(cluster, job.id, TERMINAL)
    assert migration_pb2.Phase.Name(ended.phase) == "CANCELLED", ended.reason
    # The runner stopped at its next poll (every PROGRESS_INTERVAL_S): the progress it last read
    # is within a few seconds' worth of bytes of what was sent when the cancel was asked (at
    # 2 MiB/s, 6 MiB is 3 s), far from the namespace's 32 MiB.
    assert ended.bytes_transferred - sent_at_cancel < 6 * MiB, (sent_at_cancel, ended.bytes_transferred)
    assert [p.phase for p in ended.phases][-2:] == [migration_pb2.PRECOPY, migration_pb2.CANCELLED]
    writes = JobWrites.of(recorder.collect(), job.id, "c2")
    assert writes.revisions <= MAX_JOB_WRITES, writes.describe()
