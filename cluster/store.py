"""All etcd access of the project: key layout, compare-and-swap writes, leases, leader election.

Every key lives under one prefix (default /nvmigrate/), so several clusters, or tests, can share
one etcd. Keys, relative to the prefix:
  jobs/<job-id>              job record (JSON, written by the orchestrator; every write a CAS on
                             the key's mod revision)
  active/<controller-id>     the job currently moving that controller (one at a time)
  controllers/<id>           ControllerRecord: which node owns the controller
  nodes/<name>               NodeRecord, attached to the agent's liveness lease
  leader                     the orchestrator that drives jobs, attached to its lease; its create
                             revision is the leader's term (the epoch it stamps on jobs)
  cordon/<name>              a cordoned node (kept apart from the node record, which vanishes
                             with the agent's lease: a restart must not uncordon a node)
  predictions/<name>         an external predictor's failure mark on a node: its reason
  evacuations/<node>         the node's latest evacuation (orchestrator/evacuation.py Evacuation);
                             written by the API when asked, then by the leader, every write a CAS
Prefixes of clusters sharing an etcd must not nest inside one another's folders: the keys of a
cluster under /nvmigrate/jobs/ would read as jobs of the cluster under /nvmigrate/.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import TypeVar

import aetcd
import aetcd.exceptions
import aetcd.rtypes

from cluster.etcd_client import FailoverClient
from cluster.etcd_config import EtcdConfig, plain
from cluster.io_limits import IoLimits
from cluster.records import COMMITTED, RUNNING, ControllerRecord, NodeRecord
from cluster.retrying import of_types, retry_transient

log = logging.getLogger(__name__)

DEFAULT_PREFIX = "/nvmigrate/"

EtcdError = aetcd.exceptions.ClientError
TRANSIENT_ETCD_ERRORS = (aetcd.exceptions.ConnectionFailedError, aetcd.exceptions.ConnectionTimeoutError)
READ_RETRY_BUDGET_S = 3.0
_transient_etcd_error = of_types(*TRANSIENT_ETCD_ERRORS)
T = TypeVar("T")


class EtcdNotAnswering(aetcd.exceptions.ConnectionTimeoutError):
    """etcd did not answer a quick check in time (frozen, partitioned, overloaded)."""


class ConflictError(Exception):
    """A compare-and-swap lost: someone else wrote first. Re-read and decide again."""


@dataclass(frozen=True)
class Versioned:
    value: bytes
    mod_revision: int


@dataclass(frozen=True)
class NodeHolder:
    record: NodeRecord
    create_revision: int
    lease_id: int


def prefix_problem(prefix: str) -> str | None:
    """Why `prefix` cannot hold a cluster's keys, or None when it can."""
    if not (prefix.startswith("/") and prefix.endswith("/")):
        return (f"etcd prefix {prefix!r} must start and end with '/', e.g. {DEFAULT_PREFIX} or "
                "/nvmigrate/cluster-a/")
    if not prefix.isprintable() or any(c.isspace() for c in prefix):
        return f"etcd prefix {prefix!r} holds a space or a non-printable character; use printable characters only"
    return None


class KeyLayout:
    """Where each record lives, all under one prefix (the module docstring lists them)."""

    def __init__(self, prefix: str) -> None:
        problem = prefix_problem(prefix)
        if problem:
            raise ValueError(problem)
        self.prefix = prefix.encode()
        self.jobs = self.prefix + b"jobs/"
        self.active = self.prefix + b"active/"
        self.controllers = self.prefix + b"controllers/"
        self.nodes = self.prefix + b"nodes/"
        self.leader = self.prefix + b"leader"
        self.cordon = self.prefix + b"cordon/"
        self.evacuations = self.prefix + b"evacuations/"
        self.predictions = self.prefix + b"predictions/"

    def job(self, job_id: str) -> bytes:
        return self.jobs + job_id.encode()

    def active_job(self, controller_id: str) -> bytes:
        return self.active + controller_id.encode()

    def controller(self, controller_id: str) -> bytes:
        return self.controllers + controller_id.encode()

    def node(self, name: str) -> bytes:
        return self.nodes + name.encode()

    def cordoned(self, name: str) -> bytes:
        return self.cordon + name.encode()

    def evacuation(self, node: str) -> bytes:
        return self.evacuations + node.encode()


