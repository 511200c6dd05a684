"""Lease refreshes over one long-lived LeaseKeepAlive stream per etcd connection, as etcd's own
client does, instead of a new stream per refresh (aetcd's `refresh_lease`).

Every agent refreshes its node lease at a third of its TTL: at a thousand agents that was 600
streams opened and closed a second, a large part of an idle etcd's CPU and of the agents'. Here a
refresh is one request on the connection's stream and its answer, matched by lease id (etcd
answers each request with the lease's id and TTL; TTL 0: the lease is gone).

A stream that fails (etcd closed it, the member went away) fails the refreshes waiting on it with
aetcd's typed errors, as a refresh of its own would have; one whose answer does not come within
the client's timeout is dropped (a frozen member). Either way the next refresh opens a new stream,
on whatever channel the client holds then (`cluster.etcd_client` moves it between members).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque

import aetcd.exceptions
import grpc
import grpc.aio
from aetcd import rpc


def typed(exc: grpc.aio.AioRpcError) -> Exception:
    """aetcd's exception for a gRPC error (ConnectionFailedError for UNAVAILABLE, ...)."""
    try:
        aetcd.exceptions._handle_exception(exc)
    except Exception as mapped:
        return mapped
    return exc


class KeepAliveStream:
    """One LeaseKeepAlive stream on one channel; `refresh` from the loop that opened it."""

    def __init__(self, stub: rpc.LeaseStub, metadata: tuple[tuple[str, str], ...] | None,
                 channel: object, generation: int) -> None:
        self.channel = channel  # the channel it runs on, and the client's generation then
        self.generation = generation
        self.broken: Exception | None = None  # why it ended; no refresh goes on it after that
        self._call = stub.LeaseKeepAlive(metadata=metadata)
        self._waiting: dict[int, deque[asyncio.Future[rpc.LeaseKeepAliveResponse]]] = {}
        self._write_lock = asyncio.Lock()
        self._reader = asyncio.create_task(self._read(), name="etcd-lease-keepalive")

    async def refresh(self, lease_id: int, timeout_s: float) -> rpc.LeaseKeepAliveResponse:
        """The lease's answer (TTL 0: gone). TimeoutError when none came within `timeout_s` (the
        stream is closed then); aetcd's errors when the stream failed."""
        if self.broken is not None:
            raise self.broken
        answer: asyncio.Future[rpc.LeaseKeepAliveResponse] = asyncio.get_running_loop().create_future()
        waiting = self._waiting.setdefault(lease_id, deque())
        waiting.append(answer)
        try:
            async with asyncio.timeout(timeout_s):
                async with self._write_lock:  # one write at a time on a stream
                    await self._call.write(rpc.LeaseKeepAliveRequest(ID=lease_id))
                return await answer
        except grpc.aio.AioRpcError as exc:
            self._fail(typed(exc))
            raise self.broken or typed(exc) from exc
        except asyncio.InvalidStateError as exc:  # written after the call ended: the reader says why
            self._fail(aetcd.exceptions.ConnectionFailedError(f"lease keepalive stream ended: {exc}"))
            raise self.broken from exc  # type: ignore[misc]
        except TimeoutError:
            self.close()
            raise
        finally:
            with contextlib.suppress(ValueError):
                waiting.remove(answer)
            if not waiting and self._waiting.get(lease_id) is waiting:
                del self._waiting[lease_id]
            if answer.done() and not answer.cancelled():
                answer.exception()  # retrieved: an answer that came too late is not an unhandled error

    async def _read(self) -> None:
        try:
            while True:
                reply = await self._call.read()
                if reply is grpc.aio.EOF:
                    raise aetcd.exceptions.ConnectionFailedError("etcd ended the lease keepalive stream")
                waiting = self._waiting.get(int(reply.ID))
                while waiting:
                    answer = waiting.popleft()
                    if not answer.done():
                        answer.set_result(reply)
                        break
        except grpc.aio.AioRpcError as exc:
            self._fail(typed(exc))
        except aetcd.exceptions.ClientError as exc:
            self._fail(exc)
        except asyncio.CancelledError:
            self._fail(aetcd.exceptions.ConnectionFailedError("lease keepalive stream closed"))
            raise

    def _fail(self, exc: Exception) -> None:
        if self.broken is None:
            self.broken = exc
        for waiting in self._waiting.values():
            for answer in waiting:
                if not answer.done():
                    answer.set_exception(self.broken)
        self._waiting.clear()

    def close(self) -> None:
        """Ends the stream; refreshes waiting on it fail as if the connection failed."""
        self._fail(aetcd.exceptions.ConnectionFailedError("lease keepalive stream closed"))
        self._call.cancel()
        self._reader.cancel()
