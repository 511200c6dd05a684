"""A destination's disk that fills, against real processes and a real tmpfs: during the copy the
job moves to another destination; at the switchover the destination refuses its commit and the
source resumes.
Either way the controller runs on exactly one node, every acknowledged write reads back, and no
temp file is left in any data dir."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from orchctl.localcluster import LocalCluster, wait_for
from orchestrator.runner import NOT_COMMITTED
from proto.v1 import migration_pb2
from tests.clusterprobe import (
    TERMINAL,
    create_controller,
    etcd_json,
    migrate,
    owners,
    running_on,
    verify,
    wait_phase,
    wait_verified,
)
from tests.diskfill import fill_disk

MiB = 1 << 20
Tmpfs = Callable[..., Path]


@contextmanager
def cluster_on_disks(shared_etcd: str, etcd_prefix: str, tmp_path: Path, tmpfs: Tmpfs, names: list[str],
                     disks: dict[str, dict[str, object]]) -> Iterator[LocalCluster]:
    """An orchestrator and agents `names`; the data dir of each agent in `disks` is a tmpfs of its own
    (mount options as the `tmpfs` fixture takes them)."""
    workdir = tmp_path / "cluster"
    workdir.mkdir()
    for name, options in disks.items():
        tmpfs(f"cluster/{name}", **options)
    with LocalCluster(workdir=workdir, _owns_workdir=False) as cluster:
        cluster.use_etcd(shared_etcd, etcd_prefix)
        cluster.start_with_agents(names)
        yield cluster


def temp_files(cluster: LocalCluster, names: list[str]) -> list[Path]:
    return [p for name in names for p in (cluster.workdir / name).glob("*.tmp")]


def copies_of(cluster: LocalCluster, node: str, cid: str) -> list[str]:
    return sorted(p.name for p in (cluster.workdir / node).glob(f"{cid}.*"))


def phase_names(job: migration_pb2.Migration) -> list[str]:
    return [migration_pb2.Phase.Name(p.phase) for p in job.phases]


def test_a_destination_disk_that_fills_during_precopy_is_replaced_and_the_job_completes(
        shared_etcd: str, etcd_prefix: str, tmp_path: Path, tmpfs: Tmpfs) -> None:
    names = ["n1", "n2", "n3"]
    # n2 has the most room, so the scheduler picks it first; n3 is the one left.
    with cluster_on_disks(shared_etcd, etcd_prefix, tmp_path, tmpfs, names,
                          {"n2": {"size": "96m"}, "n3": {"size": "64m"}}) as cluster:
        n2 = etcd_json(cluster, f"{cluster.etcd_prefix}nodes/n2")
        assert n2 is not None and 90 * MiB < int(n2["data_dir_free_bytes"]) <= 96 * MiB  # type: ignore[call-overload]
        create_controller(cluster, "n1", "d1", 16 * MiB, write_iops=200)
        job = migrate(cluster, "d1", bandwidth_bytes_per_s=2 * MiB)  # about 8 s of precopy
        first = wait_phase(cluster, job.id, {migration_pb2.PRECOPY}, also=lambda j: j.bytes_transferred > 0)
        assert first.destination_node == "n2"
        filler = fill_disk(cluster.workdir / "n2")  # other data takes the rest of n2's disk

        job = wait_phase(cluster, job.id, TERMINAL, timeout_s=180)
        assert migration_pb2.Phase.Name(job.phase) == "COMPLETED", job.reason
        assert job.destination_node == "n3"
        assert phase_names(job).count("PREPARING") == 2
        assert any("no space left" in p.note and "'n2'" in p.note for p in job.phases), \
            [p.note for p in job.phases]
        assert owners(cluster)["d1"] == "n3"
        assert running_on(cluster, "d1", names) == ["n3"]
        result = verify(cluster, "n3", "d1")
        assert result.ok, result.first_mismatch
        assert wait_verified(cluster, job.id).verification == migration_pb2.VERIFICATION_PASSED
        assert wait_for("n2 to discard its copy", lambda: copies_of(cluster, "n2", "d1") == [], 30) is not None
        assert temp_files(cluster, names) == []
        filler.unlink()

        # A write a crash interrupted leaves its temp file; the agent sweeps it when it starts again.
        cluster.agents["n2"].kill()
        leftover = cluster.workdir / "n2" / f"d1.{job.id}.state.tmp"
        leftover.write_bytes(b"half a state")
        cluster.start_agent("n2")
        assert temp_files(cluster, names) == []


def test_a_destination_disk_full_at_its_commit_refuses_it_and_the_source_resumes(
        shared_etcd: str, etcd_prefix: str, tmp_path: Path, tmpfs: Tmpfs) -> None:
    names = ["n1", "n2"]
    # Inodes for the mount's root, the arriving namespace and the loaded state, and no more: the
    # data and the state arrive, the record of the controller that would run it cannot be written,
    # so the destination refuses the switchover before it sends its commit.
    with cluster_on_disks(shared_etcd, etcd_prefix, tmp_path, tmpfs, names,
                          {"n2": {"size": "64m", "nr_inodes": 3}}) as cluster:
        create_controller(cluster, "n1", "d2", 8 * MiB, write_iops=200)
        job = migrate(cluster, "d2")
        job = wait_phase(cluster, job.id, TERMINAL, timeout_s=180)
        assert migration_pb2.Phase.Name(job.phase) == "ROLLED_BACK", job.reason
        assert "COMMIT" not in phase_names(job)
        assert job.reason.startswith(NOT_COMMITTED), job.reason
        # The record and the state file are written side by side: whichever came second found no inode.
        assert f"node 'n2': no space left on device writing {cluster.workdir / 'n2'}/d2." in job.reason, job.reason
        assert "(no inode left there)" in job.reason, job.reason
        record = etcd_json(cluster, f"{cluster.etcd_prefix}controllers/d2")
        assert record is not None and record["node"] == "n1" and record["state"] == "RUNNING"
        assert running_on(cluster, "d2", names) == ["n1"]
        result = verify(cluster, "n1", "d2")
        assert result.ok, result.first_mismatch
        assert wait_for("n2 to discard its copy", lambda: copies_of(cluster, "n2", "d2") == [], 30) is not None
        assert temp_files(cluster, names) == []


def test_a_destination_disk_that_fills_after_precopy_ends_the_job_with_nowhere_else_to_go(
        shared_etcd: str, etcd_prefix: str, tmp_path: Path, tmpfs: Tmpfs) -> None:
    names = ["n1", "n2"]
    with cluster_on_disks(shared_etcd, etcd_prefix, tmp_path, tmpfs, names, {"n2": {"size": "64m"}}) as cluster:
        # Enough rounds, each slowed by the bandwidth cap, that the disk fills between the end of
        # precopy and the stop-and-copy: the guest dirties faster than the cap, so no round leaves
        # the none that 1 ms allows, and the job stops the guest only when forced after 3.
        create_controller(cluster, "n1", "d3", 8 * MiB, write_iops=2000)
        job = migrate(cluster, "d3", max_rounds=3, max_downtime_ms=1, on_no_convergence=migration_pb2.FORCE,
                      bandwidth_bytes_per_s=2 * MiB)
        wait_phase(cluster, job.id, {migration_pb2.DIRTY_ITERATION})
        # Every block arrived in precopy (the namespace was prefilled), so later rounds only
        # overwrite; what needs new blocks is the guest map's journal (a piece after each round),
        # or, if the rounds are over, the state at stop-and-copy.
        fill_disk(cluster.workdir / "n2")
        job = wait_phase(cluster, job.id, TERMINAL, timeout_s=180)
        assert "COMMIT" not in phase_names(job)
        assert any("no space left on device writing" in text and (".guestmap" in text or ".state" in text)
                   for text in (job.reason, *(p.note for p in job.phases))), (job.reason, job.phases)
        # The journal filled it: n2 is unfit and no other node fits; or the state did: the
        # destination refused the switchover. Either way the guest never left n1.
        assert migration_pb2.Phase.Name(job.phase) in ("FAILED", "ROLLED_BACK"), job.reason
        assert running_on(cluster, "d3", names) == ["n1"]
        result = verify(cluster, "n1", "d3")
        assert result.ok, result.first_mismatch
        assert wait_for("n2 to discard its copy", lambda: copies_of(cluster, "n2", "d3") == [], 30) is not None
        assert temp_files(cluster, names) == []
