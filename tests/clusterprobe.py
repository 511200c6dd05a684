"""What the integration tests ask of a running cluster: small synchronous calls with deadlines."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

import grpc

from orchctl.localcluster import LocalCluster, wait_for
from proto.v1 import agent_pb2, migration_pb2

TERMINAL = {migration_pb2.COMPLETED, migration_pb2.ROLLED_BACK, migration_pb2.FAILED, migration_pb2.CANCELLED}


def orchctl(cluster: LocalCluster, *args: str, timeout_s: float = 120) -> subprocess.CompletedProcess[str]:
    """The operator CLI as a process against the cluster's orchestrator (wide, so no line wraps)."""
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "orchctl.cli", "--server", cluster.orchestrator_address, *args],
                          capture_output=True, text=True, timeout=timeout_s, env=env, check=False)


def create_controller(cluster: LocalCluster, node: str, cid: str, namespace_bytes: int,
                      write_iops: int = 400) -> agent_pb2.ControllerStatus:
    channel, stub = cluster.agent_stub(node)
    with channel:
        status = stub.CreateController(agent_pb2.CreateControllerRequest(
            controller_id=cid, namespace_bytes=namespace_bytes, prefill=True,
            workload=agent_pb2.WorkloadSpec(write_iops=write_iops, seed=7)), timeout=120)
        wait_for(f"guest writes on {cid}", lambda: controller(cluster, node, cid).workload.acked_writes > 50, 60)
    return status


def controller(cluster: LocalCluster, node: str, cid: str) -> agent_pb2.ControllerStatus:
    channel, stub = cluster.agent_stub(node)
    with channel:
        return stub.GetController(agent_pb2.GetControllerRequest(controller_id=cid), timeout=10)


def controller_missing(cluster: LocalCluster, node: str, cid: str) -> bool:
    try:
        controller(cluster, node, cid)
    except grpc.RpcError as exc:
        return exc.code() == grpc.StatusCode.NOT_FOUND  # type: ignore[attr-defined, no-any-return]
    return False


def verify(cluster: LocalCluster, node: str, cid: str,
           receipts: Sequence[agent_pb2.Receipt] = ()) -> agent_pb2.VerifyResponse:
    channel, stub = cluster.agent_stub(node)
    with channel:
        return stub.Verify(agent_pb2.VerifyRequest(controller_id=cid, receipts=receipts), timeout=120)


def migrate(cluster: LocalCluster, cid: str, to: str = "", **policy: Any) -> migration_pb2.Migration:
    channel, api = cluster.migration_stub()
    with channel:
        return api.CreateMigration(migration_pb2.CreateMigrationRequest(
            controller_id=cid, destination_node=to, policy=migration_pb2.ConvergencePolicy(**policy)), timeout=10)


def get_job(cluster: LocalCluster, job_id: str) -> migration_pb2.Migration:
    channel, api = cluster.migration_stub()
    with channel:
        return api.GetMigration(migration_pb2.GetMigrationRequest(id=job_id), timeout=10)


def wait_phase(cluster: LocalCluster, job_id: str, phases: set[Any], timeout_s: float = 120,
               also: object = None) -> migration_pb2.Migration:
    def probe() -> migration_pb2.Migration | None:
        try:
            job = get_job(cluster, job_id)
        except grpc.RpcError:
            return None  # orchestrator restarting
        if job.phase in phases and (also is None or also(job)):  # type: ignore[operator]
            return job
        if job.phase in TERMINAL and not phases & TERMINAL:
            raise AssertionError(f"job ended {migration_pb2.Phase.Name(job.phase)} ({job.reason}) before reaching "
                                 f"{[migration_pb2.Phase.Name(p) for p in phases]}")
        return None
    return wait_for(f"job {job_id} to reach {[migration_pb2.Phase.Name(p) for p in phases]}", probe, timeout_s,
                    interval_s=0.05)


def wait_verified(cluster: LocalCluster, job_id: str, timeout_s: float = 120) -> migration_pb2.Migration:
    """Waits for a completed job's verification verdict (it comes after COMPLETED)."""
    def probe() -> migration_pb2.Migration | None:
        try:
            job = get_job(cluster, job_id)
        except grpc.RpcError:
            return None  # orchestrator restarting
        if job.phase != migration_pb2.COMPLETED:
            raise AssertionError(f"job {job_id} is {migration_pb2.Phase.Name(job.phase)}, not COMPLETED: "
                                 "only a completed job is verified")
        return job if job.verification != migration_pb2.VERIFICATION_PENDING else None
    return wait_for(f"job {job_id}'s verification", probe, timeout_s, interval_s=0.05)


