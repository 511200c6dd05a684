"""An etcd client that moves to another member when the one it talks to stops answering.

aetcd talks to one HOST:PORT over a plaintext channel. A cluster of three survives the loss of a
member only if its clients stop asking the lost one: here a call that fails as etcd unreachable
(UNAVAILABLE: refused, reset, "no leader"; DEADLINE_EXCEEDED: frozen, partitioned) moves the
client to the next endpoint, and the caller's own retry (reads) or re-read (writes) goes there.
The failed call still raises: whether it landed is the caller's question, as before. A call
its caller cancels after SLOW_CALL_S without an answer counts too: callers whose own deadline is
shorter than the client's would otherwise never see a member fail, and ask it forever.

With TLS the channel is a secure one; with a user, the auth token is fetched at every connect,
and an UNAUTHENTICATED answer (the token expired) reconnects, which fetches a new one.

Channels left behind are not closed at once: calls of other tasks may still be in flight on them
and would fail as cancelled, not as the member's fault. They are closed a few moves later, and
all at `close()`.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import aetcd
import aetcd.exceptions
import grpc
from aetcd import rpc, watcher

from cluster.etcd_config import EtcdConfig, parse_endpoint
from cluster.lease_keepalive import KeepAliveStream

log = logging.getLogger(__name__)
T = TypeVar("T")

# etcd did not answer (the member is gone, frozen, cut off or without a leader): another may
MEMBER_FAILED = (aetcd.exceptions.ConnectionFailedError, aetcd.exceptions.ConnectionTimeoutError)
TOKEN_REJECTED = aetcd.exceptions.UnauthenticatedError
RETIRED_CHANNELS_KEPT = 2
SLOW_CALL_S = 2.0  # a call unanswered this long, then cancelled by its caller, counts as a failed member


def _failing_over(method: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
    @functools.wraps(method)
    async def call(self: FailoverClient, *args: Any, **kwargs: Any) -> T:
        generation, started = self.generation, time.monotonic()
        try:
            return await method(self, *args, **kwargs)
        except MEMBER_FAILED as exc:
            self.fail_over(generation, exc)
            raise
        except TOKEN_REJECTED as exc:
            if self.config.user is None:
                raise
            self.fail_over(generation, exc, reauthenticate=True)
            raise
        except asyncio.CancelledError:
            # The caller gave up first (its own deadline, shorter than ours): a member that has
            # not answered for this long is as good as frozen, and a caller that always gives up
            # first would otherwise keep asking it forever.
            waited_s = time.monotonic() - started
            if waited_s >= SLOW_CALL_S:
                self.fail_over(generation, TimeoutError(f"no answer in {waited_s:.1f} s"))
            raise
    return call


class FailoverClient(aetcd.Client):
    _is_connecting: bool  # aetcd's: a connect is under way
    def __init__(self, config: EtcdConfig, timeout_s: int) -> None:
        host, port = parse_endpoint(config.endpoints[0])
        super().__init__(host=host, port=port, username=config.user, password=config.password, timeout=timeout_s)
        self.config = config
        self.generation = 0  # grows with every move; a failure reported for an older one is old news
        self._index = 0
        self._retired: list[grpc.aio.Channel] = []
        self._keepalive: KeepAliveStream | None = None  # lease refreshes, on the current channel

    @property
    def endpoint(self) -> str:
        return self.config.endpoints[self._index]

    def _credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(root_certificates=self.config.ca_pem,
                                            private_key=self.config.key_pem,
                                            certificate_chain=self.config.cert_pem)

    async def connect(self) -> None:
        """aetcd's connect, to the current endpoint, over TLS when configured."""
        if self._connected.is_set():
            return
        while len(self._retired) > RETIRED_CHANNELS_KEPT:
            await self._retired.pop(0).close()
        if self._is_connecting:
            await asyncio.wait_for(self._connected.wait(), self._connect_wait_timeout)
            return
        self._is_connecting = True
        try:
            target = self.endpoint
            options = list(self._options.items())
            if self.config.tls:
                self.channel = rpc.secure_channel(target, self._credentials(), options=options)
            else:
                self.channel = rpc.insecure_channel(target, options=options)
            self.metadata = None
            if self.config.user is not None:
                self.auth_stub = rpc.AuthStub(self.channel)
                try:
                    reply = await self.auth_stub.Authenticate(
                        rpc.AuthenticateRequest(name=self.config.user, password=self.config.password),
                        timeout=self._timeout)
                except rpc.AioRpcError as exc:
                    self._retire_current()
                    if exc.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.UNAUTHENTICATED,
                                      grpc.StatusCode.FAILED_PRECONDITION):
                        # a wrong password (INVALID_ARGUMENT), or auth not enabled on the cluster
                        raise aetcd.exceptions.UnauthenticatedError(exc.details()) from None
                    aetcd.exceptions._handle_exception(exc)
                self.metadata = (("token", reply.token),)
            self.kvstub = rpc.KVStub(self.channel)
            self.clusterstub = rpc.ClusterStub(self.channel)
            self.leasestub = rpc.LeaseStub(self.channel)
            self.maintenancestub = rpc.MaintenanceStub(self.channel)
            self._watcher = watcher.Watcher(rpc.WatchStub(self.channel), timeout=self._timeout,
                                            metadata=self.metadata)
            self._connected.set()
        finally:
            self._is_connecting = False

    def _retire_current(self) -> None:
        """Drops the current channel (closed a few moves later, in `connect`: calls of other
        tasks may still be in flight on it)."""
        if self.channel is not None:
            self._retired.append(self.channel)
        self._init_channel_attrs()
        self._connected.clear()

    def fail_over(self, generation: int, cause: Exception, *, reauthenticate: bool = False) -> None:
        """The endpoint of `generation` failed with `cause`: the next call goes to the next
        member (or, for a rejected token, reconnects and authenticates again). A single member
        is kept: gRPC reconnects to it by itself."""
        if generation != self.generation:
            return  # another call saw the same failure and moved on already
        if len(self.config.endpoints) == 1 and not reauthenticate:
            return
        failed = self.endpoint
        self._retire_current()
        self.generation += 1
        if not reauthenticate:
            self._index = (self._index + 1) % len(self.config.endpoints)
        log.warning("etcd member %s: %s; now using %s", failed, str(cause) or type(cause).__name__, self.endpoint)

    async def close(self) -> None:
        if self._keepalive is not None:
            self._keepalive.close()
            self._keepalive = None
        await super().close()
        while self._retired:
            await self._retired.pop().close()

    get = _failing_over(aetcd.Client.get)
    get_prefix = _failing_over(aetcd.Client.get_prefix)
    put = _failing_over(aetcd.Client.put)
    delete = _failing_over(aetcd.Client.delete)
    transaction = _failing_over(aetcd.Client.transaction)
    lease = _failing_over(aetcd.Client.lease)
    async def _refresh_lease(self, lease_id: int) -> rpc.LeaseKeepAliveResponse:
        """One refresh on the connection's LeaseKeepAlive stream (`cluster.lease_keepalive`),
        opened anew on the current channel when the last one failed or the client moved."""
        await self.connect()
        stream = self._keepalive
        if stream is None or stream.broken is not None or stream.channel is not self.channel \
                or stream.generation != self.generation:
            if stream is not None:
                stream.close()
            stream = self._keepalive = KeepAliveStream(self.leasestub, self.metadata, self.channel, self.generation)
        try:
            return await stream.refresh(lease_id, self._timeout)
        except TimeoutError:
            raise aetcd.exceptions.ConnectionTimeoutError(
                f"etcd did not answer a refresh of lease {lease_id:x} within {self._timeout} s") from None

    refresh_lease = _failing_over(_refresh_lease)
    revoke_lease = _failing_over(aetcd.Client.revoke_lease)
    get_lease_info = _failing_over(aetcd.Client.get_lease_info)
