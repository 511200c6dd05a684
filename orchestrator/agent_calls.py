"""The one way the orchestrator calls agents: runner, reconciler, verifier and API alike.

An `AgentCalls` owns a channel per agent address (with the tracing interceptor that places each
call in its job's trace), finds a node's address in etcd (remembered briefly: a switchover
makes several calls within milliseconds), and runs a call with a deadline and a retry budget.
A node whose record is missing from etcd is not lost at once (`orchestrator.liveness`): within
the grace window its last known address is used (or its record awaited), and after it the node
is lost only if it does not answer a ping there.
Every migration command is idempotent on the agent (keyed by job id and epoch), so calls are
retried on the transient codes only (UNAVAILABLE, DEADLINE_EXCEEDED), never on everything.

Failures come out typed, so callers branch on the type, never on message text:
- `AgentUnreachable`: the node is lost (unregistered past the grace window and silent), or did
  not answer within the budget;
- `StaleEpoch`: the agent refused because a newer orchestrator epoch drives the job (the agent
  sends it as structured status detail, see `cluster.agent_errors`);
- `AgentRefused`: any other refusal, with the gRPC code and the agent's message.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import grpc
import grpc.aio

from cluster import agent_errors, telemetry
from cluster.grpc_tls import TlsFiles, agent_channel
from cluster.node_cache import NodeSource
from cluster.retrying import retry_transient
from cluster.store import EtcdError, EtcdStore
from orchestrator import tracing
from orchestrator.liveness import Liveness, default_grace_s, judge_node
from proto.v1 import agent_pb2, agent_pb2_grpc

log = logging.getLogger(__name__)

TRANSIENT_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})
ADDRESS_CACHE_S = 1.0
PING_TIMEOUT_S = 2.0
# A ping that decides whether an unregistered node is lost: a busy agent may answer slowly.
LIVENESS_PING_TIMEOUT_S = 5.0
DEFAULT_NODE_GRACE_S = default_grace_s(5.0)  # the agents' default lease TTL
MISSING_POLL_S = 0.2  # how often a missing record of a node never seen is looked for again
LONG_CALL_DEADLINE_S = 20.0  # a long transfer call is re-issued (the agent attaches) after this
UNREACHABLE_BACKOFF_S = 0.2
T = TypeVar("T")

Stub = agent_pb2_grpc.AgentServiceStub


class AgentCallError(Exception):
    """Base of the typed failures of an agent call; `node` is the agent's node name."""

    def __init__(self, node: str, message: str) -> None:
        super().__init__(message)
        self.node = node
        self.message = message


class AgentUnreachable(AgentCallError):
    """The node is lost (see `orchestrator.liveness`), or its agent did not answer within the call's budget."""


class StaleEpoch(AgentCallError):
    """A newer orchestrator epoch drives this job on the agent: this caller must stop."""


class AgentRefused(AgentCallError):
    """The agent answered with an error other than the above."""

    def __init__(self, node: str, message: str, code: grpc.StatusCode, details: str) -> None:
        super().__init__(node, message)
        self.code = code
        self.details = details


class _BudgetSpent(Exception):
    """An attempt ran into the end of its call's budget (not retried: the budget is spent)."""


def is_transient(exc: BaseException) -> bool:
    return isinstance(exc, grpc.aio.AioRpcError) and exc.code() in TRANSIENT_CODES


def _typed(node: str, what: str, exc: grpc.aio.AioRpcError) -> AgentCallError:
    details = exc.details() or ""
    if agent_errors.stale_epoch(exc) is not None:
        return StaleEpoch(node, f"{what} on {node}: {details}")
    return AgentRefused(node, f"{what} on {node} failed: {details} ({exc.code().name})", exc.code(), details)


