"""Progress is counted once, from one source: the job's bytes_transferred and the orchestrator's
nvmigrate_bytes_moved_total, sampled while slow dirty rounds run, never exceed what the source
agent has sent and never go down. (Adding the session's running total to the closed phases once
showed about twice the namespace during a round.)"""

from __future__ import annotations

import itertools
import urllib.request
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

from orchctl.localcluster import LocalCluster, wait_for
from proto.v1 import agent_pb2, migration_pb2
from tests.clusterprobe import TERMINAL, create_controller, get_job, migrate, wait_phase

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
