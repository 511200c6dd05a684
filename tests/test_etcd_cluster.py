"""etcd as the cluster it is: several endpoints with failover, TLS and user auth.

A real three-member etcd runs locally; the member every process talks to, which is also the
raft leader, is SIGKILLed (or frozen with SIGSTOP) in the middle of a migration, and the job
still completes with every acknowledged write on the destination. A single TLS member with client certificates and user
auth carries a whole migration; a wrong password or a missing CA is a clear start-up error."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cluster import etcd_config
from orchctl.localcluster import EtcdServerTls, LocalCluster, wait_for
from proto.v1 import migration_pb2
from tests.clusterprobe import TERMINAL, create_controller, migrate, owners, running_on, verify, wait_phase
from tests.tlscerts import Pki, make_pki

MiB = 1 << 20
NODES = ["n1", "n2"]
ROOT_PASSWORD = "s3cret-for-tests"

# ---- parsing (pure) ------------------------------------------------------------------------------


def test_endpoints_parse_with_and_without_scheme() -> None:
    assert etcd_config.parse_endpoints("a:1, b:2 ,c:3") == (("a:1", "b:2", "c:3"), False)
    assert etcd_config.parse_endpoints("https://a:1,https://b:2/") == (("a:1", "b:2"), True)
    assert etcd_config.parse_endpoints("http://[::1]:2379") == (("[::1]:2379",), False)


@pytest.mark.parametrize(("text", "says"), [
    ("", "no etcd endpoint"),
    ("a:1,a:1", "name a member twice"),
    ("https://a:1,b:2", "mix https:// and plain"),
    ("grpc://a:1", "scheme 'grpc'"),
    ("a:99999", "'a:99999' is malformed"),
    ("a", "'a' is malformed"),
])
def test_bad_endpoints_are_named(text: str, says: str) -> None:
    with pytest.raises(ValueError, match=says):
        etcd_config.parse_endpoints(text)


def _args(**given: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    etcd_config.add_etcd_arguments(parser)
    argv = [f"--{k.replace('_', '-')}={v}" for k, v in given.items()]
    return parser.parse_args(argv)


def test_credentials_must_be_complete(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="--etcd-cert and --etcd-key go together"):
        etcd_config.config_from_args(_args(etcd_cert=str(tmp_path / "c.pem")), {})
    with pytest.raises(ValueError, match="--etcd-user 'root' has no password"):
        etcd_config.config_from_args(_args(etcd_user="root"), {})
    with pytest.raises(ValueError, match="no --etcd-user"):
        etcd_config.config_from_args(_args(), {"NVMIGRATE_ETCD_PASSWORD": "x"})
    with pytest.raises(ValueError, match=r"--etcd-ca .*missing\.pem: cannot read it"):
        etcd_config.config_from_args(_args(etcd_ca=str(tmp_path / "missing.pem")), {})
    secret = tmp_path / "password"
    secret.write_text("pw\n")
    config = etcd_config.config_from_args(_args(etcd_user="root", etcd_password_file=str(secret)), {})
    assert (config.user, config.password, config.tls) == ("root", "pw", False)
    assert "pw" not in repr(config)


# ---- three members, one killed mid-migration ---------------------------------------------------


def etcdctl_json(endpoint: str, *args: str) -> list[dict[str, object]]:
    done = subprocess.run(["etcdctl", f"--endpoints={endpoint}", "--write-out=json", *args],
                          capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        return []
    parsed = json.loads(done.stdout)
    return parsed if isinstance(parsed, list) else [parsed]


def raft_leader_first(endpoints: str) -> str | None:
    """The endpoints reordered so the raft leader's comes first; None while there is no leader."""
    members = endpoints.split(",")
    for endpoint in members:
        status = etcdctl_json(endpoint, "endpoint", "status")
        if not status:
            return None
        member: dict[str, Any] = status[0]["Status"]  # type: ignore[assignment]
        leader = member.get("leader", 0)  # protobuf's JSON leaves a zero out: no leader yet
        if leader and leader == member["header"]["member_id"]:
            return ",".join([endpoint, *(m for m in members if m != endpoint)])
    return None


@pytest.fixture
def three_member_etcd() -> Iterator[LocalCluster]:
    with LocalCluster(lease_ttl_s=5) as c:
        endpoints = c.start_etcd_cluster(3)
        ordered = wait_for("the etcd members to elect a leader", lambda: raft_leader_first(endpoints), 60)
        c.etcd_endpoint = ordered  # every process tries the leader's member first
        yield c


