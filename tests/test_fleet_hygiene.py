"""Fleet hygiene with real processes: finished jobs leave etcd (and the jobs gauge) after their
retention, and a node name has one live agent at a time."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from orchctl.localcluster import LocalCluster, Proc, free_port, wait_for
from orchestrator.jobs import Job, Phase, PhaseEntry, Policy, Verification
from proto.v1 import migration_pb2
from tests.clusterprobe import TERMINAL, create_controller, get_job, migrate, wait_phase
from tests.conftest import etcdctl

MiB = 1 << 20
RETENTION_S = 5
ROLLED_BACK_ID = "mig-00000000001b"
UNVERIFIED_ID = "mig-00000000002b"
VERIFY_FAILED_ID = "mig-00000000003b"


@pytest.fixture
def short_retention_cluster(shared_etcd: str, etcd_prefix: str) -> Iterator[LocalCluster]:
    """An orchestrator keeping finished jobs RETENTION_S seconds, and agents n1, n2."""
    with LocalCluster() as c:
        c.use_etcd(shared_etcd, etcd_prefix)
        c.start_orchestrator(extra_args=["--job-retention-s", str(RETENTION_S)])
        c.start_agents(["n1", "n2"])
        yield c


def jobs_gauge(proc: Proc) -> dict[str, float]:
    """nvmigrate_jobs by phase, and nvmigrate_jobs_deleted_total by outcome under 'deleted:'."""
    with urllib.request.urlopen(f"http://{proc.http_address}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "nvmigrate_jobs":
                values[sample.labels["phase"]] = sample.value
            elif sample.name == "nvmigrate_jobs_deleted_total":
                values[f"deleted:{sample.labels['outcome']}"] = sample.value
    return values


def plant(cluster: LocalCluster, job_id: str, phase: Phase, verification: Verification = Verification.NONE) -> None:
    """A job record that ended just now, written with etcdctl; its nodes do not exist, so nothing
    acts on it but the collector (a pending verification waits: its deadline is days away)."""
    now = time.time()
    job = Job(id=job_id, controller_id=f"ctl-{job_id}", source_node="gone-a", destination_node="gone-b",
              namespace_bytes=4096, policy=Policy(), created_at=now - 5, phase=phase,
              phases=(PhaseEntry(Phase.PENDING, now - 5, 1.0), PhaseEntry(phase, now)), updated_at=now,
              verification=verification, bytes_transferred=1 << 50)
    etcdctl(cluster.etcd_endpoint, "put", f"{cluster.etcd_prefix}jobs/{job_id}", job.to_bytes().decode())


def job_gone(cluster: LocalCluster, job_id: str) -> bool:
    try:
        get_job(cluster, job_id)
    except grpc.RpcError as exc:
        return exc.code() == grpc.StatusCode.NOT_FOUND
    return False


def test_finished_jobs_go_after_retention_and_active_or_unverified_ones_stay(
        short_retention_cluster: LocalCluster) -> None:
    cluster = short_retention_cluster
    orchestrator = cluster.orchestrators[0]
    # a real job that ends (cancelled), and one that stays in PRECOPY for the whole test
    create_controller(cluster, "n1", "gc-done", 16 * MiB, write_iops=100)
    create_controller(cluster, "n1", "gc-busy", 64 * MiB, write_iops=100)
    busy = migrate(cluster, "gc-busy", to="n2", bandwidth_bytes_per_s=256 * 1024)
    done = migrate(cluster, "gc-done", to="n2", bandwidth_bytes_per_s=1 * MiB)
    wait_phase(cluster, done.id, {migration_pb2.PRECOPY})
    channel, api = cluster.migration_stub()
    with channel:
        api.CancelMigration(migration_pb2.CancelMigrationRequest(id=done.id), timeout=10)
    assert migration_pb2.Phase.Name(wait_phase(cluster, done.id, TERMINAL).phase) == "CANCELLED"
    plant(cluster, ROLLED_BACK_ID, Phase.ROLLED_BACK)
    plant(cluster, UNVERIFIED_ID, Phase.COMPLETED, Verification.PENDING)
    plant(cluster, VERIFY_FAILED_ID, Phase.COMPLETED, Verification.FAILED)

    # within the retention they are counted...
    wait_for("the finished jobs in nvmigrate_jobs", lambda: jobs_gauge(orchestrator).get("CANCELLED") == 1
             and jobs_gauge(orchestrator).get("ROLLED_BACK") == 1, 30)
    # ...then the collector deletes them, and the gauge drops
    wait_for("the finished jobs deleted", lambda: job_gone(cluster, done.id) and job_gone(cluster, ROLLED_BACK_ID),
             RETENTION_S + 60)
    after = jobs_gauge(orchestrator)
    assert after["CANCELLED"] == 0 and after["ROLLED_BACK"] == 0, after
    assert after["deleted:CANCELLED"] >= 1 and after["deleted:ROLLED_BACK"] >= 1, after
    # kept: the active job, and completed jobs whose verification is pending or failed
    assert after["COMPLETED"] == 2, after
    assert not any(job_gone(cluster, j) for j in (busy.id, UNVERIFIED_ID, VERIFY_FAILED_ID))
    assert get_job(cluster, busy.id).phase not in TERMINAL
    assert get_job(cluster, UNVERIFIED_ID).verification == migration_pb2.VERIFICATION_PENDING


# ---- one live agent per node name ------------------------------------------------------------

def agent_argv(cluster: LocalCluster, name: str, data_dir: Path, listen: str) -> list[str]:
    return [sys.executable, "-m", "agent.main", "--name", name, "--etcd", cluster.etcd_endpoint,
            "--etcd-prefix", cluster.etcd_prefix, "--listen", listen, "--data-dir", str(data_dir),
            "--lease-ttl-s", str(cluster.lease_ttl_s), "--capacity", "1G"]


@pytest.fixture
def one_agent(shared_etcd: str, etcd_prefix: str) -> Iterator[LocalCluster]:
    with LocalCluster() as c:
        c.use_etcd(shared_etcd, etcd_prefix)
        c.start_orchestrator()
        c.start_agents(["n1"])
        yield c


def test_a_second_agent_with_a_live_agents_name_refuses_to_start(one_agent: LocalCluster, tmp_path: Path) -> None:
    cluster = one_agent
    first = cluster.node("n1")
    assert first is not None
    second = subprocess.run(agent_argv(cluster, "n1", tmp_path / "second", "127.0.0.1:0"), capture_output=True,
                            text=True, timeout=120, check=False)
    assert second.returncode == 2, second.stderr
    lines = second.stderr.strip().splitlines()
    assert len(lines) == 1, second.stderr
    assert lines[0].startswith(f"error: node name 'n1' is held by a live agent at {first.address} "
                               "(registered since "), lines[0]
    assert lines[0].endswith("); stop it or choose another --name"), lines[0]
    # the first keeps its registration, and keeps it once the second is gone
    assert cluster.agents["n1"].exited() is None
    still = cluster.node("n1")
    assert still is not None and still.address == first.address


def node_started_at(cluster: LocalCluster, name: str) -> float | None:
    out = etcdctl(cluster.etcd_endpoint, "get", "--print-value-only", f"{cluster.etcd_prefix}nodes/{name}").strip()
    return float(json.loads(out)["started_at"]) if out else None


def test_an_agent_restarted_right_after_sigkill_waits_out_its_old_lease(one_agent: LocalCluster,
                                                                         tmp_path: Path) -> None:
    """On a fixed port, so that the old record names the very address the new process binds."""
    cluster = one_agent
    address = f"127.0.0.1:{free_port()}"
    cluster.agents["n1"].stop()
    wait_for("n1 to deregister", lambda: node_started_at(cluster, "n1") is None, 30)
    old = cluster.start_agent("n1", extra_args=["--listen", address])
    old_started_at = node_started_at(cluster, "n1")
    assert old_started_at is not None
    old.kill()  # SIGKILL: its lease lives on for up to the TTL
    assert node_started_at(cluster, "n1") == old_started_at
    log_path = tmp_path / "restarted.log"
    with open(log_path, "wb") as log:
        restarted = subprocess.Popen(agent_argv(cluster, "n1", cluster.agent_data_dir("n1"), address), stdout=log,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        wait_for("the restarted n1 to register", lambda: (started := node_started_at(cluster, "n1")) is not None
                 and started != old_started_at, 60, alive=lambda: None if restarted.poll() is None
                 else f"restarted agent exited {restarted.returncode}: {log_path.read_text()}")
        assert "waiting up to" in log_path.read_text(), log_path.read_text()
        node = cluster.node("n1")
        assert node is not None and node.address == address
    finally:
        restarted.terminate()
        try:
            restarted.wait(timeout=15)
        except subprocess.TimeoutExpired:
            restarted.kill()
            restarted.wait(timeout=15)