class EtcdStore:
    def __init__(self, etcd: EtcdConfig | str, timeout_s: int = 5, prefix: str = DEFAULT_PREFIX) -> None:
        """`etcd`: the cluster's members and how to reach them, or plain endpoints 'HOST:PORT[,...]'."""
        self.config = plain(etcd) if isinstance(etcd, str) else etcd
        self.prefix = prefix
        self.keys = KeyLayout(prefix)
        self._client = FailoverClient(self.config, timeout_s)
        self._tx = self._client.transactions

    @property
    def endpoint(self) -> str:
        """The member this store talks to now."""
        return str(self._client.endpoint)

    async def connect(self) -> None:
        await self._client.connect()

    async def close(self) -> None:
        await self._client.close()

    async def _read(self, what: str, call: Callable[[], Awaitable[T]]) -> T:
        """Reads are idempotent: retried on the transient errors only (etcd restarting or a
        deadline), briefly; writes are not retried here: a CAS that may have landed is re-read
        and decided again by its caller."""
        return await retry_transient(call, transient=_transient_etcd_error, budget_s=READ_RETRY_BUDGET_S,
                                     first_wait_s=0.05, max_wait_s=0.5)

    async def _get(self, key: bytes) -> Versioned | None:
        got = await self._read(f"get {key!r}", lambda: self._client.get(key))
        if got is None:
            return None
        return Versioned(got.value, got.mod_revision)

    async def _list(self, prefix: bytes) -> list[tuple[bytes, Versioned]]:
        got = await self._read(f"list {prefix!r}", lambda: self._client.get_prefix(prefix))
        return [(kv.key, Versioned(kv.value, kv.mod_revision)) for kv in got]

    # ---- jobs -------------------------------------------------------------------------------

    async def create_job(self, job_id: str, controller_id: str, record: bytes) -> int:
        """Writes a new job and marks its controller as being moved, both or neither."""
        job_key, active_key = self.keys.job(job_id), self.keys.active_job(controller_id)
        ok, responses = await self._client.transaction(
            compare=[self._tx.version(job_key) == 0, self._tx.version(active_key) == 0],
            success=[self._tx.put(job_key, record), self._tx.put(active_key, job_id.encode())],
            failure=[],
        )
        if not ok:
            # which compare failed: read back for the message only, the refusal itself was atomic
            active = await self.active_job_for(controller_id)
            if active is None and await self.get_job(job_id) is not None:
                raise ConflictError(f"job id {job_id!r} exists already; create the job under a new id")
            raise ConflictError(f"controller {controller_id!r} already has a migration in progress"
                                + (f" (job {active})" if active else ""))
        return int(responses[0].response_put.header.revision)

    async def active_job_for(self, controller_id: str) -> str | None:
        got = await self._get(self.keys.active_job(controller_id))
        return got.value.decode() if got else None

    async def get_job(self, job_id: str) -> Versioned | None:
        return await self._get(self.keys.job(job_id))

    async def list_jobs(self) -> list[Versioned]:
        return [v for _, v in await self._list(self.keys.jobs)]

    async def update_job(self, job_id: str, record: bytes, expected_revision: int, *,
                         release_controller: str | None = None, leader_term: int | None = None) -> int:
        """CAS on the job's mod revision; with release_controller the active marker goes too.
        With leader_term the write also requires that leader still holds the leader key: a
        leader that lost its lease cannot write, however current its revision."""
        job_key = self.keys.job(job_id)
        ops = [self._tx.put(job_key, record)]
        if release_controller is not None:
            ops.append(self._tx.delete(self.keys.active_job(release_controller)))
        compare = [self._tx.mod(job_key) == expected_revision]
        if leader_term is not None:
            compare.append(self._tx.create(self.keys.leader) == leader_term)
        ok, responses = await self._client.transaction(compare=compare, success=ops, failure=[])
        if not ok:
            raise ConflictError(f"job {job_id} changed since revision {expected_revision}")
        return int(responses[0].response_put.header.revision)

    async def delete_job(self, job_id: str, expected_revision: int, *, leader_term: int) -> bool:
        """Deletes a finished job's record if it is unchanged since `expected_revision` and the
        leader of `leader_term` still leads; False (nothing deleted) otherwise."""
        job_key = self.keys.job(job_id)
        ok, _ = await self._client.transaction(
            compare=[self._tx.mod(job_key) == expected_revision, self._tx.create(self.keys.leader) == leader_term],
            success=[self._tx.delete(job_key)], failure=[])
        return bool(ok)

    async def commit_switchover(self, job_id: str, record: bytes, expected_revision: int,
                                controller: ControllerRecord, controller_revision: int,
                                new_owner: str, leader_term: int) -> int:
        """The switchover point, taken by the destination once it loaded the state: the job's
        record (RESUMING) and the controller's owner (`new_owner`, RUNNING) change in one
        transaction, fenced by the job's and the controller's revisions as the orchestrator read
        them before the pause and by its leader's term. ConflictError: refused, it never lands."""
        job_key = self.keys.job(job_id)
        ctrl_key = self.keys.controller(controller.controller_id)
        moved = controller.moved_to(new_owner, job_id)
        ok, responses = await self._client.transaction(
            compare=[self._tx.mod(job_key) == expected_revision,
                     self._tx.mod(ctrl_key) == controller_revision,
                     self._tx.create(self.keys.leader) == leader_term],
            success=[self._tx.put(job_key, record), self._tx.put(ctrl_key, moved.to_bytes())],
            failure=[],
        )
        if not ok:
            raise ConflictError(f"job {job_id}, controller {controller.controller_id} or the leader changed "
                                "since the switchover was planned; ownership was not moved")
        return int(responses[0].response_put.header.revision)

    # ---- controllers ------------------------------------------------------------------------

    async def get_controller(self, controller_id: str) -> tuple[ControllerRecord, int] | None:
        got = await self._get(self.keys.controller(controller_id))
        return (ControllerRecord.from_bytes(got.value), got.mod_revision) if got else None

    async def claim_controller(self, record: ControllerRecord) -> bool:
        """Records a new controller's owner; False when the id is already owned elsewhere."""
        key = self.keys.controller(record.controller_id)
        ok, _ = await self._client.transaction(
            compare=[self._tx.version(key) == 0], success=[self._tx.put(key, record.to_bytes())], failure=[],
        )
        if ok:
            return True
        existing = await self.get_controller(record.controller_id)
        return existing is not None and existing[0].node == record.node

    async def delete_controller(self, controller_id: str, node: str) -> str | None:
        """Removes a controller's record, by CAS, only while it names `node` and no migration job
        is active for it. Returns None when it is gone (or was already), else why not."""
        key, active_key = self.keys.controller(controller_id), self.keys.active_job(controller_id)
        for _ in range(10):
            got = await self.get_controller(controller_id)
            if got is None:
                return None
            record, revision = got
            if record.node != node:
                return f"controller {controller_id!r} belongs to node {record.node!r}, not {node!r}"
            ok, _ = await self._client.transaction(
                compare=[self._tx.mod(key) == revision, self._tx.version(active_key) == 0],
                success=[self._tx.delete(key)], failure=[])
            if ok:
                return None
            active = await self.active_job_for(controller_id)
            if active:
                return f"controller {controller_id!r} is being moved by job {active}"
        return f"controller {controller_id!r} kept changing; retry"

    async def set_controller_limits(self, controller_id: str, node: str, limits: IoLimits) -> str | None:
        """Records a controller's I/O limits, by CAS, only while `node` owns it and no migration
        job is active for it (a job's COMMIT moves the record it read). None when recorded, else
        why not."""
        key, active_key = self.keys.controller(controller_id), self.keys.active_job(controller_id)
        for _ in range(10):
            got = await self.get_controller(controller_id)
            if got is None:
                return f"controller {controller_id!r} is not known to etcd"
            record, revision = got
            if record.node != node:
                return f"controller {controller_id!r} belongs to node {record.node!r}, not {node!r}"
            ok, _ = await self._client.transaction(
                compare=[self._tx.mod(key) == revision, self._tx.version(active_key) == 0],
                success=[self._tx.put(key, replace(record, limits=limits).to_bytes())], failure=[])
            if ok:
                return None
            active = await self.active_job_for(controller_id)
            if active:
                return (f"controller {controller_id!r} is being moved by job {active}; change its limits once "
                        "the job ended")
        return f"controller {controller_id!r} kept changing; retry"

    async def set_controller_state(self, controller_id: str, state: str, *, only_if_node: str | None = None) -> bool:
        """Records a controller's state (RUNNING, LOST, ...) by CAS; False if it changed owner
        meanwhile (only_if_node) or does not exist."""
        for _ in range(10):
            got = await self.get_controller(controller_id)
            if got is None:
                return False
            record, revision = got
            if only_if_node is not None and record.node != only_if_node:
                return False
            if record.state == state:
                return True
            key = self.keys.controller(controller_id)
            ok, _ = await self._client.transaction(
                compare=[self._tx.mod(key) == revision],
                success=[self._tx.put(key, replace(record, state=state).to_bytes())], failure=[])
            if ok:
                return True
        return False

    async def claim_running(self, controller_id: str, node: str,
                            read: tuple[ControllerRecord, int] | None = None) -> str | None:
        """The new owner's last step before it runs the controller: state -> RUNNING, by CAS,
        only while `node` owns it (already RUNNING after `commit_switchover`: granted as it is;
        COMMITTED: a commit of the orchestrator-driven protocol of earlier versions). Returns None
        when granted, else why not. Once granted, ownership can no longer be moved back to the
        source. `read`: the record and its revision
        as the caller read them just before (saves a round trip; the CAS still checks them)."""
        for attempt in range(10):
            got = read if attempt == 0 and read is not None else await self.get_controller(controller_id)
            if got is None:
                return f"controller {controller_id!r} is not known to etcd"
            record, revision = got
            if record.node != node:
                return f"controller {controller_id!r} now belongs to {record.node!r}, not {node!r}"
            if record.state == RUNNING:
                return None
            key = self.keys.controller(controller_id)
            ok, _ = await self._client.transaction(
                compare=[self._tx.mod(key) == revision],
                success=[self._tx.put(key, replace(record, state=RUNNING).to_bytes())], failure=[])
            if ok:
                return None
        return f"controller {controller_id!r} kept changing; retry"

    async def move_back(self, controller_id: str, from_node: str, to_node: str, leader_term: int) -> bool:
        """After COMMIT, a destination lost before it ever ran: ownership returns to the source.
        Only for a commit of the orchestrator-driven protocol of earlier versions (the
        destination's own commit claims RUNNING at once), and only while the record still says
        COMMITTED on from_node (the destination never claimed
        RUNNING), so the controller can never run on both."""
        got = await self.get_controller(controller_id)
        if got is None:
            return False
        record, revision = got
        if record.node != from_node or record.state != COMMITTED:
            return False
        key = self.keys.controller(controller_id)
        back = replace(record, node=to_node, state=RUNNING, history=(*record.history, from_node))
        ok, _ = await self._client.transaction(
            compare=[self._tx.mod(key) == revision, self._tx.create(self.keys.leader) == leader_term],
            success=[self._tx.put(key, back.to_bytes())], failure=[])
        return bool(ok)

    async def list_controllers(self) -> list[ControllerRecord]:
        return [ControllerRecord.from_bytes(v.value) for _, v in await self._list(self.keys.controllers)]

    # ---- nodes ------------------------------------------------------------------------------

    async def list_nodes(self) -> list[NodeRecord]:
        return [NodeRecord.from_bytes(v.value) for _, v in await self._list(self.keys.nodes)]

    async def get_node(self, name: str) -> NodeRecord | None:
        got = await self._get(self.keys.node(name))
        return NodeRecord.from_bytes(got.value) if got else None

    async def node_values_at(self) -> tuple[list[tuple[bytes, bytes]], int]:
        """Every node key with its raw record, and the revision they were read at (what a watch
        that follows them starts after)."""
        got = await self._read("list nodes", lambda: self._client.get_prefix(self.keys.nodes))
        return [(kv.key, kv.value) for kv in got.kvs], int(got.header.revision)

    async def watch_nodes(self, start_revision: int) -> aetcd.rtypes.Watch:
        """The changes to node keys from `start_revision` on (inclusive). Raises
        RevisionCompactedError when etcd no longer keeps that revision's history."""
        return await self._client.watch_prefix(self.keys.nodes, start_revision=start_revision)

    @property
    def connection_generation(self) -> int:
        """Grows each time the client moves to another etcd member: a watch opened before that
        may stream from a member that is frozen, not closed."""
        return self._client.generation

    async def grant_lease(self, ttl_s: int) -> int:
        lease = await self._client.lease(ttl_s)
        return int(lease.id)

    async def refresh_lease(self, lease_id: int) -> bool:
        """False when the lease is gone (expired): the holder has lost what it held."""
        reply = await self._client.refresh_lease(lease_id)
        return reply is not None and reply.TTL > 0

    async def revoke_lease(self, lease_id: int) -> None:
        await self._client.revoke_lease(lease_id)

    async def put_node(self, record: NodeRecord, lease_id: int) -> None:
        await self._client.put(self.keys.node(record.name), record.to_bytes(), lease=lease_id)

    async def node_holder(self, name: str) -> NodeHolder | None:
        """Who holds node `name`: its record, the key's create revision and its lease."""
        got = await self._read(f"get node {name}", lambda: self._client.get(self.keys.node(name)))
        if got is None:
            return None
        return NodeHolder(NodeRecord.from_bytes(got.value), int(got.create_revision), int(got.lease))

    async def claim_node(self, record: NodeRecord, lease_id: int) -> int | None:
        """Writes a node's record under `lease_id` only if no one holds the name: returns the key's
        create revision (what this holder's later writes compare against), or None when held."""
        key = self.keys.node(record.name)
        ok, responses = await self._client.transaction(
            compare=[self._tx.version(key) == 0], success=[self._tx.put(key, record.to_bytes(), lease=lease_id)],
            failure=[])
        return int(responses[0].response_put.header.revision) if ok else None

    async def update_node(self, record: NodeRecord, lease_id: int, create_revision: int) -> bool:
        """Rewrites a node's record if the key is still the one claimed at `create_revision`
        (False: it went with an expired lease, or another holder claimed it since)."""
        key = self.keys.node(record.name)
        ok, _ = await self._client.transaction(
            compare=[self._tx.create(key) == create_revision],
            success=[self._tx.put(key, record.to_bytes(), lease=lease_id)], failure=[])
        return bool(ok)

    async def lease_ttls_s(self, lease_id: int) -> tuple[int, int]:
        """(seconds left, seconds granted) of a lease; (-1, 0) when it is gone."""
        info = await self._read(f"lease {lease_id:x}", lambda: self._client.get_lease_info(lease_id, keys=False))
        return int(info.TTL), int(info.grantedTTL)

    async def set_cordon(self, name: str, cordoned: bool) -> None:
        if cordoned:
            await self._client.put(self.keys.cordoned(name), b"1")
        else:
            await self._client.delete(self.keys.cordoned(name))

    async def set_prediction(self, name: str, reason: str) -> None:
        """An external predictor's failure mark on a node ("" clears it)."""
        key = self.keys.predictions + name.encode()
        if reason:
            await self._client.put(key, reason.encode())
        else:
            await self._client.delete(key)

    async def predictions(self) -> dict[str, str]:
        prefix = self.keys.predictions
        return {key[len(prefix):].decode(): v.value.decode() for key, v in await self._list(prefix)}

    async def cordoned_nodes(self) -> set[str]:
        cordon = self.keys.cordon
        return {key[len(cordon):].decode() for key, _ in await self._list(cordon)}

    # ---- evacuations -------------------------------------------------------------------------

    async def get_evacuation(self, node: str) -> Versioned | None:
        return await self._get(self.keys.evacuation(node))

    async def list_evacuations(self) -> list[Versioned]:
        return [v for _, v in await self._list(self.keys.evacuations)]

    async def put_evacuation(self, node: str, record: bytes, expected_revision: int, *,
                             leader_term: int | None = None) -> int:
        """CAS on the record's mod revision (0: it must not exist); with leader_term, only while
        that leader holds the leader key."""
        key = self.keys.evacuation(node)
        compare = [self._tx.version(key) == 0] if expected_revision == 0 else [self._tx.mod(key) == expected_revision]
        if leader_term is not None:
            compare.append(self._tx.create(self.keys.leader) == leader_term)
        ok, responses = await self._client.transaction(compare=compare, success=[self._tx.put(key, record)],
                                                       failure=[])
        if not ok:
            raise ConflictError(f"the evacuation record of node {node!r} changed since revision {expected_revision}")
        return int(responses[0].response_put.header.revision)

    # ---- leader -----------------------------------------------------------------------------

    async def try_become_leader(self, candidate: str, lease_id: int) -> int | None:
        """Takes the leader key if free. Returns the term (the revision that created the key,
        which grows with every new leader) or None when someone else leads."""
        ok, responses = await self._client.transaction(
            compare=[self._tx.version(self.keys.leader) == 0],
            success=[self._tx.put(self.keys.leader, candidate.encode(), lease=lease_id)],
            failure=[],
        )
        return int(responses[0].response_put.header.revision) if ok else None

    async def leader(self) -> str | None:
        got = await self._get(self.keys.leader)
        return got.value.decode() if got else None

    async def leader_term(self) -> int | None:
        """The current leader's term, or None when nobody leads."""
        got = await self._read("get leader", lambda: self._client.get(self.keys.leader))
        return int(got.create_revision) if got is not None else None

    async def answers(self, timeout_s: float) -> int | None:
        """One linearizable read (the leader key) that must be answered within `timeout_s`: asked
        right before a step that etcd must follow quickly (the switchover). Returns the leader's
        term; raises `EtcdNotAnswering` (an EtcdError) when etcd did not answer in time.

        A process idle on etcd may learn only here that its member is gone: with several members,
        one that refuses the connection, or is silent for half of `timeout_s`, is left for the next,
        which is asked within what is left. With one member, a slow answer is the answer."""
        deadline = time.monotonic() + timeout_s
        members = len(self.config.endpoints)
        while True:
            generation = self._client.generation
            left_s = max(deadline - time.monotonic(), 0.0)
            # The last member tried gets all that is left; others half the budget each.
            attempt_s = left_s if members == 1 else min(left_s, timeout_s / 2)
            try:
                got = await asyncio.wait_for(self._client.get(self.keys.leader), attempt_s)
            except TimeoutError:
                slow = EtcdNotAnswering(f"etcd at {self.endpoint} did not answer within {attempt_s:.3g} s")
                self._client.fail_over(generation, slow)
                if members == 1 or time.monotonic() >= deadline - 0.01:
                    raise slow from None
                continue
            except TRANSIENT_ETCD_ERRORS:
                if self._client.generation == generation or time.monotonic() >= deadline:
                    raise  # no other member to ask, or no time left to ask it
                continue
            return int(got.create_revision) if got is not None else None

    async def resign(self, candidate: str) -> None:
        await self._client.transaction(
            compare=[self._tx.value(self.keys.leader) == candidate.encode()],
            success=[self._tx.delete(self.keys.leader)], failure=[],
        )


async def keep_lease_alive(store: EtcdStore, lease_id: int, ttl_s: int,
                           on_lost: Callable[[], Awaitable[None]] | None = None) -> None:
    """Refreshes a lease at a third of its TTL until cancelled; calls on_lost if it expires."""
    interval_s = max(ttl_s / 3.0, 0.2)
    while True:
        await asyncio.sleep(interval_s)
        try:
            alive = await store.refresh_lease(lease_id)
        except EtcdError as exc:
            log.warning("lease %x refresh failed: %s", lease_id, exc)
            continue
        if not alive:
            log.error("lease %x expired", lease_id)
            if on_lost is not None:
                with contextlib.suppress(Exception):
                    await on_lost()
            return
