"""The agent-call layer against a real agent process: one deadline per call that its budget caps."""

from __future__ import annotations

import os
import signal
import time

import pytest

from cluster.store import EtcdStore
from orchctl.localcluster import LocalCluster
from orchestrator.agent_calls import AgentCalls, AgentUnreachable
from proto.v1 import agent_pb2


async def test_a_frozen_agent_costs_a_call_its_budget_not_its_rpc_timeout(cluster: LocalCluster) -> None:
    store = EtcdStore(cluster.etcd_endpoint, prefix=cluster.etcd_prefix)
    await store.connect()
    calls = AgentCalls(store)
    agent = cluster.agents["n1"]
    try:
        info = await calls.call("n1", "GetInfo", lambda s: s.GetInfo(agent_pb2.GetInfoRequest(), timeout=5.0),
                                budget_s=5.0)
        assert info.node == "n1"
        os.kill(agent.popen.pid, signal.SIGSTOP)  # alive, answering nothing
        started = time.monotonic()
        with pytest.raises(AgentUnreachable, match="did not answer within 1 s"):
            # The RPC's own timeout (60 s) would keep a caller waiting a minute; the budget is 1 s.
            await calls.call("n1", "GetInfo", lambda s: s.GetInfo(agent_pb2.GetInfoRequest(), timeout=60.0),
                             budget_s=1.0)
        assert time.monotonic() - started < 30.0
    finally:
        os.kill(agent.popen.pid, signal.SIGCONT)
        await calls.close()
        await store.close()