def owners(cluster: LocalCluster) -> dict[str, str]:
    channel, api = cluster.migration_stub()
    with channel:
        return {c.id: c.node for c in api.ListControllers(migration_pb2.ListControllersRequest(), timeout=10)
                .controllers}


def _inside_prefix(cluster: LocalCluster, key: str) -> None:
    # A key outside the cluster's prefix holds nothing of it: an assertion on it would pass vacuously.
    if not key.startswith(cluster.etcd_prefix):
        raise AssertionError(f"etcd key {key!r} is outside this cluster's prefix {cluster.etcd_prefix!r}")


def etcd_json(cluster: LocalCluster, key: str) -> dict[str, object] | None:
    """Reads a record with etcdctl, a client that is not ours."""
    _inside_prefix(cluster, key)
    done = subprocess.run(["etcdctl", f"--endpoints={cluster.etcd_endpoint}", "get", key, "--print-value-only"],
                          capture_output=True, text=True, check=True, env={"ETCDCTL_API": "3"})
    out = done.stdout.strip()
    return json.loads(out) if out else None


def etcd_keys(cluster: LocalCluster, prefix: str) -> list[str]:
    _inside_prefix(cluster, prefix)
    done = subprocess.run(["etcdctl", f"--endpoints={cluster.etcd_endpoint}", "get", prefix, "--prefix",
                           "--keys-only"], capture_output=True, text=True, check=True, env={"ETCDCTL_API": "3"})
    return [line for line in done.stdout.splitlines() if line.strip()]


def running_on(cluster: LocalCluster, cid: str, nodes: list[str]) -> list[str]:
    """Nodes where the controller accepts guest I/O right now (invariant 1: at most one)."""
    found = []
    for node in nodes:
        try:
            status = controller(cluster, node, cid)
        except grpc.RpcError:
            continue
        if status.vfio_state in ("RUNNING", "PRE_COPY"):
            found.append(node)
    return found


def wait_more_writes(cluster: LocalCluster, node: str, cid: str, than: int, timeout_s: float = 30) -> int:
    """Waits until the guest on `node` has acknowledged more than `than` writes; returns the count."""
    def probe() -> int | None:
        acked = int(controller(cluster, node, cid).workload.acked_writes)
        return acked if acked > than else None
    return wait_for(f"{cid} on {node} to acknowledge more than {than} writes", probe, timeout_s)


def replace_orchestrator(cluster: LocalCluster, name: str) -> None:
    """Kills the running orchestrator (SIGKILL: no resign, its lease must expire) and starts
    another, which takes over the jobs once it leads."""
    cluster.orchestrators[0].kill()
    cluster.orchestrators.clear()
    cluster.orchestrator_address = ""
    cluster.start_orchestrator(name=name)


# What a source is told to do to its data-plane frames, and what the rolled-back job's reason says of it.
CORRUPTED_FRAME = (agent_pb2.InjectFaultRequest(corrupt_frame=3), ("checksum", "corrupt"))
REPLAYED_FRAME = (agent_pb2.InjectFaultRequest(replay_frame=3), ("replayed or out of order",))


def migrate_through_a_bad_frame(cluster: LocalCluster, cid: str, namespace_bytes: int, write_iops: int,
                                nodes: list[str], bad: tuple[agent_pb2.InjectFaultRequest, tuple[str, ...]]) -> None:
    """Controller `cid` on nodes[0] migrates to nodes[1] with its source told to damage a
    data-plane frame (`bad`: CORRUPTED_FRAME flips a byte of the third frame after its checksum,
    REPLAYED_FRAME sends it twice): the job must roll back for that reason, and the controller run
    on the source alone with every acknowledged write there."""
    fault, reason_words = bad
    source, destination = nodes[0], nodes[1]
    create_controller(cluster, source, cid, namespace_bytes, write_iops=write_iops)
    channel, stub = cluster.agent_stub(source)
    with channel:
        stub.InjectFault(fault, timeout=5)
    job = wait_phase(cluster, migrate(cluster, cid, to=destination).id, TERMINAL)
    assert migration_pb2.Phase.Name(job.phase) == "ROLLED_BACK", job.reason
    assert any(word in job.reason for word in reason_words), job.reason
    assert running_on(cluster, cid, nodes) == [source]
    result = verify(cluster, source, cid)
    assert result.ok, result.first_mismatch
