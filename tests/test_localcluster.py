"""LocalCluster on an etcd it did not start: it uses it under its own prefix and never stops it."""

from __future__ import annotations

import pytest

from orchctl.localcluster import ClusterError, LocalCluster
from tests.conftest import etcdctl


def test_a_cluster_never_stops_an_etcd_it_did_not_start(shared_etcd: str, etcd_prefix: str) -> None:
    with LocalCluster() as c:
        c.use_etcd(shared_etcd, etcd_prefix)
        assert (c.etcd_endpoint, c.etcd_prefix) == (shared_etcd, etcd_prefix)
        for refused in (c.stop_etcd, c.restart_etcd):
            with pytest.raises(ClusterError, match=f"the etcd at {shared_etcd} was not started by this cluster"):
                refused()
        with pytest.raises(ClusterError, match="already has etcd"):
            c.start_etcd()
    # after the cluster's cleanup, the shared etcd still answers
    etcdctl(shared_etcd, "put", f"{etcd_prefix}probe", "1")
    assert etcdctl(shared_etcd, "get", f"{etcd_prefix}probe", "--print-value-only").strip() == "1"


def test_use_etcd_refuses_a_bad_prefix(shared_etcd: str) -> None:
    with LocalCluster() as c, pytest.raises(ClusterError, match="'nvmigrate' must start and end with '/'"):
        c.use_etcd(shared_etcd, "nvmigrate")


def test_stop_etcd_without_one_says_so() -> None:
    with LocalCluster() as c, pytest.raises(ClusterError, match="etcd was never started"):
        c.stop_etcd()
