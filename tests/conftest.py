"""Shared fixtures. One real etcd serves the whole session; each test that needs etcd gets a key
prefix of its own in it: an `EtcdStore` (`store`), or a local cluster of real processes
(`cluster`, `bad_input_cluster`). Tests that stop, restart, freeze or partition etcd start an etcd
of their own (`LocalCluster.start_etcd`)."""

from __future__ import annotations

import re
import shutil
import subprocess
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest

from agent.dataplane.receiver import DataReceiver
from agent.guest.workload import GuestWorkload
from cluster.store import EtcdStore
from orchctl.localcluster import LocalCluster

NEEDS_ETCD = ("shared_etcd", "cluster", "bad_input_cluster")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if shutil.which("etcd") is None or shutil.which("etcdctl") is None:
        skip = pytest.mark.skip(reason="etcd is not installed (apt-get install etcd-server etcd-client)")
        for item in items:
            if any(name in getattr(item, "fixturenames", ()) for name in NEEDS_ETCD):
                item.add_marker(skip)


def unique_prefix(name: str) -> str:
    """A key prefix nobody else uses, named after the test so a leftover key says whose it is."""
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:48]
    return f"/nvmigrate-test/{slug}-{uuid.uuid4().hex[:8]}/"


def etcdctl(endpoint: str, *args: str) -> str:
    """etcdctl, a client that is not ours, against `endpoint`."""
    done = subprocess.run(["etcdctl", f"--endpoints={endpoint}", *args], capture_output=True, text=True,
                          timeout=30, check=True, env={"ETCDCTL_API": "3"})
    return done.stdout


@pytest.fixture(scope="session")
def shared_etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One etcd process for the session, on a free port, data in a temp dir; stopped by pid at the
    end. Yields its endpoint, HOST:PORT."""
    with LocalCluster(workdir=tmp_path_factory.mktemp("shared-etcd"), _owns_workdir=False) as etcd:
        yield etcd.start_etcd()


@pytest.fixture
def etcd_prefix(request: pytest.FixtureRequest, shared_etcd: str) -> Iterator[str]:
    """This test's own key prefix in the shared etcd; its keys are deleted afterwards."""
    prefix = unique_prefix(request.node.name)
    yield prefix
    etcdctl(shared_etcd, "del", "--prefix", prefix)


@pytest.fixture
async def store(shared_etcd: str, etcd_prefix: str) -> AsyncIterator[EtcdStore]:
    """An EtcdStore on the shared etcd, under this test's prefix."""
    opened = EtcdStore(shared_etcd, prefix=etcd_prefix)
    await opened.connect()
    try:
        yield opened
    finally:
        await opened.close()


@pytest.fixture
async def receiver() -> AsyncIterator[DataReceiver]:
    """A data-plane receiver on loopback, in this test's event loop."""
    r = DataReceiver("127.0.0.1")
    await r.start()
    try:
        yield r
    finally:
        await r.close()


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Callable[..., Path]]:
    """Mounts a real tmpfs, a disk that fills: `tmpfs(name, size="8m", nr_inodes=...)` returns
    its mount point under this test's tmp dir. Every mount is unmounted afterwards."""
    mounted: list[Path] = []

    def mount(name: str, size: str = "8m", nr_inodes: int | None = None) -> Path:
        point = tmp_path / name
        point.mkdir(parents=True, exist_ok=True)
        options = f"size={size}" + (f",nr_inodes={nr_inodes}" if nr_inodes is not None else "")
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(point)], capture_output=True,
                              text=True, timeout=30)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.strip()}")
        mounted.append(point)
        return point

    yield mount
    for point in reversed(mounted):
        subprocess.run(["umount", "-l", str(point)], capture_output=True, timeout=30, check=False)


@pytest.fixture
def cluster(shared_etcd: str, etcd_prefix: str) -> Iterator[LocalCluster]:
    """One orchestrator + agents n1, n2, n3 on the shared etcd under this test's prefix; every
    process stopped by pid afterwards."""
    with LocalCluster(allow_fault_injection=True) as c:
        c.use_etcd(shared_etcd, etcd_prefix)
        c.start_with_agents(["n1", "n2", "n3"])
        yield c


@pytest.fixture(scope="module")
def fleet(request: pytest.FixtureRequest, shared_etcd: str) -> Iterator[LocalCluster]:
    """Agents n1, n2 (1 GiB declared each) and an orchestrator, shared by a module's tests; each
    test deletes the controllers it made."""
    prefix = unique_prefix(request.module.__name__)
    try:
        with LocalCluster() as c:
            c.use_etcd(shared_etcd, prefix)
            c.start_orchestrator()
            c.start_agents(["n1", "n2"], capacity="1G")
            yield c
    finally:
        etcdctl(shared_etcd, "del", "--prefix", prefix)


def api(c: LocalCluster) -> Callable[..., object]:
    """MigrationService's `method` called with `request` on a fresh channel."""
    def call(method: str, request: object, timeout: float = 60.0) -> object:
        channel, stub = c.migration_stub()
        with channel:
            return getattr(stub, method)(request, timeout=timeout)
    return call


@pytest.fixture(scope="module")
def bad_input_cluster(request: pytest.FixtureRequest, shared_etcd: str) -> Iterator[LocalCluster]:
    """One cluster for the refusal tests, with controller c5 on n1 (no workload needed)."""
    from proto.v1 import agent_pb2

    prefix = unique_prefix(f"{request.module.__name__}-bad-input")
    try:
        with LocalCluster() as c:
            c.use_etcd(shared_etcd, prefix)
            c.start_with_agents(["n1", "n2"])
            channel, n1 = c.agent_stub("n1")
            with channel:
                n1.CreateController(agent_pb2.CreateControllerRequest(controller_id="c5", namespace_bytes=1 << 20),
                                    timeout=30)
            yield c
    finally:
        etcdctl(shared_etcd, "del", "--prefix", prefix)


@pytest.fixture
def guests() -> Iterator[list[GuestWorkload]]:
    """Every workload a test starts is stopped, even when the test fails."""
    started: list[GuestWorkload] = []
    yield started
    for g in started:
        g.stop()
