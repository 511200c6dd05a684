"""Agents publish their drive's SMART / Health log in their node record; the emulated drive's
failure signals can be injected. Real agent processes and etcd."""

from __future__ import annotations

import grpc
import pytest

from cluster.records import NodeRecord
from orchctl.localcluster import LocalCluster, wait_for
from orchestrator.health_policy import HealthPolicy, failing_reasons
from proto.v1 import agent_pb2
from tests.conftest import etcdctl


def node_record(cluster: LocalCluster, name: str) -> NodeRecord | None:
    raw = etcdctl(cluster.etcd_endpoint, "get", "--print-value-only", f"{cluster.etcd_prefix}nodes/{name}")
    return NodeRecord.from_bytes(raw.encode()) if raw.strip() else None


def test_an_injected_failing_drive_shows_in_the_node_record_and_the_policy_names_why(cluster: LocalCluster) -> None:
    healthy = node_record(cluster, "n2")
    assert healthy is not None and healthy.health is not None
    assert failing_reasons(healthy.health, HealthPolicy()) == []
    channel, stub = cluster.agent_stub("n2")
    with channel:
        stub.InjectFault(agent_pb2.InjectFaultRequest(health=agent_pb2.DriveHealthFault(
            available_spare=4, media_errors=7)), timeout=5)

        def published() -> NodeRecord | None:
            record = node_record(cluster, "n2")
            return record if record is not None and record.health is not None \
                and record.health.media_errors == 7 else None
        record = wait_for("n2's record to carry the injected health", published, 30)
        assert record.health is not None and record.health.available_spare == 4
        reasons = failing_reasons(record.health, HealthPolicy())
        assert "critical warning: available spare below its threshold" in reasons
        assert "7 media errors (limit 0)" in reasons
        # a value no drive reports is refused, naming it
        with pytest.raises(grpc.RpcError) as refused:
            stub.InjectFault(agent_pb2.InjectFaultRequest(health=agent_pb2.DriveHealthFault(
                temperature_k=70000)), timeout=5)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "temperature_k=70000 must be an integer from 0 to 65535" in str(refused.value.details())
    other = node_record(cluster, "n1")
    assert other is not None and other.health is not None and other.health.media_errors == 0
