"""The orchestrator's node cache against a real etcd: it follows registrations, changes and
removals through its watch, reads a node it does not hold from etcd, and after its watch is lost
(the etcd member it streamed from stopped) lists again and sees what changed meanwhile."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import replace

import pytest

from cluster.node_cache import NodeCache
from cluster.records import NodeRecord
from cluster.store import EtcdStore
from orchctl.localcluster import LocalCluster

MiB = 1 << 20
WAIT_S = 30.0


def node(name: str, **changes: object) -> NodeRecord:
    record = NodeRecord(name=name, address=f"127.0.0.1:{1000 + int(name[1:])}", data_address="127.0.0.1:2",
                        capacity_bytes=64 * MiB)
    return replace(record, **changes)  # type: ignore[arg-type]


async def eventually(what: str, probe: Callable[[], Awaitable[bool]], timeout_s: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not await probe():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        await asyncio.sleep(0.02)


async def cached(cache: NodeCache) -> dict[str, NodeRecord] | None:
    """What the cache holds, read from memory; None while it is not synced (reads would go to etcd)."""
    if not cache.synced:
        return None
    return {n.name: n for n in await cache.list_nodes()}


async def first_list(cache: NodeCache) -> None:
    async def synced() -> bool:
        return cache.synced
    await eventually("the cache's first list", synced)


@pytest.fixture
async def cache(store: EtcdStore) -> AsyncIterator[NodeCache]:
    following = NodeCache(store)
    following.start()
    try:
        yield following
    finally:
        await following.stop()


async def test_the_cache_sees_a_node_registered_changed_and_removed(store: EtcdStore, cache: NodeCache) -> None:
    await first_list(cache)
    assert await cached(cache) == {}
    listed_at = cache.revision

    lease = await store.grant_lease(30)
    revision = await store.claim_node(node("n1"), lease)
    assert revision is not None
    assert await cache.wait_for(revision, WAIT_S)
    assert await cached(cache) == {"n1": node("n1")}

    changed = node("n1", allocated_bytes=8 * MiB, controllers=("c1",))
    assert await store.update_node(changed, lease, revision)

    async def has_changed() -> bool:
        return (await cached(cache) or {}).get("n1") == changed
    await eventually("the change of n1", has_changed)
    assert cache.revision > revision > listed_at
    # parsed once per change: two reads hand out the same record
    first, again = await cache.list_nodes(), await cache.list_nodes()
    assert first[0] is again[0]

    await store.revoke_lease(lease)

    async def removed() -> bool:
        return await cached(cache) == {}
    await eventually("n1 removed with its lease", removed)
    assert cache.relists == 1  # all of it came through the one watch


async def test_a_node_the_cache_does_not_hold_is_read_from_etcd(store: EtcdStore) -> None:
    lease = await store.grant_lease(30)
    await store.put_node(node("n7"), lease)
    unstarted = NodeCache(store)  # nothing listed yet: every read goes to etcd
    assert not unstarted.synced
    assert await unstarted.get_node("n7") == node("n7")
    assert await unstarted.get_node("n8") is None
    assert [n.name for n in await unstarted.list_nodes()] == ["n7"]

    unstarted.start()
    try:
        await first_list(unstarted)
        # registered right now: asked at once, before the watch could have brought it
        await store.put_node(node("n8"), lease)
        assert await unstarted.get_node("n8") == node("n8")
    finally:
        await unstarted.stop()
    await store.revoke_lease(lease)


@pytest.fixture
def three_members() -> Iterator[LocalCluster]:
    with LocalCluster() as c:
        c.start_etcd_cluster(3)
        yield c


async def test_the_cache_lists_again_after_its_watch_is_lost(three_members: LocalCluster) -> None:
    endpoints = three_members.etcd_endpoint.split(",")
    # the cache's client starts on member 0; the writer talks to member 2 only
    reader, writer = EtcdStore(three_members.etcd_endpoint), EtcdStore(endpoints[2])
    await reader.connect()
    await writer.connect()
    cache = NodeCache(reader)
    try:
        lease = await writer.grant_lease(60)
        await writer.put_node(node("n1"), lease)
        cache.start()

        async def holds_n1() -> bool:
            return await cached(cache) == {"n1": node("n1")}
        await eventually("n1 in the cache", holds_n1)
        assert cache.relists == 1

        three_members.etcd_members[0].stop()  # the member the watch streams from
        await writer.put_node(node("n2"), lease)  # while the watch is gone
        await writer.put_node(node("n1", allocated_bytes=MiB), lease)

        async def caught_up() -> bool:
            return await cached(cache) == {"n1": node("n1", allocated_bytes=MiB), "n2": node("n2")}
        await eventually("the cache to list again from another member", caught_up)
        assert cache.relists >= 2

        # and the new watch follows changes again
        await writer.put_node(node("n3"), lease)

        async def holds_n3() -> bool:
            return "n3" in (await cached(cache) or {})
        await eventually("n3 through the new watch", holds_n3)
    finally:
        await cache.stop()
        await reader.close()
        await writer.close()
