"""GetInfo lists what an agent hosts even while a release closes one of its controllers: the
closed one is left out (it leaves the host's table right after), the listing does not fail.
Real etcd, real files; the agent's Host and AgentApi without their servers."""

from __future__ import annotations

from pathlib import Path

from agent.backends.emulated_hosting import EmulatedHosting
from agent.host import Host, HostedController
from agent.service import AgentApi
from cluster.store import EtcdStore
from proto.v1 import agent_pb2

MIB = 1 << 20


async def test_a_controller_closed_by_its_release_is_left_out_of_the_listing(
        store: EtcdStore, tmp_path: Path) -> None:
    hosting = EmulatedHosting(tmp_path, 8 * MIB)
    host = Host("n1", store, tmp_path, hosting, "127.0.0.1:1", "127.0.0.1", 0, 2)
    await host.receiver.start()
    kept, released = hosting.create("c1", MIB), hosting.create("c2", MIB)
    try:
        host.controllers = {"c1": HostedController(kept), "c2": HostedController(released)}
        released.close()  # the release closed it; it is still in the table for a moment

        info = await AgentApi(host).GetInfo(agent_pb2.GetInfoRequest(), context=None)  # type: ignore[arg-type]

        assert [c.controller_id for c in info.controllers] == ["c1"]
        assert info.node == "n1"
    finally:
        kept.close()
        await host.receiver.close()
        hosting.close()
