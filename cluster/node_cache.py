"""The registered nodes, kept in memory by an etcd watch, for reads that may be a moment old.

Placement, listings and the reconciler read every node record; at a thousand agents, reading and
parsing them all for each job's placement and each CreateMigration was a third of the
orchestrator's time. Here they are listed once at a revision, then followed by a watch from the
next revision: each record is parsed once per change, and a read costs no etcd round trip.

What the cache answers may lag etcd by the watch's delivery time (milliseconds), so it serves only
decisions that are re-checked later or are harmless when a moment old (choosing a destination: the
destination itself refuses what does not fit; listing nodes). Decisions that must see etcd as it
is now (is a silent source's lease still kept?) read the store. A node the cache does not hold is
read from etcd before anyone is told it is not there: an agent registered a moment ago is found.

While the watch is broken (etcd restarting, a member failed over, history compacted) the cache is
not trusted: reads go to etcd until a new list has been taken and a new watch follows it. A full
re-list also runs every RESYNC_S as a safety net: aetcd ignores a cancellation the server sends
without a compaction revision, and such a watch would fall silent.

Owned by the orchestrator: `start()` starts its background task (which owns the watch's consumer
task), `stop()` cancels both.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Protocol

from aetcd import rtypes

from cluster.records import NodeRecord
from cluster.store import EtcdError, EtcdStore

log = logging.getLogger(__name__)

CHECK_S = 2.0  # how often a quiet watch is checked (client moved to another member? resync due?)
RESYNC_S = 300.0
RETRY_MAX_S = 5.0


class NodeSource(Protocol):
    """Where node records are read: the store itself (always current), or a `NodeCache`."""

    async def list_nodes(self) -> list[NodeRecord]: ...

    async def get_node(self, name: str) -> NodeRecord | None: ...


class NodeCache:
    def __init__(self, store: EtcdStore) -> None:
        self.store = store
        self._prefix = store.keys.nodes
        self._records: dict[str, NodeRecord] = {}
        self._listing: list[NodeRecord] | None = None  # _records' values, built on the first read after a change
        self._revision = 0
        self._synced = False
        self._changed = asyncio.Condition()
        self._task: asyncio.Task[None] | None = None
        self.relists = 0  # lists taken: the first, then one per lost watch or resync

    # ---- reads --------------------------------------------------------------------------

    @property
    def revision(self) -> int:
        """The etcd revision the cache reflects (0 before its first list)."""
        return self._revision

    @property
    def synced(self) -> bool:
        """True while a list and the watch after it are in place: reads are served from memory."""
        return self._synced

    async def list_nodes(self) -> list[NodeRecord]:
        """Every registered node, as of `revision`; read from etcd while the cache is not synced."""
        if not self._synced:
            return await self.store.list_nodes()
        if self._listing is None:
            self._listing = list(self._records.values())
        return list(self._listing)

    async def get_node(self, name: str) -> NodeRecord | None:
        """A node's record: from memory when held, else read from etcd (registered a moment ago,
        or the cache is not synced). None only when etcd has no such node either."""
        record = self._records.get(name) if self._synced else None
        if record is not None:
            return record
        return await self.store.get_node(name)

    async def wait_for(self, revision: int, timeout_s: float) -> bool:
        """Waits until the cache reflects `revision` (a write's revision); False on timeout."""
        async with self._changed:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait_for(lambda: self._synced and self._revision >= revision),
                                       timeout_s)
            return self._synced and self._revision >= revision

    # ---- lifecycle ----------------------------------------------------------------------

    def start(self) -> None:
        """Starts following etcd; until the first list is in, reads go to etcd."""
        if self._task is None:
            self._task = asyncio.create_task(self._follow(), name="node-cache")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is None:
            return
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        self._synced = False

    # ---- following etcd -----------------------------------------------------------------

    async def _follow(self) -> None:
        failures = 0
        while True:
            try:
                await self._list_and_watch()
                failures = 0
            except Exception as exc:  # whatever broke the watch: reads go to etcd until a new list is in
                self._synced = False
                failures += 1
                delay_s = min(0.1 * 2 ** min(failures, 6), RETRY_MAX_S)
                log.warning("node cache: %s; reading nodes from etcd, listing again in %.1f s",
                            str(exc) or type(exc).__name__, delay_s)
                await asyncio.sleep(delay_s)

    async def _list_and_watch(self) -> None:
        """One list, then the watch after it until it breaks (raises) or a resync is due (returns)."""
        values, revision = await self.store.node_values_at()
        records = {}
        for key, value in values:
            name, record = self._parse(key, value)
            if record is not None:
                records[name] = record
        generation = self.store.connection_generation
        watch = await self.store.watch_nodes(revision + 1)
        await self._replace(records, revision)
        self.relists += 1
        consumer = asyncio.create_task(self._apply(watch), name="node-cache-watch")
        try:
            resync_at = time.monotonic() + RESYNC_S
            while (not consumer.done() and time.monotonic() < resync_at
                   and self.store.connection_generation == generation):
                await asyncio.wait({consumer}, timeout=CHECK_S)
        finally:
            if not consumer.done():
                consumer.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await consumer
            with contextlib.suppress(EtcdError, TimeoutError):
                await asyncio.wait_for(watch.cancel(), CHECK_S)
        if consumer.done() and not consumer.cancelled():
            consumer.result()  # raises the watch's error, if it failed
            raise EtcdError("the node watch ended")
        if self.store.connection_generation != generation:
            # the client left the member this watch streams from, which may be frozen rather than closed
            self._synced = False

    async def _apply(self, watch: rtypes.Watch) -> None:
        async for event in watch:
            name = self._name(event.kv.key)
            if event.kind == rtypes.EventKind.DELETE:
                self._records.pop(name, None)
            else:
                _, record = self._parse(event.kv.key, event.kv.value)
                if record is None:
                    self._records.pop(name, None)
                else:
                    self._records[name] = record
            self._listing = None
            await self._advance(int(event.kv.mod_revision))

    async def _replace(self, records: dict[str, NodeRecord], revision: int) -> None:
        self._records = records
        self._listing = None
        self._synced = True
        await self._advance(revision)

    async def _advance(self, revision: int) -> None:
        async with self._changed:
            self._revision = max(self._revision, revision)
            self._changed.notify_all()

    def _name(self, key: bytes) -> str:
        return key[len(self._prefix):].decode()

    def _parse(self, key: bytes, value: bytes) -> tuple[str, NodeRecord | None]:
        name = self._name(key)
        try:
            return name, NodeRecord.from_bytes(value)
        except (ValueError, TypeError) as exc:
            log.warning("node cache: the record of node %r is unreadable, left out: %s", name, exc)
            return name, None
