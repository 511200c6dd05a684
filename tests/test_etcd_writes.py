"""etcd load per job does not grow with the job's length: a short and a long migration each cost
at most MAX_JOB_WRITES etcd transactions on the job's keys (its record, its controller's active
marker and ownership record), counted from etcd's own history (e2e/etcd_writes.py). The
assertion message lists every transaction, so a regression says which write came back."""

from __future__ import annotations

from e2e.etcd_writes import JobWrites, WriteRecorder
from orchctl.localcluster import LocalCluster
from proto.v1 import migration_pb2
from tests.clusterprobe import TERMINAL, create_controller, migrate, wait_phase, wait_verified

MiB = 1 << 20
MAX_JOB_WRITES = 12


def migrate_and_count(cluster: LocalCluster, cid: str, timeout_s: float = 120, **policy: object
                      ) -> tuple[migration_pb2.Migration, JobWrites]:
    """Migrates `cid` (already created) to n2 and counts its writes, up to the verifier's verdict
    (the last write a completed job gets)."""
    recorder = WriteRecorder(cluster.etcd_endpoint, cluster.etcd_prefix)
    job = migrate(cluster, cid, to="n2", **policy)
    ended = wait_phase(cluster, job.id, TERMINAL, timeout_s=timeout_s)
    assert migration_pb2.Phase.Name(ended.phase) == "COMPLETED", ended.reason
    verified = wait_verified(cluster, job.id)
    assert verified.verification == migration_pb2.VERIFICATION_PASSED, verified.verification_note
    return verified, JobWrites.of(recorder.collect(), job.id, cid)


def test_a_short_job_costs_at_most_twelve_etcd_writes(cluster: LocalCluster) -> None:
    create_controller(cluster, "n1", "c1", 4 * MiB, write_iops=200)
    job, writes = migrate_and_count(cluster, "c1")
    print(f"short job {job.id}, {job.bytes_transferred} bytes, {job.rounds} rounds:\n{writes.describe()}")
    assert writes.revisions <= MAX_JOB_WRITES, f"a 4 MiB job wrote etcd too often:\n{writes.describe()}"
    assert writes.by_key()["jobs/ put"] >= 8  # create, PREPARING ... COMPLETED, verdict: all still there


def test_a_long_job_with_dirty_rounds_costs_no_more_writes(cluster: LocalCluster) -> None:
    # 32 MiB at 4 MiB/s: about 8 s of precopy, then rounds of what the guest dirtied meanwhile.
    create_controller(cluster, "n1", "c2", 32 * MiB, write_iops=300)
    job, writes = migrate_and_count(cluster, "c2", timeout_s=180, bandwidth_bytes_per_s=4 * MiB, max_rounds=4,
                                    on_no_convergence=migration_pb2.FORCE)
    print(f"long job {job.id}, {job.bytes_transferred} bytes, {job.rounds} rounds:\n{writes.describe()}")
    assert job.rounds >= 1, "the job had no dirty round: it does not test what it should"
    assert writes.revisions <= MAX_JOB_WRITES, f"a 32 MiB job of {job.rounds} rounds wrote etcd too often:\n" \
                                               f"{writes.describe()}"
