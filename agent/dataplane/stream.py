"""The destination's connection reader: bytes go from the socket (or the TLS layer) straight into
the buffer of the frame that asked for them.

``asyncio.StreamReader`` copies every byte twice on the way in (the transport's recv buffer into
its own buffer, then ``readexactly`` out of it). At link speed those copies, not the network, were
what held a receiver back. ``FrameStreamProtocol`` is a ``BufferedProtocol``: while a
``readexactly(n)`` waits, the transport receives into that call's own ``bytearray(n)``, so a
frame's payload is read once, by the kernel (or decrypted once, by TLS), and handed on as it is.
Bytes that arrive with nobody waiting go to a small staging buffer; reading pauses when it is full.
A large payload's buffer is handed back with ``recycle`` once the sink has written it, and the next
payload of the same size is received into it: a fresh ``bytearray`` of 4 MiB is zeroed first, and
that zeroing cost the receiver a tenth of its time.

``FrameStreamReader`` offers the parts of ``StreamReader`` the receiver uses (``readexactly``,
``read``, ``exception``), and the connection's writer is a plain ``asyncio.StreamWriter``.
"""

from __future__ import annotations

import asyncio
from asyncio.streams import FlowControlMixin
from collections.abc import Callable

__all__ = ["DIRECT_MIN_BYTES", "RECYCLE_MIN_BYTES", "STAGING_BYTES", "FrameStreamProtocol", "FrameStreamReader"]

# Bytes received while no read waits: a header or two, an ABORT, what a refused peer still sends.
STAGING_BYTES = 256 * 1024
# A read shorter than this is served from the staging buffer, which the transport fills as far as
# it can per receive: thousands of 4 KiB frames (the last blocks of a switchover) then cost a
# receive per few dozen frames, not one per header and one per payload, each a trip round the loop.
DIRECT_MIN_BYTES = 64 * 1024
# Buffers at least this large are kept for reuse, this many at most (one being written, one being
# received, one spare).
RECYCLE_MIN_BYTES = 256 * 1024
_RECYCLED_MAX = 3


