"""The agent's liveness in etcd: its node record under a lease, kept alive from a thread of its
own (`cluster.store_thread`) so that a busy event loop (many guests, the data plane, migrations
running away from this node) cannot starve the refresh and let etcd take this node for dead.

The main side hands over what the record says (`publish`); the thread refreshes the lease at a
third of its TTL (and looks at the record under it once a TTL) and, when etcd has expired it
anyway (the process was paused, etcd was frozen or restarted), registers again under a new lease
with the record it was last handed (and puts the record back if it went while the lease lived).

A node name has one holder at a time. Registering claims the key only if no one holds it (an
etcd transaction), and every later write of the record compares the key's create revision with
the claim's, so an agent never overwrites another's registration. Before that, `await_name_free`
looks at the holder of the name: one that answers at its address refuses the start; one that
does not (this agent, crashed a moment ago: its lease lives up to its TTL) is waited out.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from cluster.etcd_config import EtcdConfig
from cluster.records import NodeRecord
from cluster.store import EtcdError, EtcdStore, NodeHolder
from cluster.store_thread import StoreThread

log = logging.getLogger(__name__)

STOP_TIMEOUT_S = 5.0
# How long past the old holder's lease TTL a restarted agent waits for the name: etcd expires a
# lease a little after its TTL, and a loaded etcd later still.
NAME_WAIT_MARGIN_S = 5.0
NAME_POLL_S = 0.25
# The lease is refreshed at a third of its TTL; the record under it is looked at every third
# refresh only (once a TTL). A refresh that finds the lease alive says the record is there unless
# someone deleted it by hand: that is found within a TTL, and the record written again. Looking at
# it at every refresh was half of the etcd requests of an idle fleet (a range per agent a second at
# a thousand agents).
REFRESHES_PER_RECORD_CHECK = 3


class NodeNameHeld(Exception):
    """Another agent holds this node's name in etcd: this one must not register."""