@pytest.mark.parametrize("fault", ["kill", "freeze"])
def test_a_lost_etcd_member_does_not_stop_a_migration(three_member_etcd: LocalCluster, fault: str) -> None:
    """SIGKILL: the member's connections are refused at once. SIGSTOP: it keeps them open and
    answers nothing, so each process finds out only when a call times out."""
    cluster = three_member_etcd
    cluster.start_with_agents(NODES)
    create_controller(cluster, "n1", "m1", 8 * MiB, write_iops=150)
    # a slow link: the job is still copying when the member goes
    job = migrate(cluster, "m1", to="n2", bandwidth_bytes_per_s=2 * MiB)
    wait_phase(cluster, job.id, {migration_pb2.PRECOPY, migration_pb2.DIRTY_ITERATION}, timeout_s=60)

    killed_endpoint = cluster.etcd_endpoint.split(",")[0]
    killed = next(m for m in cluster.etcd_members if killed_endpoint in " ".join(m.popen.args))  # type: ignore[arg-type]
    if fault == "kill":
        killed.kill()
    else:
        os.kill(killed.popen.pid, signal.SIGSTOP)  # continued by its stop() at the end
    remaining = ",".join(cluster.etcd_endpoint.split(",")[1:])
    wait_for("the two remaining members to elect a leader", lambda: raft_leader_first(remaining), 60)

    ended = wait_phase(cluster, job.id, TERMINAL, timeout_s=180)
    assert migration_pb2.Phase.Name(ended.phase) == "COMPLETED", ended.reason
    assert owners(cluster)["m1"] == "n2"
    assert running_on(cluster, "m1", NODES) == ["n2"]
    result = verify(cluster, "n2", "m1")
    assert result.ok, result.first_mismatch
    # Every process was on the killed member and moved off it (not merely never used it).
    for proc in [*cluster.orchestrators, *cluster.agents.values()]:
        log = proc.log_path.read_text(errors="replace")
        assert f"etcd member {killed_endpoint}" in log, f"{proc.name} never left the killed member:\n{proc.tail()}"
    # Both agents are still registered: their leases survived the member and the election.
    assert {n.name for n in cluster.nodes()} == set(NODES)


# ---- TLS with client certificates, and user auth ---------------------------------------------


def etcdctl_tls(pki: Pki, endpoint: str, *args: str) -> None:
    subprocess.run(["etcdctl", f"--endpoints={endpoint}", f"--cacert={pki.ca}", f"--cert={pki.client_cert}",
                    f"--key={pki.client_key}", *args], check=True, capture_output=True, timeout=30)


@pytest.fixture
def tls_etcd(tmp_path: Path) -> Iterator[tuple[LocalCluster, Pki]]:
    pki = make_pki(tmp_path / "pki")
    with LocalCluster() as c:
        endpoint = c.start_etcd(tls=EtcdServerTls(ca=pki.ca, cert=pki.server_cert, key=pki.server_key))
        assert endpoint.startswith("https://")
        etcdctl_tls(pki, endpoint, "user", "add", f"root:{ROOT_PASSWORD}")
        etcdctl_tls(pki, endpoint, "user", "grant-role", "root", "root")
        etcdctl_tls(pki, endpoint, "auth", "enable")
        yield c, pki


def test_a_migration_runs_over_tls_with_user_auth(tls_etcd: tuple[LocalCluster, Pki]) -> None:
    cluster, pki = tls_etcd
    # through the environment, as the Helm chart passes them
    cluster.env.update({"NVMIGRATE_ETCD_CA": str(pki.ca), "NVMIGRATE_ETCD_CERT": str(pki.client_cert),
                        "NVMIGRATE_ETCD_KEY": str(pki.client_key), "NVMIGRATE_ETCD_USER": "root",
                        "NVMIGRATE_ETCD_PASSWORD": ROOT_PASSWORD})
    cluster.start_with_agents(NODES)
    create_controller(cluster, "n1", "t1", 4 * MiB, write_iops=150)
    job = migrate(cluster, "t1", to="n2")
    ended = wait_phase(cluster, job.id, TERMINAL, timeout_s=120)
    assert migration_pb2.Phase.Name(ended.phase) == "COMPLETED", ended.reason
    assert verify(cluster, "n2", "t1").ok


def run_agent(cluster: LocalCluster, tmp_path: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("NVMIGRATE_ETCD")}
    return subprocess.run([sys.executable, "-m", "agent.main", "--name", "bad", "--etcd", cluster.etcd_endpoint,
                           "--data-dir", str(tmp_path / "bad")], capture_output=True, text=True, timeout=60,
                          env={**clean, **env})


def test_a_wrong_password_is_a_clear_error(tls_etcd: tuple[LocalCluster, Pki], tmp_path: Path) -> None:
    cluster, pki = tls_etcd
    done = run_agent(cluster, tmp_path, {"NVMIGRATE_ETCD_CA": str(pki.ca), "NVMIGRATE_ETCD_CERT": str(pki.client_cert),
                                         "NVMIGRATE_ETCD_KEY": str(pki.client_key), "NVMIGRATE_ETCD_USER": "root",
                                         "NVMIGRATE_ETCD_PASSWORD": "wrong"})
    assert done.returncode == 2, done.stderr
    assert "refused user 'root'" in done.stderr and "NVMIGRATE_ETCD_PASSWORD" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


def test_tls_without_the_ca_is_a_clear_error(tls_etcd: tuple[LocalCluster, Pki], tmp_path: Path) -> None:
    cluster, _ = tls_etcd
    done = run_agent(cluster, tmp_path, {})
    assert done.returncode == 2, done.stderr
    assert f"cannot reach etcd at {cluster.etcd_endpoint}" in done.stderr and "--etcd-ca" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
