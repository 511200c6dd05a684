"""One holder per node name, against the real etcd: the claim is a transaction, later writes
compare the claim's create revision, and `await_name_free` waits out a silent holder's lease but
refuses an answering one (or one that keeps its lease alive without answering)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest

from agent.node_lease import NodeNameHeld, await_name_free
from cluster.records import NodeRecord
from cluster.store import EtcdStore, keep_lease_alive

MiB = 1 << 20


def record(address: str, started_at: float = 1_700_000_000.0) -> NodeRecord:
    return NodeRecord(name="n1", address=address, data_address="127.0.0.1:2", capacity_bytes=4 * MiB,
                      started_at=started_at)


@pytest.fixture
async def other(shared_etcd: str, etcd_prefix: str) -> AsyncIterator[EtcdStore]:
    second = EtcdStore(shared_etcd, prefix=etcd_prefix)
    await second.connect()
    try:
        yield second
    finally:
        await second.close()


async def test_a_name_is_claimed_once_and_rewritten_only_by_its_claimant(store: EtcdStore, other: EtcdStore) -> None:
    mine, theirs = await store.grant_lease(10), await other.grant_lease(10)
    revision = await store.claim_node(record("127.0.0.1:1"), mine)
    assert revision is not None
    assert await other.claim_node(record("127.0.0.1:9"), theirs) is None  # held: refused, nothing written
    holder = await other.node_holder("n1")
    assert holder is not None and holder.record.address == "127.0.0.1:1"
    assert holder.create_revision == revision and holder.lease_id == mine
    assert await store.update_node(record("127.0.0.1:1", 2.0), mine, revision)
    assert not await other.update_node(record("127.0.0.1:9"), theirs, revision + 1)  # not its claim
    await store.revoke_lease(mine)  # the record goes with the lease: a later write by the old claim fails
    assert not await store.update_node(record("127.0.0.1:1"), theirs, revision)
    assert await other.claim_node(record("127.0.0.1:9"), theirs) is not None


async def test_an_answering_holder_refuses_the_name(store: EtcdStore, other: EtcdStore) -> None:
    lease = await other.grant_lease(10)
    await other.claim_node(record("127.0.0.1:1"), lease)

    async def answers_as_n1(address: str) -> str | None:
        return "n1" if address == "127.0.0.1:1" else None

    with pytest.raises(NodeNameHeld, match=r"^node name 'n1' is held by a live agent at 127\.0\.0\.1:1 "
                                           r"\(registered since 2023-11-14 22:13:20 UTC\); stop it or choose "
                                           r"another --name$"):
        await await_name_free(store, "n1", answers_as_n1)


async def silent(address: str) -> str | None:
    return None


async def test_a_silent_holder_is_waited_out_until_its_lease_expires(store: EtcdStore, other: EtcdStore) -> None:
    lease = await other.grant_lease(1)
    await other.claim_node(record("127.0.0.1:1"), lease)
    await asyncio.wait_for(await_name_free(store, "n1", silent, margin_s=10), 30)
    assert await store.node_holder("n1") is None


async def test_a_silent_holder_that_keeps_its_lease_alive_is_refused_after_the_wait(
        store: EtcdStore, other: EtcdStore) -> None:
    lease = await other.grant_lease(1)
    await other.claim_node(record("127.0.0.1:1"), lease)
    keeper = asyncio.create_task(keep_lease_alive(other, lease, 1))
    try:
        with pytest.raises(NodeNameHeld, match="keeps its lease alive but has not answered there"):
            await asyncio.wait_for(await_name_free(store, "n1", silent, margin_s=1), 30)
    finally:
        keeper.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await keeper
        await other.revoke_lease(lease)
