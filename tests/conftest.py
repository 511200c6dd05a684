"""Shared fixtures: a real local cluster (etcd, orchestrator, agents as processes)."""

from __future__ import annotations

import shutil
from collections.abc import Iterator

import pytest

from orchctl.localcluster import LocalCluster


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if shutil.which("etcd") is None:
        skip = pytest.mark.skip(reason="etcd is not installed (apt-get install etcd-server)")
        for item in items:
            if "cluster" in getattr(item, "fixturenames", ()):
                item.add_marker(skip)


@pytest.fixture
def cluster() -> Iterator[LocalCluster]:
    """etcd + one orchestrator + agents n1, n2, n3; everything stopped by pid afterwards."""
    with LocalCluster() as c:
        c.start_etcd()
        c.start_orchestrator()
        for name in ("n1", "n2", "n3"):
            c.start_agent(name)
        yield c


@pytest.fixture(scope="module")
def bad_input_cluster() -> Iterator[LocalCluster]:
    """One cluster for the refusal tests, with controller c5 on n1 (no workload needed)."""
    from proto.v1 import agent_pb2

    with LocalCluster() as c:
        c.start_etcd()
        c.start_orchestrator()
        for name in ("n1", "n2"):
            c.start_agent(name)
        channel, n1 = c.agent_stub("n1")
        with channel:
            n1.CreateController(agent_pb2.CreateControllerRequest(controller_id="c5", namespace_bytes=1 << 20),
                                timeout=30)
        yield c
