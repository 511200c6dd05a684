"""A 200 GiB namespace with 1 GiB written migrates, and its verification passes within a deadline
that scales with the bytes written, not with the namespace's size: precopy moves the data extents
only, and both digests read only what may hold data. Real processes and a real client (qemu-io over
the controller's NBD export) write and check the data."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator

import pytest

from orchctl.localcluster import LocalCluster
from orchestrator.jobs import Job, Policy
from orchestrator.verification import deadline_s
from proto.v1 import agent_pb2, migration_pb2
from tests.clusterprobe import TERMINAL, migrate, wait_phase, wait_verified
from tests.nbdprobe import export

GiB, MiB = 1 << 30, 1 << 20
NAMESPACE_BYTES = 200 * GiB
# 1 GiB in four pieces spread over the namespace: (pattern, offset).
PIECES = [(0x11, 0), (0x22, 50 * GiB), (0x33, 120 * GiB), (0x44, NAMESPACE_BYTES - 256 * MiB)]


@pytest.fixture
def roomy(shared_etcd: str, etcd_prefix: str) -> Iterator[LocalCluster]:
    """Two agents that may hold a 200 GiB namespace (sparse files: only what is written takes space)."""
    with LocalCluster() as c:
        c.use_etcd(shared_etcd, etcd_prefix)
        c.start_orchestrator()
        c.start_agents(["n1", "n2"], capacity="256G")
        yield c


def qemu_io(uri: str, *commands: str) -> None:
    argv = ["qemu-io", "-f", "raw", uri]
    for command in commands:
        argv += ["-c", command]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0 and "Pattern verification failed" not in done.stdout, done.stdout + done.stderr


def test_a_sparse_200_gib_namespace_migrates_and_verifies_in_time_for_what_is_written(roomy: LocalCluster) -> None:
    channel, n1 = roomy.agent_stub("n1")
    with channel:
        n1.CreateController(agent_pb2.CreateControllerRequest(controller_id="big", namespace_bytes=NAMESPACE_BYTES),
                            timeout=60)
    source = export(roomy, "big")
    qemu_io(source.uri, *(f"write -P {pattern:#x} {offset} 256M" for pattern, offset in PIECES))

    job = migrate(roomy, "big", to="n2")
    job = wait_phase(roomy, job.id, TERMINAL, timeout_s=600)
    assert migration_pb2.Phase.Name(job.phase) == "COMPLETED", job.reason
    completed = time.monotonic()
    # Only the written gigabyte travelled (plus controller state), not the namespace.
    assert GiB <= job.bytes_transferred < GiB + 64 * MiB
    scaled = deadline_s(Job(id=job.id, controller_id="big", source_node="n1", namespace_bytes=NAMESPACE_BYTES,
                            policy=Policy(), created_at=job.created_at, bytes_transferred=job.bytes_transferred))
    assert scaled < 120, "the deadline must follow the written bytes, not the 200 GiB"
    job = wait_verified(roomy, job.id, timeout_s=scaled)
    assert time.monotonic() - completed < scaled
    assert job.verification == migration_pb2.VERIFICATION_PASSED, job.verification_note
    assert job.source_digest and job.source_digest == job.destination_digest

    moved = export(roomy, "big")
    assert moved.node == "n2"
    qemu_io(moved.uri, *(f"read -P {pattern:#x} {offset} 256M" for pattern, offset in PIECES),
            f"read -P 0 {256 * MiB} 1G", f"read -P 0 {150 * GiB} 1G")
