"""Absurd and hostile input, as a new user would type it: each gets a clear error and exit code,
no traceback, and nothing changes in etcd. And a job whose copy stops moving rolls back after
the progress timeout instead of holding its controller until the job deadline."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from orchctl.localcluster import LocalCluster
from orchestrator.progress_watch import ProgressWatch
from orchestrator.runner import NO_PROGRESS
from proto.v1 import agent_pb2, migration_pb2
from tests.clusterprobe import TERMINAL, create_controller, migrate, owners, running_on, verify, wait_phase
from tests.conftest import etcdctl

ROOT = Path(__file__).resolve().parents[1]
MiB = 1 << 20


def orchctl(cluster: LocalCluster, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "ORCHCTL_SERVER": cluster.orchestrator_address}
    return subprocess.run([sys.executable, "-m", "orchctl.cli", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=60)


def etcd_keys(cluster: LocalCluster) -> str:
    return etcdctl(cluster.etcd_endpoint, "get", "--prefix", "--keys-only", f"{cluster.etcd_prefix}jobs/")


@pytest.mark.parametrize(("argv", "says"), [
    (["migrate", "c5", "--max-downtime-ms", "99999999999999999999999"],
     "max_downtime_ms 99999999999999999999999 is out of range: give 1 to 2000000 ms"),
    (["migrate", "c5", "--max-rounds", "1e20"], "invalid value '1e20': expected a whole number"),
    (["migrate", "c5", "--max-rounds", "10001"], "give 1 to 10000 rounds"),
    (["migrate", "c5", "--bandwidth", "1"], "below the floor of 65536 bytes/s"),
    (["migrate", "c5", "--bandwidth", "-5M"], "invalid bandwidth '-5M': a rate cannot be negative"),
    (["migrate", "x" * 20_000], "controller id 'xxxxxxxx"),
    (["list", "--controller", "Bad!"], "controller id 'Bad!' is malformed"),
    (["get", "m" * 20_000], "(20000 characters) is malformed"),
])
def test_absurd_input_is_refused_clearly_and_changes_nothing(bad_input_cluster: LocalCluster, argv: list[str],
                                                             says: str) -> None:
    before = etcd_keys(bad_input_cluster)
    done = orchctl(bad_input_cluster, *argv)
    assert done.returncode == 2, (done.returncode, done.stderr[-500:])
    assert says in done.stderr, done.stderr[-500:]
    assert "Traceback" not in done.stderr
    assert len(done.stderr) < 2000, "the error echoes the whole of a huge value"
    assert etcd_keys(bad_input_cluster) == before


def test_list_migrations_validates_its_controller_id(bad_input_cluster: LocalCluster) -> None:
    channel, api = bad_input_cluster.migration_stub()
    with channel, pytest.raises(grpc.RpcError) as caught:
        api.ListMigrations(migration_pb2.ListMigrationsRequest(controller_id="Bad!"), timeout=10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
    assert "'Bad!'" in caught.value.details()  # type: ignore[attr-defined]


# ---- progress timeout --------------------------------------------------------------------------


def test_progress_watch_counts_only_a_standstill() -> None:
    watch = ProgressWatch(timeout_s=10)
    watch.step_started(0.0)
    assert watch.observe(100, 1.0) is None
    assert watch.observe(100, 10.5) is None  # 9.5 s without a byte
    assert watch.observe(100, 11.0) == 10.0
    assert watch.observe(101, 12.0) is None  # a byte moved: the clock starts again
    watch.step_started(30.0)  # a new step is progress too
    assert watch.observe(101, 39.0) is None


@pytest.fixture
def stalling_cluster() -> Iterator[LocalCluster]:
    # Leases far longer than the test: the destination's silence must not end the job as a lost
    # node; only the standstill of its bytes may.
    with LocalCluster(lease_ttl_s=60) as c:
        c.start_etcd()
        c.start_orchestrator(extra_args=["--progress-timeout-s", "3"])
        c.start_agents(["n1", "n2"])
        yield c


def test_a_copy_that_stops_moving_rolls_back_after_the_progress_timeout(stalling_cluster: LocalCluster) -> None:
    cluster = stalling_cluster
    create_controller(cluster, "n1", "s1", 32 * MiB, write_iops=100)
    job = migrate(cluster, "s1", to="n2", bandwidth_bytes_per_s=2 * MiB)
    wait_phase(cluster, job.id, {migration_pb2.PRECOPY}, timeout_s=60)
    # The destination stops reading: its socket fills and the source's count stands still, while
    # the source keeps answering every call.
    destination = cluster.agents["n2"]
    os.kill(destination.popen.pid, signal.SIGSTOP)
    try:
        ended = wait_phase(cluster, job.id, TERMINAL, timeout_s=120)
    finally:
        os.kill(destination.popen.pid, signal.SIGCONT)
    assert migration_pb2.Phase.Name(ended.phase) == "ROLLED_BACK", ended.reason
    assert ended.reason.startswith(NO_PROGRESS) and "--progress-timeout-s 3" in ended.reason, ended.reason
    assert owners(cluster)["s1"] == "n1"
    assert running_on(cluster, "s1", ["n1", "n2"]) == ["n1"]
    result = verify(cluster, "n1", "s1")
    assert result.ok, result.first_mismatch


def test_fault_injection_is_refused_without_the_test_flag(bad_input_cluster: LocalCluster) -> None:
    channel, n1 = bad_input_cluster.agent_stub("n1")
    with channel, pytest.raises(grpc.RpcError) as caught:
        n1.InjectFault(agent_pb2.InjectFaultRequest(corrupt_frame=1), timeout=10)
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED  # type: ignore[attr-defined]
    assert "--allow-fault-injection" in caught.value.details()  # type: ignore[attr-defined]


def test_orchctl_pointed_at_the_http_port_leaves_no_traceback(bad_input_cluster: LocalCluster) -> None:
    orchestrator = bad_input_cluster.orchestrators[0]
    done = subprocess.run([sys.executable, "-m", "orchctl.cli", "--server", orchestrator.http_address, "list"],
                          cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 3, done.stderr
    assert "cannot reach the orchestrator" in done.stderr and "Traceback" not in done.stderr
    assert "Traceback" not in orchestrator.log_path.read_text(errors="replace")


def test_a_node_takes_part_in_a_bounded_number_of_migrations(bad_input_cluster: LocalCluster) -> None:
    """The 65th destination prepared at once on a node is refused with the reason; ending one
    makes room again."""
    from agent.host import MAX_SESSIONS
    channel, n2 = bad_input_cluster.agent_stub("n2")
    version = n2.GetInfo(agent_pb2.GetInfoRequest(), timeout=10).state_format_version

    def ref(i: int) -> agent_pb2.MigrationRef:
        return agent_pb2.MigrationRef(job_id=f"mig-{i:012x}", epoch=1, controller_id=f"many-{i}")

    def prepare(i: int) -> None:
        n2.PrepareDestination(agent_pb2.PrepareDestinationRequest(
            ref=ref(i), namespace_bytes=1 << 20, state_format_version=version, source_node="n1"), timeout=30)
    # The orchestrator's reconciler aborts sessions of jobs etcd does not know (these) when it
    # passes by, which frees places meanwhile: prepare until refused, within a bound.
    attempts = 3 * MAX_SESSIONS
    refused: grpc.RpcError | None = None
    with channel:
        try:
            for i in range(attempts):
                try:
                    prepare(i)
                except grpc.RpcError as exc:
                    refused = exc
                    break
            assert refused is not None, f"{attempts} destinations prepared at once on one node, none refused"
            assert i >= MAX_SESSIONS, f"refused at {i}, under the bound of {MAX_SESSIONS}: {refused}"
            assert refused.code() == grpc.StatusCode.FAILED_PRECONDITION  # type: ignore[attr-defined]
            assert f"already takes part in {MAX_SESSIONS} migrations" in refused.details()  # type: ignore[attr-defined]
            n2.AbortMigration(ref(i - 1), timeout=30)
            prepare(i)
        finally:
            for j in range(attempts):
                with contextlib.suppress(grpc.RpcError):
                    n2.AbortMigration(ref(j), timeout=30)
