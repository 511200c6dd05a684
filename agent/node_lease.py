"""The agent's liveness in etcd: its node record under a lease, kept alive from a thread of its
own (`cluster.store_thread`) so that a busy event loop (many guests, the data plane, migrations
running away from this node) cannot starve the refresh and let etcd take this node for dead.

The main side hands over what the record says (`publish`); the thread refreshes the lease at a
third of its TTL and, when etcd has expired it anyway (the process was paused, etcd was frozen
or restarted), registers again under a new lease with the record it was last handed (and puts
the record back if it went while the lease lived).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading

from cluster.records import NodeRecord
from cluster.store import EtcdError, EtcdStore
from cluster.store_thread import StoreThread

log = logging.getLogger(__name__)

STOP_TIMEOUT_S = 5.0


class NodeLease:
    def __init__(self, endpoint: str, prefix: str, node: str, ttl_s: int) -> None:
        self.ttl_s = ttl_s
        self._thread = StoreThread(endpoint, prefix, f"node-lease-{node}")
        self._record_lock = threading.Lock()
        self._record: NodeRecord | None = None  # the latest record handed over by the main side
        self._lease_id = 0  # touched on the lease thread only
        self._write_lock: asyncio.Lock | None = None  # the lease thread's: one registration at a time
        self.expiries = 0  # how often etcd expired the lease under us

    async def start(self, record: NodeRecord) -> None:
        """Registers (lease and record) and starts keeping the lease alive; raises EtcdError when
        etcd cannot be reached."""
        self._thread.start()
        self._hand_over(record)
        try:
            await self._thread.call(self._register)
        except BaseException:
            await asyncio.to_thread(self._thread.stop, STOP_TIMEOUT_S)
            raise
        self._thread.submit(self._keep_alive)

    def _hand_over(self, record: NodeRecord) -> None:
        with self._record_lock:
            self._record = record

    def _latest(self) -> NodeRecord:
        with self._record_lock:
            assert self._record is not None
            return self._record

    def _lock(self) -> asyncio.Lock:
        if self._write_lock is None:
            self._write_lock = asyncio.Lock()  # created on, and used by, the lease thread's loop
        return self._write_lock

    async def publish(self, record: NodeRecord) -> None:
        """Writes `record` as this node's record (under the live lease), from the lease thread."""
        self._hand_over(record)
        await self._thread.call(self._put_latest)

    # ---- on the lease thread ----------------------------------------------------------------

    async def _register(self, store: EtcdStore) -> None:
        async with self._lock():
            await self._register_locked(store)

    async def _register_locked(self, store: EtcdStore) -> None:
        self._lease_id = await store.grant_lease(self.ttl_s)
        await store.put_node(self._latest(), self._lease_id)

    def _expired(self) -> None:
        log.warning("node lease expired; registering again")
        self.expiries += 1

    async def _put_latest(self, store: EtcdStore) -> None:
        async with self._lock():
            try:
                await store.put_node(self._latest(), self._lease_id)
            except EtcdError as exc:
                if "lease not found" not in str(exc):
                    raise
                self._expired()  # found by a write before the refresh saw it
                await self._register_locked(store)

    async def _keep_alive(self, store: EtcdStore) -> None:
        interval_s = max(self.ttl_s / 3.0, 0.2)
        while True:
            await asyncio.sleep(interval_s)
            try:
                async with self._lock():
                    if not await store.refresh_lease(self._lease_id):
                        self._expired()
                        await self._register_locked(store)
                    elif await store.get_node(self._latest().name) is None:
                        # the lease lives but the record went (deleted by hand): put it back
                        log.warning("node record missing under a live lease; writing it again")
                        await store.put_node(self._latest(), self._lease_id)
            except EtcdError as exc:
                log.warning("etcd unavailable for the node lease, retrying: %s", exc)

    async def _revoke(self, store: EtcdStore) -> None:
        with contextlib.suppress(EtcdError):
            await store.revoke_lease(self._lease_id)

    # ---- shutdown ---------------------------------------------------------------------------

    async def stop(self) -> None:
        """Deregisters (revokes the lease: the record goes at once) and stops the thread."""
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._thread.call(self._revoke), STOP_TIMEOUT_S)
        await asyncio.to_thread(self._thread.stop, STOP_TIMEOUT_S)
