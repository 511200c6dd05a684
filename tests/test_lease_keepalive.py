"""Lease refreshes ride one LeaseKeepAlive stream per etcd connection (cluster.lease_keepalive):
against the real etcd, many leases refreshed at once are each answered for, a gone lease answers
TTL 0, etcd starts one stream for any number of refreshes, and a stream that ended is replaced."""

from __future__ import annotations

import asyncio
import urllib.request

from cluster.store import EtcdStore

STREAMS_STARTED = 'grpc_server_started_total{grpc_method="LeaseKeepAlive"'


def keepalive_streams_started(endpoint: str) -> float:
    """etcd's own count of LeaseKeepAlive streams opened so far (all clients of the shared etcd)."""
    text = urllib.request.urlopen(f"http://{endpoint}/metrics", timeout=10).read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(STREAMS_STARTED))


async def test_many_leases_refresh_at_once_over_one_stream(store: EtcdStore, shared_etcd: str) -> None:
    leases = [await store.grant_lease(30) for _ in range(50)]
    await store.refresh_lease(leases[0])  # the stream is open
    before = keepalive_streams_started(shared_etcd)
    for _ in range(3):
        answers = await asyncio.gather(*(store.refresh_lease(lease) for lease in leases))
        assert all(answers)
    # other tests share this etcd, but none runs beside this one: what started meanwhile is ours
    assert keepalive_streams_started(shared_etcd) - before == 0
    for lease in leases:
        await store.revoke_lease(lease)


async def test_a_gone_lease_answers_that_it_is_gone_and_the_others_still_refresh(store: EtcdStore) -> None:
    kept, gone = await store.grant_lease(30), await store.grant_lease(30)
    await store.revoke_lease(gone)
    assert await asyncio.gather(store.refresh_lease(kept), store.refresh_lease(gone)) == [True, False]
    await store.revoke_lease(kept)


async def test_a_stream_that_ended_is_replaced_at_the_next_refresh(store: EtcdStore, shared_etcd: str) -> None:
    lease = await store.grant_lease(30)
    assert await store.refresh_lease(lease)
    stream = store._client._keepalive
    assert stream is not None
    stream.close()  # as when etcd ends it (a member restarting)
    before = keepalive_streams_started(shared_etcd)
    assert await store.refresh_lease(lease)
    assert store._client._keepalive is not stream and keepalive_streams_started(shared_etcd) - before == 1
    await store.revoke_lease(lease)