class FrameStreamReader:
    """Reads from one connection; one reader at a time (the receiver reads frames in order)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._transport: asyncio.BaseTransport | None = None
        self._staging = bytearray(STAGING_BYTES)
        self._staged_start = 0
        self._staged_end = 0
        self._target: bytearray | None = None  # the buffer a waiting read fills
        self._target_filled = 0
        self._into_target = False  # whether the buffer last handed to the transport was the target
        self._waiter: asyncio.Future[None] | None = None
        self._eof = False
        self._exception: BaseException | None = None
        self._paused = False
        self._recycled: list[bytearray] = []

    # -- the protocol's side -----------------------------------------------------------------

    def _set_transport(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport

    def _get_buffer(self) -> memoryview:
        self._into_target = self._target is not None and self._target_filled < len(self._target)
        if self._into_target:
            assert self._target is not None
            return memoryview(self._target)[self._target_filled:]
        if self._staged_start and len(self._staging) - self._staged_end < DIRECT_MIN_BYTES:
            self._compact()
        if self._staged_end == len(self._staging):
            # A full staging buffer has already paused reading, but a TLS layer may still
            # hand over what it had decrypted, so it grows rather than refuses.
            self._staging.extend(bytes(STAGING_BYTES))
        return memoryview(self._staging)[self._staged_end:]

    def _compact(self) -> None:
        staged = self._staged_end - self._staged_start
        self._staging[:staged] = self._staging[self._staged_start : self._staged_end]
        self._staged_start, self._staged_end = 0, staged

    def _buffer_updated(self, nbytes: int) -> None:
        if self._into_target:
            assert self._target is not None
            self._target_filled += nbytes
            if self._target_filled == len(self._target):
                self._wake()
            return
        self._staged_end += nbytes
        if self._staged_end == len(self._staging) and not self._paused and self._transport is not None:
            self._paused = True
            self._transport.pause_reading()  # type: ignore[attr-defined]
        self._wake()

    def _feed_eof(self) -> None:
        self._eof = True
        self._wake()

    def _set_exception(self, exc: BaseException) -> None:
        self._exception = exc
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _resume(self) -> None:
        if self._paused and self._transport is not None and not self._transport.is_closing():
            self._paused = False
            self._transport.resume_reading()  # type: ignore[attr-defined]

    async def _wait(self) -> None:
        self._waiter = self._loop.create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    # -- the reader's side -------------------------------------------------------------------

    def exception(self) -> BaseException | None:
        return self._exception

    def recycle(self, buffer: bytes | bytearray) -> None:
        """``buffer`` came from ``readexactly`` and nobody uses it any more: a later read of the
        same size may receive into it (and overwrite it)."""
        if isinstance(buffer, bytearray) and len(buffer) >= RECYCLE_MIN_BYTES and \
                len(self._recycled) < _RECYCLED_MAX and all(b is not buffer for b in self._recycled):
            self._recycled.append(buffer)

    def _new_buffer(self, n: int) -> bytearray:
        for i, buffer in enumerate(self._recycled):
            if len(buffer) == n:
                return self._recycled.pop(i)
        return bytearray(n)

    def _take_staged(self, out: bytearray, at: int) -> int:
        n = min(len(out) - at, self._staged_end - self._staged_start)
        if n:
            out[at : at + n] = self._staging[self._staged_start : self._staged_start + n]
            self._staged_start += n
            if self._staged_start == self._staged_end:
                self._staged_start = self._staged_end = 0
        return n

    async def readexactly(self, n: int) -> bytes:
        """Exactly ``n`` bytes (a ``bytearray``: the buffer they were received into, not copied),
        or ``IncompleteReadError`` at EOF, or the connection's error."""
        if n < 0:
            raise ValueError(f"readexactly size {n} is negative")
        if self._waiter is not None:
            raise RuntimeError("readexactly() called while another read is waiting on this connection")
        if n < DIRECT_MIN_BYTES:
            return await self._read_staged(n)
        out = self._new_buffer(n) if n >= RECYCLE_MIN_BYTES else bytearray(n)
        filled = self._take_staged(out, 0)
        if filled < n:
            if self._exception is not None:
                raise self._exception
            if self._eof:
                raise asyncio.IncompleteReadError(bytes(out[:filled]), n)
            self._target, self._target_filled = out, filled
            try:
                self._resume()
                while self._target_filled < n:
                    if self._exception is not None:
                        raise self._exception
                    if self._eof:
                        raise asyncio.IncompleteReadError(bytes(out[: self._target_filled]), n)
                    await self._wait()
            finally:
                self._target = None
        # A bytearray stands in for bytes everywhere a payload goes (pwrite, hashing, decoding).
        return out  # type: ignore[return-value]

    def staged(self) -> memoryview:
        """The bytes that arrived and nobody read yet (valid until the next read)."""
        return memoryview(self._staging)[self._staged_start : self._staged_end]

    async def _read_staged(self, n: int) -> bytes:
        """``n`` (small) bytes out of the staging buffer, once that many arrived there."""
        while self._staged_end - self._staged_start < n:
            if self._exception is not None:
                raise self._exception
            if self._eof:
                partial = bytes(self._staging[self._staged_start : self._staged_end])
                self._staged_start = self._staged_end = 0
                raise asyncio.IncompleteReadError(partial, n)
            if len(self._staging) - self._staged_start < n:
                self._compact()
            self._resume()
            await self._wait()
        out = self._staging[self._staged_start : self._staged_start + n]
        self._staged_start += n
        if self._staged_start == self._staged_end:
            self._staged_start = self._staged_end = 0
        return out  # type: ignore[return-value]

    async def read(self, n: int = -1) -> bytes:
        """Up to ``n`` bytes that have arrived (waits for some); b"" at EOF."""
        if self._waiter is not None:
            raise RuntimeError("read() called while another read is waiting on this connection")
        while self._staged_end == self._staged_start:
            if self._exception is not None:
                raise self._exception
            if self._eof:
                return b""
            self._resume()
            await self._wait()
        end = self._staged_end if n < 0 else min(self._staged_end, self._staged_start + n)
        data = bytes(self._staging[self._staged_start : end])
        self._staged_start = end
        if self._staged_start == self._staged_end:
            self._staged_start = self._staged_end = 0
        self._resume()
        return data


class FrameStreamProtocol(FlowControlMixin, asyncio.BufferedProtocol):
    """Server-side protocol: on connection, calls ``on_connect(reader, writer)``."""

    def __init__(self, on_connect: Callable[[FrameStreamReader, asyncio.StreamWriter], None]) -> None:
        loop = asyncio.get_running_loop()
        super().__init__(loop)
        self._event_loop = loop
        self._on_connect = on_connect
        self._reader = FrameStreamReader(loop)
        self._closed: asyncio.Future[None] = loop.create_future()
        self._transport_ssl: object = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._reader._set_transport(transport)
        self._transport_ssl = transport.get_extra_info("sslcontext")
        # No reader given: StreamWriter insists on its own class there; drain() learns of a lost
        # connection from FlowControlMixin all the same.
        writer = asyncio.StreamWriter(transport, self, None, self._event_loop)  # type: ignore[arg-type]
        self._on_connect(self._reader, writer)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._reader._get_buffer()

    def buffer_updated(self, nbytes: int) -> None:
        self._reader._buffer_updated(nbytes)

    def eof_received(self) -> bool:
        self._reader._feed_eof()
        # Keep our side open to send the last ACK (as StreamReaderProtocol does); TLS cannot.
        return self._transport_ssl is None

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is None:
            self._reader._feed_eof()
        else:
            self._reader._set_exception(exc)
        if not self._closed.done():
            self._closed.set_result(None)
        super().connection_lost(exc)

    def _get_close_waiter(self, stream: asyncio.StreamWriter) -> asyncio.Future[None]:
        return self._closed