def _since(record: NodeRecord) -> str:
    if not record.started_at:
        return "an unknown time"
    return datetime.fromtimestamp(record.started_at, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def held_by_live_agent(record: NodeRecord) -> NodeNameHeld:
    return NodeNameHeld(f"node name '{record.name}' is held by a live agent at {record.address} (registered since "
                        f"{_since(record)}); stop it or choose another --name")


def held_by_silent_agent(record: NodeRecord, waited_s: float) -> NodeNameHeld:
    return NodeNameHeld(f"node name '{record.name}' is held by an agent at {record.address} (registered since "
                        f"{_since(record)}) that keeps its lease alive but has not answered there for "
                        f"{waited_s:.0f} s; stop it or choose another --name")


async def await_name_free(store: EtcdStore, name: str, ping: Callable[[str], Awaitable[str | None]], *,
                          margin_s: float = NAME_WAIT_MARGIN_S,
                          monotonic: Callable[[], float] = time.monotonic) -> None:
    """Returns once no agent holds `name`; raises NodeNameHeld when one that is alive does.
    `ping(address)` is the node name the agent answering at `address` gives, None if none
    answers. Call it before this agent serves: it must not answer for the old holder."""
    started = monotonic()
    deadline: float | None = None
    seen: NodeHolder | None = None
    while (holder := await store.node_holder(name)) is not None:
        if await ping(holder.record.address) == name:
            raise held_by_live_agent(holder.record)
        if seen is None or holder.create_revision != seen.create_revision:
            seen = holder
            left_s, granted_s = await store.lease_ttls_s(holder.lease_id)
            deadline = monotonic() + max(left_s, granted_s, 0) + margin_s
            log.warning("node name %r is still registered by an agent at %s that does not answer (crashed?); "
                        "waiting up to %.0f s for its lease to expire", name, holder.record.address,
                        deadline - monotonic())
        assert deadline is not None
        if monotonic() >= deadline:
            raise held_by_silent_agent(holder.record, monotonic() - started)
        await asyncio.sleep(NAME_POLL_S)


@dataclass(frozen=True)
class LeaseStatus:
    """What the lease thread last learnt of this node's registration (agent.readiness reads it)."""

    ttl_s: int
    # time.monotonic() at the start of the last call that found the lease alive and the record
    # ours (a grant, or a refresh and a look at the key); None while not registered, or once etcd
    # said the lease or the record is gone.
    confirmed_at: float | None
    problem: str  # why the last attempt failed ("" when it did not)


class NodeLease:
    def __init__(self, etcd: EtcdConfig, prefix: str, node: str, ttl_s: int, *,
                 thread: StoreThread | None = None) -> None:
        """`thread`: a lease thread shared with other leases of this process (simulated agents, many
        to a process: e2e/sim_agents.py), which the owner starts and stops; by default this lease
        has a thread, and an etcd connection, of its own."""
        self.ttl_s = ttl_s
        self._owns_thread = thread is None
        self._thread = thread or StoreThread(etcd, prefix, f"node-lease-{node}")
        self._keeper: concurrent.futures.Future[None] | None = None
        self._record_lock = threading.Lock()
        self._record: NodeRecord | None = None  # the latest record handed over by the main side
        self._lease_id = 0  # touched on the lease thread only
        self._create_revision = 0  # the node key's, as this agent claimed it; lease thread only
        self._held_logged = False
        self._write_lock: asyncio.Lock | None = None  # the lease thread's: one registration at a time
        self.expiries = 0  # how often etcd expired the lease under us
        # Written on the lease thread, read on the main loop (one attribute each: no torn reads).
        self._confirmed_at: float | None = None
        self._problem = ""

    def status(self) -> LeaseStatus:
        return LeaseStatus(self.ttl_s, self._confirmed_at, self._problem)

    async def start(self, record: NodeRecord) -> None:
        """Registers (lease and record) and starts keeping the lease alive; raises EtcdError when
        etcd cannot be reached."""
        self._thread.start()
        self._hand_over(record)
        try:
            await self._thread.call(self._register)
        except BaseException:
            if self._owns_thread:
                await asyncio.to_thread(self._thread.stop, STOP_TIMEOUT_S)
            raise
        self._keeper = self._thread.submit(self._keep_alive)

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
        """A new lease, and the node key claimed under it if no one holds it (NodeNameHeld if
        someone does: its registration is left alone)."""
        if self._lease_id:
            with contextlib.suppress(EtcdError):  # expired already, or its key went: let it go
                await store.revoke_lease(self._lease_id)
        self._confirmed_at = None
        started = time.monotonic()
        self._lease_id = await store.grant_lease(self.ttl_s)
        record = self._latest()
        revision = await store.claim_node(record, self._lease_id)
        if revision is None:
            holder = await store.node_holder(record.name)
            with contextlib.suppress(EtcdError):
                await store.revoke_lease(self._lease_id)
            self._lease_id = 0
            refusal = held_by_live_agent(holder.record if holder is not None else record)
            self._problem = str(refusal)
            raise refusal
        self._create_revision = revision
        self._confirmed_at, self._problem = started, ""
        if self._held_logged:
            log.warning("node name %r registered again", record.name)
        self._held_logged = False

    async def _register_again(self, store: EtcdStore) -> None:
        """After an expiry or a lost record: register again, unless another agent now holds the
        name (logged, and tried again at the next refresh)."""
        try:
            await self._register_locked(store)
        except NodeNameHeld as exc:
            if not self._held_logged:
                log.error("cannot register again: %s", exc)
                self._held_logged = True

    def _expired(self) -> None:
        log.warning("node lease expired; registering again")
        self.expiries += 1
        self._confirmed_at, self._problem = None, "etcd expired the node lease"

    async def _put_latest(self, store: EtcdStore) -> None:
        async with self._lock():
            try:
                if await store.update_node(self._latest(), self._lease_id, self._create_revision):
                    return
                if self._lease_id and not await store.refresh_lease(self._lease_id):
                    self._expired()  # found by a write before the refresh saw it
                else:
                    log.warning("node record gone from etcd; registering again")
            except EtcdError as exc:
                if "lease not found" not in str(exc):
                    raise
                self._expired()  # found by a write before the refresh saw it
            await self._register_again(store)

    async def _keep_alive(self, store: EtcdStore) -> None:
        interval_s = max(self.ttl_s / 3.0, 0.2)
        refreshes = 0
        while True:
            await asyncio.sleep(interval_s)
            refreshes += 1
            try:
                async with self._lock():
                    started = time.monotonic()
                    if not self._lease_id or not await store.refresh_lease(self._lease_id):
                        if self._lease_id:
                            self._expired()
                        await self._register_again(store)
                    elif refreshes % REFRESHES_PER_RECORD_CHECK == 0 and await self._record_lost(store):
                        # the lease lives but the record went (deleted by hand): claim it again
                        log.warning("node record missing under a live lease; writing it again")
                        self._confirmed_at, self._problem = None, "node record missing from etcd"
                        await self._register_again(store)
                    else:
                        self._confirmed_at, self._problem = started, ""
            except EtcdError as exc:
                self._problem = f"etcd did not answer: {exc}"
                log.warning("etcd unavailable for the node lease, retrying: %s", exc)

    async def _record_lost(self, store: EtcdStore) -> bool:
        holder = await store.node_holder(self._latest().name)
        return holder is None or holder.create_revision != self._create_revision

    async def _revoke(self, store: EtcdStore) -> None:
        with contextlib.suppress(EtcdError):
            await store.revoke_lease(self._lease_id)

    # ---- shutdown ---------------------------------------------------------------------------

    async def stop(self) -> None:
        """Deregisters (revokes the lease: the record goes at once) and stops the thread."""
        self._confirmed_at, self._problem = None, "the agent is stopping"
        if self._keeper is not None:
            self._keeper.cancel()  # a shared thread goes on: this lease's refresh must not
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._thread.call(self._revoke), STOP_TIMEOUT_S)
        if self._owns_thread:
            await asyncio.to_thread(self._thread.stop, STOP_TIMEOUT_S)