class AgentCalls:
    """Channels, addresses and calls to agents. Close it with `close()`."""

    def __init__(self, store: EtcdStore, clock: Callable[[], float] = time.monotonic, *,
                 node_grace_s: float = DEFAULT_NODE_GRACE_S, tls: TlsFiles | None = None,
                 nodes: NodeSource | None = None) -> None:
        self.store = store
        # Addresses may be a moment old (a command is fenced by its job's epoch at the agent). A
        # node the cache does not hold is read from etcd before it counts as missing, so a stale
        # cache can only delay declaring a node lost (`is_lost`), never declare a live one lost.
        self.nodes: NodeSource = nodes or store
        self.tls = tls  # mutual TLS to agents: each must present its node's certificate
        self._clock = clock
        self.node_grace_s = node_grace_s
        self._channels: dict[tuple[str, str], grpc.aio.Channel] = {}  # (address, node) -> channel
        self._stubs: dict[tuple[str, str], Stub] = {}  # (address, node) -> the stub on that channel
        self._addresses: dict[str, tuple[str, float]] = {}  # node -> (address, when read): the short cache
        self._last_address: dict[str, str] = {}  # node -> the address it last had, kept while it is missing
        self._missing_since: dict[str, float] = {}  # node -> when its record was first seen missing

    # ---- addresses and channels -----------------------------------------------------------

    def stub_at(self, address: str, node: str) -> Stub:
        """A stub for the agent of `node` at `address` (with TLS, only that node's agent answers)."""
        stub = self._stubs.get((address, node))
        if stub is None:
            # Tracing on: each call is a span of its job's trace, carried to the agent as traceparent.
            channel = agent_channel(address, node, self.tls,
                                    telemetry.client_interceptors(address, tracing.call_parent))
            self._channels[(address, node)] = channel
            # One stub per channel: building one makes a callable per RPC of the service, which
            # was 5 % of the orchestrator's samples at a thousand agents when done per call.
            stub = self._stubs[(address, node)] = Stub(channel)
        return stub

    async def address(self, node: str) -> str:
        """The node's AgentService address. From etcd while it is registered; while its record is
        missing, its last known address until `orchestrator.liveness` declares it lost, and then
        AgentUnreachable. A node never seen is waited for through the grace window."""
        cached = self._addresses.get(node)
        if cached is not None and self._clock() - cached[1] < ADDRESS_CACHE_S:
            return cached[0]
        while True:
            try:
                record = await self.nodes.get_node(node)
            except EtcdError:
                # etcd is out: the node's last address still reaches it (a command there is fenced by
                # its job's epoch on the agent), so the source can resume during an etcd outage.
                if node in self._last_address:
                    return self._last_address[node]
                raise
            now = self._clock()
            if record is not None:
                self.remember(node, record.address)
                return record.address
            self._addresses.pop(node, None)
            missing_for_s = now - self._missing_since.setdefault(node, now)
            last = self._last_address.get(node, "")
            verdict = judge_node(registered=False, missing_for_s=missing_for_s, grace_s=self.node_grace_s,
                                 last_address=last, answered=None)
            if verdict is Liveness.IN_GRACE:
                if last:
                    return last
                await asyncio.sleep(MISSING_POLL_S)  # a node never seen: its record may come back
                continue
            if verdict is Liveness.ASK:
                verdict = judge_node(registered=False, missing_for_s=missing_for_s, grace_s=self.node_grace_s,
                                     last_address=last, answered=await self._is_node_at(node, last))
            if verdict is Liveness.ANSWERS:
                self._addresses[node] = (last, self._clock())  # one ping serves the calls right after
                return last
            where = f"and does not answer at {last}" if last else "and no address of it is known"
            raise AgentUnreachable(node, f"node {node!r} has not been registered for {missing_for_s:.1f} s "
                                         f"{where} (its agent is down)")

    async def stored_bytes(self, node: str, controller_id: str, *, budget_s: float) -> int | None:
        """The data a controller's namespace holds on `node` (for placement on a destination's
        disk), or None when the agent does not say (an older agent, or no answer in time)."""
        request = agent_pb2.GetControllerRequest(controller_id=controller_id, with_stored_bytes=True)
        try:
            status = await self.call(node, "GetController", lambda s: s.GetController(request, timeout=budget_s),
                                     budget_s=budget_s)
        except AgentCallError as exc:
            log.info("stored bytes of %s on %s not known, placing by its size: %s", controller_id, node, exc.message)
            return None
        return int(status.stored_bytes) or None

    async def is_lost(self, node: str) -> bool:
        """Whether the node counts as lost now, by the same rule as every call (see `address`)."""
        try:
            await self.address(node)
        except AgentUnreachable:
            return True
        return False

    async def _is_node_at(self, node: str, address: str) -> bool:
        """A direct ping: does `node`'s agent (and not some other process) answer at `address`?"""
        try:
            info = await self.stub_at(address, node).GetInfo(agent_pb2.GetInfoRequest(),
                                                             timeout=LIVENESS_PING_TIMEOUT_S)
        except grpc.aio.AioRpcError:
            return False
        return bool(info.node == node)

    def remember(self, node: str, address: str) -> None:
        """An address read from etcd by the caller (a node listing): saves a read per call."""
        self._addresses[node] = (address, self._clock())
        self._last_address[node] = address
        self._missing_since.pop(node, None)

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()
        self._stubs.clear()

    # ---- calls ----------------------------------------------------------------------------

    async def call(self, node: str, what: str, fn: Callable[[Stub], Awaitable[T]], *, budget_s: float,
                   etcd_down: bool = False) -> T:
        """One command, retried on transient errors until `budget_s` passes. The budget caps the
        whole call: an attempt whose own RPC timeout reaches past it is cut off at the budget.
        `etcd_down`: the caller knows etcd is not answering; the node's last known address is used
        without asking etcd (which would spend the budget waiting)."""
        known = self._last_address.get(node) if etcd_down else None
        stub = self.stub_at(known or await self.address(node), node)
        deadline = self._clock() + budget_s

        async def attempt_once() -> T:
            try:
                # asyncio.timeout, not wait_for: no task per call (Python 3.11's wait_for makes one)
                async with asyncio.timeout(max(0.05, deadline - self._clock())):
                    return await fn(stub)
            except TimeoutError:
                raise _BudgetSpent() from None

        try:
            return await retry_transient(attempt_once, transient=is_transient, budget_s=budget_s,
                                         first_wait_s=0.1, max_wait_s=2.0, clock=self._clock)
        except _BudgetSpent:
            raise AgentUnreachable(node, f"{what}: agent {node} did not answer within {budget_s:.0f} s") from None
        except grpc.aio.AioRpcError as exc:
            if exc.code() in TRANSIENT_CODES:
                raise AgentUnreachable(node, f"{what}: agent {node} did not answer for {budget_s:.0f} s "
                                             f"({exc.code().name}: {exc.details()})") from exc
            raise _typed(node, what, exc) from exc

    async def long_call(self, node: str, what: str, fn: Callable[[Stub, float], Awaitable[T]], *,
                        silence_budget_s: float, tick: Callable[[], Awaitable[None]],
                        tick_interval_s: float) -> T:
        """A transfer that may outlast one RPC deadline: re-issued (the agent attaches to the work
        in flight) while `tick` runs every `tick_interval_s` (progress, cancel checks; it may raise
        to stop the call). A deadline alone does not make an agent lost; failing to answer a ping
        for `silence_budget_s` does."""
        silent_since: float | None = None
        while True:
            try:
                stub = self.stub_at(await self.address(node), node)
            except AgentUnreachable:
                if silent_since is not None and self._clock() - silent_since > silence_budget_s:
                    raise
                silent_since = silent_since or self._clock()
                await asyncio.sleep(UNREACHABLE_BACKOFF_S)  # back off before looking the node up again
                continue
            task: asyncio.Future[T] = asyncio.ensure_future(fn(stub, LONG_CALL_DEADLINE_S))
            try:
                while True:
                    done, _ = await asyncio.wait({task}, timeout=tick_interval_s)
                    if done:
                        return task.result()
                    await tick()
            except grpc.aio.AioRpcError as exc:
                if exc.code() not in TRANSIENT_CODES:
                    raise _typed(node, what, exc) from exc
                if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED and await self._answers(stub):
                    silent_since = None
                    continue  # alive and still working: attach again
                now = self._clock()
                silent_since = silent_since or now
                if now - silent_since > silence_budget_s:
                    raise AgentUnreachable(node, f"{what}: agent {node} did not answer for "
                                                 f"{silence_budget_s:.0f} s ({exc.code().name}: {exc.details()})"
                                           ) from exc
                await asyncio.sleep(UNREACHABLE_BACKOFF_S)  # back off before the next attempt
            finally:
                if not task.done():
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await task

    @staticmethod
    async def _answers(stub: Stub) -> bool:
        try:
            await stub.GetInfo(agent_pb2.GetInfoRequest(), timeout=PING_TIMEOUT_S)
        except grpc.aio.AioRpcError:
            return False
        return True
