"""Mutual TLS on the gRPC ports and authorization by certificate identity, against a real
orchestrator and real agents with certificates from `orchctl certs`.

Each wrong identity is refused (PERMISSION_DENIED, or the handshake for no or a foreign
certificate) and nothing changes in etcd; a plaintext client gets nowhere; an agent cannot run
under another node's name; an operator's migration over TLS completes and verifies."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

from agent.dataplane.sender import DataPlaneError, DataSender
from cluster.grpc_tls import TlsFiles
from cluster.identity import METHOD_ROLES, Identity, Role, refusal
from orchctl import certs
from orchctl.localcluster import LocalCluster
from proto.v1 import agent_pb2, agent_pb2_grpc, migration_pb2, migration_pb2_grpc
from tests.clusterprobe import (
    CORRUPTED_FRAME,
    REPLAYED_FRAME,
    TERMINAL,
    create_controller,
    migrate,
    migrate_through_a_bad_frame,
    verify,
    wait_phase,
)
from tests.conftest import etcdctl

ROOT = Path(__file__).resolve().parents[1]
MiB = 1 << 20


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("pki")
    certs.init_cluster(directory, ["n1", "n2"], [], ["admin"], ["viewer"])
    return directory


@pytest.fixture(scope="module")
def tls_cluster(pki: Path, shared_etcd: str, request: pytest.FixtureRequest) -> Iterator[LocalCluster]:
    from tests.conftest import unique_prefix
    prefix = unique_prefix(f"{request.module.__name__}-mtls")
    try:
        with LocalCluster(tls_dir=pki, allow_fault_injection=True) as c:
            c.use_etcd(shared_etcd, prefix)
            c.start_with_agents(["n1", "n2"])
            yield c
    finally:
        etcdctl(shared_etcd, "del", "--prefix", prefix)


def etcd_state(cluster: LocalCluster) -> dict[str, str]:
    """What a refused call must not change: jobs, controllers, cordons, evacuations, predictions
    (node records are left out: agents rewrite theirs as their free space changes)."""
    return {what: etcdctl(cluster.etcd_endpoint, "get", "--prefix", f"{cluster.etcd_prefix}{what}/")
            for what in ("jobs", "active", "controllers", "cordon", "evacuations", "predictions")}


def orchctl(cluster: LocalCluster, pki: Path, *args: str, identity: str = "operator-admin",
            ) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "ORCHCTL_SERVER": cluster.orchestrator_address,
           "ORCHCTL_TLS_CA": str(pki / "ca.pem"), "ORCHCTL_TLS_CERT": str(pki / f"{identity}.pem"),
           "ORCHCTL_TLS_KEY": str(pki / f"{identity}.key")}
    return subprocess.run([sys.executable, "-m", "orchctl.cli", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=60)


# ---- the rule (pure) ----------------------------------------------------------------------------


def test_every_rpc_of_both_services_is_placed() -> None:
    for service in (migration_pb2.DESCRIPTOR.services_by_name["MigrationService"],
                    agent_pb2.DESCRIPTOR.services_by_name["AgentService"]):
        for method in service.methods:
            assert f"/{service.full_name}/{method.name}" in METHOD_ROLES, method.name


def test_roles_by_method() -> None:
    create = "/nvmigrate.v1.MigrationService/CreateMigration"
    assert refusal(Identity(Role.OPERATOR, "a"), create) is None
    assert "may not call CreateMigration" in str(refusal(Identity(Role.VIEWER, "v"), create))
    assert refusal(Identity(Role.VIEWER, "v"), "/nvmigrate.v1.MigrationService/ListMigrations") is None
    assert refusal(Identity(Role.AGENT, "n1"), "/nvmigrate.v1.AgentService/GetInfo") is None
    assert refusal(Identity(Role.AGENT, "n1"), "/nvmigrate.v1.AgentService/StartPrecopy") is not None
    assert "not open" in str(refusal(Identity(Role.OPERATOR, "a"), "/nvmigrate.v1.AgentService/Unknown"))


# ---- a real cluster ------------------------------------------------------------------------------


def test_an_operator_migrates_over_mutual_tls(tls_cluster: LocalCluster, pki: Path) -> None:
    create_controller(tls_cluster, "n1", "t1", 4 * MiB, write_iops=100)
    job = migrate(tls_cluster, "t1", to="n2")
    ended = wait_phase(tls_cluster, job.id, TERMINAL, timeout_s=120)
    assert migration_pb2.Phase.Name(ended.phase) == "COMPLETED", ended.reason
    assert verify(tls_cluster, "n2", "t1").ok
    listed = orchctl(tls_cluster, pki, "list", identity="viewer-viewer")
    assert listed.returncode == 0 and job.id in listed.stdout, listed.stderr


def _orchestrator_call(stub_channel: grpc.Channel) -> None:
    migration_pb2_grpc.MigrationServiceStub(stub_channel).CreateMigration(
        migration_pb2.CreateMigrationRequest(controller_id="t9"), timeout=10)


def _cordon(stub_channel: grpc.Channel) -> None:
    migration_pb2_grpc.MigrationServiceStub(stub_channel).CordonNode(
        migration_pb2.CordonNodeRequest(name="n2"), timeout=10)


def _agent_create(stub_channel: grpc.Channel) -> None:
    agent_pb2_grpc.AgentServiceStub(stub_channel).CreateController(
        agent_pb2.CreateControllerRequest(controller_id="t9", namespace_bytes=MiB), timeout=10)


def _agent_precopy(stub_channel: grpc.Channel) -> None:
    agent_pb2_grpc.AgentServiceStub(stub_channel).StartPrecopy(agent_pb2.StartPrecopyRequest(), timeout=10)


@pytest.mark.parametrize(("caller", "target", "call"), [
    (Identity(Role.VIEWER, "viewer"), "orchestrator", _orchestrator_call),
    (Identity(Role.VIEWER, "viewer"), "orchestrator", _cordon),
    (Identity(Role.AGENT, "n1"), "orchestrator", _orchestrator_call),
    (Identity(Role.OPERATOR, "admin"), "n1", _agent_create),
    (Identity(Role.OPERATOR, "admin"), "n1", _agent_precopy),
    (Identity(Role.AGENT, "n2"), "n1", _agent_create),
    (Identity(Role.VIEWER, "viewer"), "n1", _agent_precopy),
], ids=["viewer-migrates", "viewer-cordons", "agent-migrates", "operator-commands-agent",
        "operator-starts-precopy", "peer-agent-commands-agent", "viewer-commands-agent"])
def test_a_wrong_identity_is_refused_and_changes_nothing(tls_cluster: LocalCluster, caller: Identity, target: str,
                                                         call: Callable[[grpc.Channel], None]) -> None:
    before = etcd_state(tls_cluster)
    if target == "orchestrator":
        channel = tls_cluster.channel(tls_cluster.orchestrator_address, caller)
    else:
        node = tls_cluster.node(target)
        assert node is not None
        channel = tls_cluster.channel(node.address, caller, server_name=target)
    with channel, pytest.raises(grpc.RpcError) as caught:
        call(channel)
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED, caught.value.details()  # type: ignore[attr-defined]
    assert str(caller) in caught.value.details()  # type: ignore[attr-defined]
    assert etcd_state(tls_cluster) == before


def _foreign_pki(tmp_path: Path) -> Path:
    directory = tmp_path / "foreign"
    certs.init_cluster(directory, ["n1"], [], ["admin"], [])
    return directory


@pytest.mark.parametrize("how", ["plaintext", "no-client-certificate", "foreign-ca"])
def test_a_client_without_a_cluster_certificate_gets_nowhere(tls_cluster: LocalCluster, pki: Path, tmp_path: Path,
                                                             how: str) -> None:
    before = etcd_state(tls_cluster)
    address = tls_cluster.orchestrator_address
    ca = (pki / "ca.pem").read_bytes()
    if how == "plaintext":
        channel = grpc.insecure_channel(address)
    elif how == "no-client-certificate":
        channel = grpc.secure_channel(address, grpc.ssl_channel_credentials(ca))
    else:
        foreign = _foreign_pki(tmp_path)
        channel = grpc.secure_channel(address, grpc.ssl_channel_credentials(
            ca, (foreign / "operator-admin.key").read_bytes(), (foreign / "operator-admin.pem").read_bytes()))
    with channel, pytest.raises(grpc.RpcError) as caught:
        _cordon(channel)
    assert caught.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNAUTHENTICATED)  # type: ignore[attr-defined]
    assert etcd_state(tls_cluster) == before


def test_an_agent_cannot_run_under_another_nodes_name(pki: Path, tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "agent.main", "--name", "n2", "--etcd", "127.0.0.1:1",
                           "--data-dir", str(tmp_path / "d"), "--tls-ca", str(pki / "ca.pem"),
                           "--tls-cert", str(pki / "agent-n1.pem"), "--tls-key", str(pki / "agent-n1.key")],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    assert "names agent/n1, but this agent is --name n2" in done.stderr and "Traceback" not in done.stderr


def test_orchctl_wants_all_three_tls_files(tls_cluster: LocalCluster, pki: Path) -> None:
    done = orchctl(tls_cluster, pki, "list", "--tls-key", "")
    assert done.returncode == 2 and "--tls-key missing" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


# ---- the data plane ------------------------------------------------------------------------------


def tls_of(pki: Path, stem: str) -> TlsFiles:
    return TlsFiles((pki / "ca.pem").read_bytes(), (pki / f"{stem}.pem").read_bytes(),
                    (pki / f"{stem}.key").read_bytes(), cert_file=pki / f"{stem}.pem", key_file=pki / f"{stem}.key")


@pytest.mark.parametrize(("who", "refused_with"), [
    ("plaintext", "without answering HELLO"), ("agent-n2", "may not stream job"),
    ("operator-admin", "may not stream job"), ("agent-n1", ""),
])
async def test_the_data_plane_takes_a_job_only_from_its_source_agent(tls_cluster: LocalCluster, pki: Path, who: str,
                                                                   refused_with: str) -> None:
    """A destination prepared for a job from n1 takes its stream only over TLS from n1's agent."""
    job_id = f"mig-{abs(hash(who)) % 16**12:012x}"
    channel, n2 = tls_cluster.agent_stub("n2")
    with channel:
        prepared = n2.PrepareDestination(agent_pb2.PrepareDestinationRequest(
            ref=agent_pb2.MigrationRef(job_id=job_id, epoch=1, controller_id=f"dp-{who}"), namespace_bytes=MiB,
            state_format_version=n2.GetInfo(agent_pb2.GetInfoRequest(), timeout=10).state_format_version,
            source_node="n1"), timeout=30)
        try:
            tls = None if who == "plaintext" else tls_of(pki, who)
            connect = DataSender.connect(prepared.data_address, job_id, prepared.token, connect_timeout_s=10,
                                         ssl=tls.ssl_context(server=False) if tls else None, server_hostname="n2")
            if refused_with:
                with pytest.raises(DataPlaneError, match=refused_with):
                    await connect
            else:
                sender = await connect
                await sender.close()
        finally:
            n2.AbortMigration(agent_pb2.MigrationRef(job_id=job_id, epoch=1, controller_id=f"dp-{who}"), timeout=30)
    assert "Traceback" not in tls_cluster.agents["n2"].log_path.read_text(errors="replace")


async def test_the_source_refuses_a_destination_with_another_nodes_certificate(tls_cluster: LocalCluster,
                                                                                pki: Path) -> None:
    node = tls_cluster.node("n2")
    assert node is not None
    tls = tls_of(pki, "agent-n1")
    with pytest.raises(DataPlaneError, match="not node 'n3'"):
        await DataSender.connect(node.data_address, "mig-000000000001", "t", connect_timeout_s=10,
                                 ssl=tls.ssl_context(server=False), server_hostname="n3")


def test_a_tampered_frame_under_tls_is_detected_and_the_job_rolls_back(tls_cluster: LocalCluster) -> None:
    migrate_through_a_bad_frame(tls_cluster, "t3", 8 * MiB, 200, ["n1", "n2"], CORRUPTED_FRAME)


def test_a_replayed_frame_under_tls_is_detected_and_the_job_rolls_back(tls_cluster: LocalCluster) -> None:
    # TLS stops a third party from injecting a frame; this is the source's own stream replaying one.
    migrate_through_a_bad_frame(tls_cluster, "t3r", 8 * MiB, 200, ["n1", "n2"], REPLAYED_FRAME)
