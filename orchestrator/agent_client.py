"""Calls from the orchestrator to agents: one channel per agent, deadlines, bounded retries.

Every migration command is idempotent on the agent (keyed by job id and epoch), so calls are
retried on the transient codes only (UNAVAILABLE, DEADLINE_EXCEEDED), never on everything.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

import grpc
import grpc.aio
from tenacity import AsyncRetrying, retry_if_exception, stop_after_delay, wait_exponential

from cluster import telemetry
from orchestrator import tracing
from proto.v1 import agent_pb2_grpc

log = logging.getLogger(__name__)

TRANSIENT_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})
T = TypeVar("T")


def is_transient(exc: BaseException) -> bool:
    return isinstance(exc, grpc.aio.AioRpcError) and exc.code() in TRANSIENT_CODES


class AgentUnreachable(Exception):
    """The agent did not answer within the retry budget."""


class AgentDirectory:
    """Channels to agents by address, opened on first use and closed with the directory."""

    def __init__(self) -> None:
        self._channels: dict[str, grpc.aio.Channel] = {}

    def stub(self, address: str) -> agent_pb2_grpc.AgentServiceStub:
        channel = self._channels.get(address)
        if channel is None:
            # Tracing on: each call is a span of its job's trace, carried to the agent as traceparent.
            channel = grpc.aio.insecure_channel(
                address, interceptors=telemetry.client_interceptors(address, tracing.call_parent))
            self._channels[address] = channel
        return agent_pb2_grpc.AgentServiceStub(channel)

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()


async def call_with_retry(what: str, call: Callable[[], Awaitable[T]], *, budget_s: float) -> T:
    """Runs `call` again on transient errors until `budget_s` passes; other errors go straight up."""
    try:
        async for attempt in AsyncRetrying(
            retry=retry_if_exception(is_transient),
            stop=stop_after_delay(budget_s),
            wait=wait_exponential(multiplier=0.1, max=2.0),
            reraise=True,
        ):
            with attempt:
                return await call()
    except grpc.aio.AioRpcError as exc:
        if exc.code() in TRANSIENT_CODES:
            raise AgentUnreachable(f"{what}: agent did not answer for {budget_s:.0f} s "
                                   f"({exc.code().name}: {exc.details()})") from exc
        raise
    raise AssertionError("unreachable: AsyncRetrying either returns or raises")
