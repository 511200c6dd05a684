"""Source side of the migration data plane.

``DataSender`` owns one TCP connection (TLS or not) to the destination's ``DataReceiver``: it
authenticates with the job's one-time token, streams EXTENT frames under a bandwidth limit, and
waits for the ACKs of ROUND_END and FINAL.

The connection is a blocking socket that only the sender's own worker thread uses. Reading the
namespace into a reused buffer, the checksums, the sends and, with TLS, the encryption run there,
each with the GIL released, so a 4 MiB chunk is never copied into an asyncio buffer and the event
loop stays free for the agent's gRPC and guest I/O. The event loop keeps what it owns: the
bandwidth limit (``TokenBucket``) and the caller's pacing (``admit``: the node's migration pacer),
both taken before a batch is handed to the thread, at most ``_PIPELINE_DEPTH`` batches ahead.

ACKs are read by the same thread (a TLS connection is used by one thread at a time): the reply to
ROUND_END and FINAL and, looked for before each batch and after a failed send, an error ACK the
receiver sent on its own (a corrupt frame, a failed write, its shutdown). Its reason is what the
caller then gets in ``DataPlaneError``. A receiver that fails while the sender is idle is found out
by the next call.

Cancelling a call stops the thread at the next frame boundary: a stop flag is looked at after every
send and every ``_SLICE_S`` while the socket does not move. A frame cut in the middle, or a thread
that does not stop within ``_CLOSE_GRACE_S``, leaves the connection unusable: it is shut down, the
receiver sees it lost. Nothing the thread did is counted twice: ``bytes_sent`` grows by a frame's
payload once the kernel has taken the whole frame.

``stream_extents`` drives a sender from an async backend read function (one ``send_extent`` per
chunk, the next chunk read while the previous one is sent); ``DataSender.send_ranges`` is the fast
path, reading in the worker thread.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import functools
import itertools
import json
import logging
import select
import socket
import ssl as ssl_module
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

from agent.dataplane import traffic
from agent.dataplane.framing import (
    HEADER_SIZE,
    Frame,
    FrameError,
    FrameType,
    decode_frame,
    encode_frame,
    encode_header,
    extent_header,
)
from agent.dataplane.ratelimit import TokenBucket
from agent.dataplane.receiver import CAUSE_NO_SPACE, FINAL_MAX_PAYLOAD, encode_final_payload

__all__ = ["CAUSE_NO_SPACE", "DEFAULT_CHUNK_BYTES", "DataPlaneError", "DataSender", "FrameFaults", "ReadInto",
           "stream_extents"]

logger = logging.getLogger(__name__)

T = TypeVar("T")
# Reads namespace bytes at an offset into the whole of a buffer (the backend's read_raw_into).
ReadInto = Callable[[int, memoryview], None]

DEFAULT_CHUNK_BYTES = 4 * 1024 * 1024
# ACKs are small JSON documents.
_ACK_MAX_PAYLOAD = 1024 * 1024
# Batches handed to the worker thread ahead of the one it sends: it never waits for the event
# loop between two batches, and the loop's limits are taken at most this far ahead.
_PIPELINE_DEPTH = 2
# Frames per batch: scattered dirty blocks travel as many small frames, sent together.
_BATCH_FRAMES = 256
# A blocked send or receive wakes this often to look at the stop flag and the stall clock.
_SLICE_S = 0.2
# Bytes per send call: with TLS each call encrypts the whole slice before it returns.
_SEND_SLICE_BYTES = 1024 * 1024
_IOV_MAX = 64
_RECV_BYTES = 64 * 1024
# After a connection error on send, how long to wait for the receiver's own reason (an error
# ACK that raced the reset), which is more useful than ECONNRESET.
_REASON_GRACE_S = 2.0
_CLOSE_GRACE_S = 2.0
_ABORT_REASON_MAX = 4096
_CLOSED = "receiver closed the connection"


class DataPlaneError(Exception):
    """The transfer failed; ``reason`` is the receiver's (or the connection's) own explanation,
    ``cause`` what its refusal said of the kind of failure (``CAUSE_NO_SPACE``, or empty).
    ``refused``: the receiver said so itself (a not-ok ACK), rather than the connection failing."""

    def __init__(self, reason: str, *, address: str = "", job_id: str = "", cause: str = "",
                 refused: bool = False) -> None:
        self.reason = reason
        self.refused = refused
        self.address = address
        self.job_id = job_id
        self.cause = cause
        where = f"data plane to {address or '?'} (job {job_id or '?'})"
        super().__init__(f"{where}: {reason}")


def _parse_address(address: str) -> tuple[str, int]:
    host, sep, port_text = address.rpartition(":")
    if not sep or not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"data-plane address {address!r} is not 'host:port' (use '[v6addr]:port' for IPv6)")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port_text)


@dataclass(frozen=True)
class FrameFaults:
    """Test-only damage a sender does to its own EXTENT frames, so that tests can show the receiver
    catches it (InjectFault, only on an agent started with --allow-fault-injection). Each field is
    a 1-based index among the sender's EXTENT frames; 0 = off."""

    # This frame's payload gets one byte flipped *after* its checksum was computed.
    corrupt_frame: int = 0
    # This frame is sent a second time right after itself: the same bytes, the same seq.
    replay_frame: int = 0


# ---- the worker thread's side ----------------------------------------------------------------


class _Stopped(Exception):
    """The caller was cancelled; the thread stopped at a frame boundary (the stream is whole)."""


class _Broken(Exception):
    """The connection can no longer be used; ``reason`` (and ``cause``) for DataPlaneError."""

    def __init__(self, reason: str, cause: str = "", *, refused: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.cause = cause
        self.refused = refused  # the receiver's own refusal (a not-ok ACK)


class _NoAnswer(Exception):
    """No answer from the receiver by the deadline."""


class _ReadFailed(Exception):
    """Reading the namespace failed (``error``): the caller gets that error, the stream is whole."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(str(error))
        self.error = error


class _Wire:
    """The connection's socket. Only the sender's worker thread does I/O on it; the event loop
    only sets ``stop`` and may ``cut`` it to wake a thread that does not stop by itself."""

    def __init__(self, sock: socket.socket, stall_timeout_s: float) -> None:
        self.sock = sock
        self.tls = False
        self.stall_timeout_s = stall_timeout_s
        self.stop = threading.Event()
        self.cut_reason = ""
        self._swap = threading.Lock()  # the TLS wrap replaces the socket object: not while cutting it
        self._rx = bytearray()
        self._eof = False
        self._poll = select.poll()  # poll, not select: an agent's descriptors may pass FD_SETSIZE
        self._poll.register(sock.fileno(), select.POLLIN)
        sock.setblocking(True)
        sock.settimeout(_SLICE_S)

    def start_tls(self, context: ssl_module.SSLContext, server_hostname: str | None, timeout_s: float) -> None:
        with self._swap:
            if self.cut_reason:
                raise _Stopped
            self.sock = context.wrap_socket(self.sock, server_hostname=server_hostname, do_handshake_on_connect=False)
            self.tls = True
        assert isinstance(self.sock, ssl_module.SSLSocket)
        self.sock.settimeout(timeout_s)
        try:
            self.sock.do_handshake()
        finally:
            self.sock.settimeout(_SLICE_S)

    def cut(self, reason: str) -> None:
        """Wakes any call blocked on the socket (it fails); from any thread."""
        with self._swap:
            self.cut_reason = self.cut_reason or reason
            # socket.socket's own shutdown: SSLSocket's would drop its TLS state under the thread.
            with contextlib.suppress(OSError):
                socket.socket.shutdown(self.sock, socket.SHUT_RDWR)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    # -- sending ---------------------------------------------------------------------------

    def send(self, views: list[memoryview], frame_ends: list[int], on_frame: Callable[[int], None]) -> None:
        """Sends ``views`` as one byte stream holding whole frames, frame i ending at byte
        ``frame_ends[i]``; ``on_frame(i)`` once the kernel took all of frame i. Raises _Stopped
        at a frame boundary once ``stop`` is set, _Broken on a stall or a frame cut by a stop,
        OSError when the connection fails."""
        queue = collections.deque(v for v in views if len(v))
        sent = 0
        done = 0  # frames handed over
        last_progress = time.monotonic()
        while queue:
            if self.stop.is_set() and (sent == 0 or sent == frame_ends[done - 1]):
                raise _Stopped
            try:
                if self.tls:
                    n = self.sock.send(queue[0][:_SEND_SLICE_BYTES])
                else:
                    n = self.sock.sendmsg(list(itertools.islice(queue, _IOV_MAX)))
            except TimeoutError:
                if self.stop.is_set():
                    raise _Broken("the send was cancelled while the receiver took no data; the connection "
                                  "was cut inside a frame") from None
                if time.monotonic() - last_progress >= self.stall_timeout_s:
                    raise _Broken(f"receiver accepted no data for {self.stall_timeout_s}s; the destination is "
                                  "stuck or the link is down") from None
                continue
            last_progress = time.monotonic()
            sent += n
            while n:
                head = queue[0]
                if n >= len(head):
                    n -= len(head)
                    queue.popleft()
                else:
                    queue[0] = head[n:]
                    n = 0
            while done < len(frame_ends) and frame_ends[done] <= sent:
                on_frame(done)
                done += 1

    # -- receiving -------------------------------------------------------------------------

    def _fill(self, wait: bool) -> None:
        """Receives what has arrived; with ``wait``, waits up to _SLICE_S for something."""
        if self._eof:
            return
        try:
            if wait:
                data = self.sock.recv(_RECV_BYTES)
            else:
                pending = isinstance(self.sock, ssl_module.SSLSocket) and self.sock.pending()
                if not pending and not self._poll.poll(0):
                    return
                # Without waiting: with TLS, readable may mean a record that holds no data.
                self.sock.settimeout(0.0)
                try:
                    data = self.sock.recv(_RECV_BYTES)
                finally:
                    self.sock.settimeout(_SLICE_S)
        except (BlockingIOError, InterruptedError, TimeoutError, ssl_module.SSLWantReadError,
                ssl_module.SSLWantWriteError):
            return
        if data:
            self._rx += data
        else:
            self._eof = True

    def _take(self) -> Frame | None:
        decoded = decode_frame(self._rx, max_payload=_ACK_MAX_PAYLOAD)
        if decoded is None:
            return None
        frame, used = decoded
        del self._rx[:used]
        return frame

    def poll_frame(self) -> Frame | None:
        """A whole frame the receiver has sent, if one has arrived; never waits. FrameError for
        a corrupt one; _Broken if the receiver closed the connection."""
        self._fill(wait=False)
        frame = self._take()
        if frame is None and self._eof:
            raise _Broken(_CLOSED)
        return frame

    def wait_readable(self) -> None:
        """Waits up to _SLICE_S for something to receive."""
        self._fill(wait=True)

    def recv_frame(self, deadline: float) -> Frame | None:
        """The next frame, None at EOF; _NoAnswer past ``deadline`` (monotonic)."""
        while True:
            frame = self._take()
            if frame is not None:
                return frame
            if self._eof:
                if self._rx:
                    raise FrameError(f"receiver closed the connection inside a frame ({len(self._rx)} bytes)")
                return None
            if self.stop.is_set():
                raise _Stopped
            if time.monotonic() >= deadline:
                raise _NoAnswer
            self._fill(wait=True)


@dataclass
class _Batch:
    """Frames sent together: (offset, length) pieces, each one frame, read into one buffer."""

    pieces: list[tuple[int, int]]
    nbytes: int
    sent: int = 0  # payload bytes of its frames that the kernel took (written by the thread)
    buffer: bytearray | None = field(default=None, repr=False)


def _batches(extents: Iterable[tuple[int, int]], chunk_bytes: int) -> Iterator[_Batch]:
    pieces: list[tuple[int, int]] = []
    nbytes = 0
    for offset, length in _chunks(extents, chunk_bytes):
        if pieces and (nbytes + length > chunk_bytes or len(pieces) == _BATCH_FRAMES):
            yield _Batch(pieces, nbytes)
            pieces, nbytes = [], 0
        pieces.append((offset, length))
        nbytes += length
    if pieces:
        yield _Batch(pieces, nbytes)


# ---- the sender --------------------------------------------------------------------------------


class DataSender:
    """One authenticated data-plane connection for one job. Create with ``await DataSender.connect``."""

    def __init__(self, sock: socket.socket, *, address: str, job_id: str, bucket: TokenBucket,
                 stall_timeout_s: float) -> None:
        # Use connect(): it authenticates before handing the sender out.
        self._wire = _Wire(sock, stall_timeout_s)
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1,
                                                               thread_name_prefix=f"dataplane-send-{job_id}")
        self._lock = asyncio.Lock()  # one call at a time on the connection
        self._address = address
        self._job_id = job_id
        self._bucket = bucket
        self._stall_timeout_s = stall_timeout_s
        self._bytes_sent = 0  # written by the worker thread only
        self._extent_frames = 0  # likewise
        self._error: str | None = None
        self._error_cause = ""
        self._refused = False  # the error is the receiver's own refusal (a not-ok ACK)
        self._closed = False
        self._inflight: set[asyncio.Future[Any]] = set()
        self._buffers: list[bytearray] = []
        self.faults = FrameFaults()  # tests only
        self.takes_guest_map = False  # the receiver listed the "guest_map" feature in its HELLO ACK

    # -- construction ----------------------------------------------------------------------

    @classmethod
    async def connect(
        cls,
        address: str,
        job_id: str,
        token: str,
        *,
        bandwidth_bytes_per_s: int | None = None,
        connect_timeout_s: float = 5.0,
        stall_timeout_s: float = 60.0,
        ssl: ssl_module.SSLContext | None = None,
        server_hostname: str | None = None,
    ) -> DataSender:
        """Connect to ``address`` ("host:port"), authenticate and return a ready sender.

        ``stall_timeout_s`` bounds how long a send may wait for the receiver to take data
        (a cut link otherwise blocks a full socket forever).
        """
        host, port = _parse_address(address)
        bucket = TokenBucket(bandwidth_bytes_per_s)
        try:
            async with asyncio.timeout(connect_timeout_s):
                sock = await _open_socket(host, port)
        except TimeoutError:
            raise DataPlaneError(
                f"timed out after {connect_timeout_s}s connecting; check the destination agent is up and "
                "the data-plane address is reachable",
                address=address,
                job_id=job_id,
            ) from None
        except OSError as exc:
            raise DataPlaneError(
                f"cannot connect: {exc}; check the destination agent is up and listening on that address",
                address=address,
                job_id=job_id,
            ) from exc
        sender = cls(sock, address=address, job_id=job_id, bucket=bucket, stall_timeout_s=stall_timeout_s)
        try:
            ack = await sender._call(lambda: sender._handshake(job_id, token, ssl, server_hostname,
                                                               connect_timeout_s))
        except BaseException:
            await sender.close()
            raise
        body = _ack_body(ack)
        if ack is None or ack.type != FrameType.ACK or not body.get("ok"):
            await sender.close()
            reason = body.get("error") if ack is not None else None
            raise DataPlaneError(
                str(reason or "receiver closed the connection without answering HELLO"),
                address=address,
                job_id=job_id,
            )
        features = body.get("features")
        sender.takes_guest_map = isinstance(features, list) and "guest_map" in features
        return sender

    def _handshake(self, job_id: str, token: str, context: ssl_module.SSLContext | None,
                   server_hostname: str | None, timeout_s: float) -> Frame | None:
        """In the thread: TLS (with the destination's name checked), HELLO, its ACK."""
        deadline = time.monotonic() + timeout_s
        wire = self._wire
        try:
            if context is not None:
                try:
                    wire.start_tls(context, server_hostname, timeout_s)
                except ssl_module.SSLCertVerificationError as exc:
                    raise _Broken(f"the data plane at that address is not node {server_hostname!r}'s: "
                                  f"{exc.verify_message}; nothing was sent") from exc
            hello = encode_frame(Frame(FrameType.HELLO, payload=json.dumps({"job_id": job_id,
                                                                            "token": token}).encode()))
            wire.send([memoryview(hello)], [len(hello)], _ignore)
            return wire.recv_frame(deadline)
        except (_NoAnswer, TimeoutError):  # (TimeoutError: the TLS handshake's own)
            raise _Broken(f"handshake failed: no answer to HELLO within {timeout_s}s") from None
        except (OSError, FrameError) as exc:
            if wire.cut_reason:
                raise _Stopped from None
            raise _Broken(f"handshake failed: {exc}") from None

    # -- public API ------------------------------------------------------------------------

    @property
    def bytes_sent(self) -> int:
        """EXTENT payload bytes the kernel took so far (headers not counted)."""
        return self._bytes_sent

    @property
    def address(self) -> str:
        return self._address

    @property
    def job_id(self) -> str:
        return self._job_id

    @property
    def error(self) -> str | None:
        """Why this sender can no longer be used, or None while it is (as far as it knows) healthy."""
        return self._error

    def set_bandwidth(self, bytes_per_s: int | None) -> None:
        """Change the limit (None/0 = unlimited); applies to the next batch and to waiters within 0.1 s."""
        self._bucket.set_rate(bytes_per_s)

    async def send_extent(self, offset: int, data: bytes) -> None:
        """Send ``data`` for namespace byte ``offset``; returns when the kernel took all of it."""
        if offset < 0:
            raise ValueError(f"extent offset {offset} is negative")
        self._raise_if_failed()
        if not data:
            return
        async with self._lock:
            await self._bucket.acquire(len(data) + HEADER_SIZE)
            self._raise_if_failed()
            batch = _Batch([(offset, len(data))], len(data))
            try:
                await self._call(lambda: self._send_given(batch, data))
            finally:
                traffic.SENT.add(batch.sent)

    async def send_ranges(
        self,
        read_into: ReadInto,
        extents: Iterable[tuple[int, int]],
        *,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        admit: Callable[[int], Awaitable[None]] | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> int:
        """Send each ``(offset, length)`` extent, read by ``read_into`` in the worker thread, in
        frames of at most ``chunk_bytes``; return the payload bytes sent.

        Small extents travel together, up to ``chunk_bytes`` or _BATCH_FRAMES frames per batch.
        Before a batch is handed to the thread, ``admit(nbytes)`` (the node's pacer) and the
        bandwidth limit are awaited on the event loop; ``progress(total)`` after each batch. A
        read error propagates unchanged (frames before it were sent; the connection stays good).
        """
        if chunk_bytes <= 0:
            raise ValueError(f"chunk_bytes={chunk_bytes} must be positive")
        self._raise_if_failed()
        total = 0
        async with self._lock:
            inflight: collections.deque[tuple[_Batch, asyncio.Future[None]]] = collections.deque()

            async def finish_one() -> None:
                nonlocal total
                batch, fut = inflight.popleft()
                try:
                    await self._outcome(fut)
                finally:
                    self._settled(batch)
                total += batch.nbytes
                if progress is not None:
                    progress(total)

            try:
                for batch in _batches(extents, chunk_bytes):
                    while len(inflight) >= _PIPELINE_DEPTH:
                        await finish_one()
                    if admit is not None:
                        await admit(batch.nbytes)
                    await self._bucket.acquire(batch.nbytes + HEADER_SIZE * len(batch.pieces))
                    self._raise_if_failed()
                    batch.buffer = self._take_buffer(chunk_bytes)
                    inflight.append((batch, self._submit(functools.partial(self._send_read, batch, read_into))))
                while inflight:
                    await finish_one()
            except BaseException:
                # Cancelled, or a batch failed: the ones behind it stop at a frame boundary.
                if inflight:
                    await self._stop_thread([fut for _, fut in inflight])
                    for batch, fut in inflight:
                        self._settled(batch)
                        if not fut.cancelled():
                            fut.exception()  # retrieved: the first failure is the one that counts
                raise
        return total

    async def end_round(self, round: int, timeout_s: float = 60) -> dict[str, Any]:
        """End round ``round``; returns the receiver's ACK body once everything before it is applied."""
        frame = Frame(FrameType.ROUND_END, seq=round)
        body = await self._request(frame, what=f"round {round}", timeout_s=timeout_s, seq=round)
        if body.get("kind") != "round_end":
            self._fail(f"protocol error: ACK for round {round} has kind {body.get('kind')!r}")
            self._raise_if_failed()
        return body

    async def send_final(self, state_blob: bytes, guest_blob: bytes, timeout_s: float = 60) -> dict[str, Any]:
        """Send controller and guest state; returns the ACK once the destination loaded them."""
        payload = encode_final_payload(state_blob, guest_blob)
        if len(payload) > FINAL_MAX_PAYLOAD:
            raise ValueError(
                f"state ({len(state_blob)} bytes) + guest ({len(guest_blob)} bytes) blobs exceed the "
                f"{FINAL_MAX_PAYLOAD}-byte FINAL limit; send bulk data as extents instead"
            )
        body = await self._request(Frame(FrameType.FINAL, payload=payload), what="FINAL", timeout_s=timeout_s,
                                   payload_bytes=len(state_blob) + len(guest_blob))
        if body.get("kind") != "final":
            self._fail(f"protocol error: ACK for FINAL has kind {body.get('kind')!r}")
            self._raise_if_failed()
        return body

    async def send_plan(self, plan: bytes) -> None:
        """The switchover plan, for the destination to commit once FINAL is loaded (no ACK of its own)."""
        await self._send_unacknowledged(Frame(FrameType.SWITCHOVER_PLAN, payload=plan))

    async def send_guest_map(self, piece: bytes) -> None:
        """A piece of the guest's map; the next ROUND_END's ACK says it was applied. Only to a
        receiver that `takes_guest_map`."""
        await self._send_unacknowledged(Frame(FrameType.GUEST_MAP, payload=piece))
        traffic.SENT.add(len(piece))

    async def _send_unacknowledged(self, frame: Frame) -> None:
        self._raise_if_failed()
        data = encode_frame(frame)
        async with self._lock:
            await self._call(functools.partial(self._wire.send, [memoryview(data)], [len(data)], _ignore))

    async def abort(self, reason: str) -> None:
        """Tell the receiver we give up (best effort), then close."""
        if not self._closed and not self._wire.cut_reason:
            data = encode_frame(Frame(FrameType.ABORT, payload=reason.encode("utf-8", "replace")[:_ABORT_REASON_MAX]))
            with contextlib.suppress(Exception):
                async with asyncio.timeout(_CLOSE_GRACE_S), self._lock:
                    await self._call(functools.partial(self._wire.send, [memoryview(data)], [len(data)], _ignore))
        self._set_error(f"aborted by the source: {reason}")
        await self.close()

    async def close(self) -> None:
        """Stop the worker thread and close the connection. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._set_error("sender closed")
        if self._inflight:
            await self._stop_thread(list(self._inflight))
        # The socket is closed by the thread itself, after anything it still runs: closing it under
        # a thread blocked in a call on it could hand its descriptor to somebody else's file.
        closing = asyncio.wrap_future(self._executor.submit(self._wire.close))
        self._executor.shutdown(wait=False)
        self._buffers.clear()
        try:
            await asyncio.wait_for(asyncio.shield(closing), _CLOSE_GRACE_S)
        except TimeoutError:
            self._wire.cut("the sender closed while its thread was still busy")

    async def __aenter__(self) -> DataSender:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # -- the worker thread's jobs ----------------------------------------------------------

    def _check_incoming(self) -> None:
        """Before sending: has the receiver given up (an error ACK, or the connection closed)?"""
        try:
            frame = self._wire.poll_frame()
        except FrameError as exc:
            raise _Broken(f"corrupt frame from receiver: {exc}") from None
        if frame is not None:
            body = _ack_body(frame)
            if frame.type == FrameType.ACK and body.get("ok") is False:
                raise _Broken(str(body.get("error") or "receiver reported a failure without a reason"),
                              str(body.get("cause") or ""), refused=True)
            raise _Broken(f"protocol error: unexpected {frame.type.name} {body!r} from the receiver with no "
                          "request outstanding")

    def _lost(self, exc: OSError) -> _Broken:
        """The connection failed under a send: the receiver's reason if it sent one in time."""
        if self._wire.cut_reason:
            return _Broken(self._wire.cut_reason)
        deadline = time.monotonic() + _REASON_GRACE_S
        try:
            while True:
                self._check_incoming()
                if time.monotonic() >= deadline:
                    break
                self._wire.wait_readable()
        except _Broken as refusal:
            if refusal.reason != _CLOSED:
                return refusal
        except (FrameError, OSError):
            pass
        return _Broken(f"connection to receiver lost: {exc!r}")

    def _send_frames(self, batch: _Batch, views: list[memoryview], frame_ends: list[int], first_seq: int) -> None:
        """Sends the batch's frames (``views`` hold them back to back, frame i ending at
        ``frame_ends[i]``), counting each once the kernel took all of it."""
        pieces: list[int | None] = list(range(len(frame_ends)))  # None: a replayed copy, not counted
        replay = self.faults.replay_frame - first_seq
        if 0 <= replay < len(frame_ends):
            views, frame_ends, pieces = _replayed(views, frame_ends, replay)

        def on_frame(i: int) -> None:
            piece = pieces[i]
            if piece is None:
                return
            length = batch.pieces[piece][1]
            batch.sent += length
            self._bytes_sent += length
            self._extent_frames = first_seq + piece  # frames built but not sent give their numbers back

        self._extent_frames = first_seq - 1
        try:
            self._check_incoming()
            self._wire.send(views, frame_ends, on_frame)
        except OSError as exc:
            raise self._lost(exc) from None

    def _header(self, offset: int, seq: int, payload: memoryview) -> bytes:
        header = extent_header(offset, seq, payload)
        if seq == self.faults.corrupt_frame:  # frames count from 1: an index of 0 (off) never matches
            payload[len(payload) // 2] ^= 0x01
        return header

    def _send_read(self, batch: _Batch, read_into: ReadInto) -> None:
        """In the thread: read the batch's pieces into its buffer, each behind its header, and
        send the lot."""
        if self._wire.stop.is_set():
            raise _Stopped
        assert batch.buffer is not None
        view = memoryview(batch.buffer)
        first_seq = self._extent_frames + 1
        at = 0
        frame_ends: list[int] = []
        for i, (offset, length) in enumerate(batch.pieces):
            payload = view[at + HEADER_SIZE : at + HEADER_SIZE + length]
            try:
                read_into(offset, payload)
            except Exception as exc:
                raise _ReadFailed(exc) from exc
            view[at : at + HEADER_SIZE] = self._header(offset, first_seq + i, payload)
            at += HEADER_SIZE + length
            frame_ends.append(at)
        self._send_frames(batch, [view[:at]], frame_ends, first_seq)

    def _send_given(self, batch: _Batch, data: bytes) -> None:
        """In the thread: one EXTENT frame of the caller's bytes."""
        offset = batch.pieces[0][0]
        seq = self._extent_frames + 1
        payload = memoryview(data)
        if self.faults.corrupt_frame == seq:
            payload = memoryview(bytearray(data))  # the caller's bytes stay as they are
        header = self._header(offset, seq, payload)
        self._send_frames(batch, [memoryview(header), payload], [HEADER_SIZE + len(data)], seq)

    def _send_request(self, data: bytes, timeout_s: float, sent: list[bool]) -> Frame | None:
        """In the thread: a frame that wants an ACK, and the ACK."""
        try:
            self._check_incoming()
            self._wire.send([memoryview(data)], [len(data)], _ignore)
            sent.append(True)
            return self._wire.recv_frame(time.monotonic() + timeout_s)
        except OSError as exc:
            raise self._lost(exc) from None
        except FrameError as exc:
            raise _Broken(f"corrupt frame from receiver: {exc}") from None

    # -- internals -------------------------------------------------------------------------

    def _take_buffer(self, chunk_bytes: int) -> bytearray:
        size = chunk_bytes + _BATCH_FRAMES * HEADER_SIZE
        while self._buffers:
            buffer = self._buffers.pop()
            if len(buffer) == size:
                return buffer
        return bytearray(size)

    def _settled(self, batch: _Batch) -> None:
        """A batch's thread job is over: count what it sent, keep its buffer for the next."""
        traffic.SENT.add(batch.sent)
        batch.sent = 0  # counted once, however often this is called
        if batch.buffer is not None and len(self._buffers) < _PIPELINE_DEPTH:
            self._buffers.append(batch.buffer)
        batch.buffer = None

    def _submit(self, job: Callable[[], T]) -> asyncio.Future[T]:
        fut = asyncio.wrap_future(self._executor.submit(self._translated, job))
        self._inflight.add(fut)
        fut.add_done_callback(self._job_done)
        return fut

    def _translated(self, job: Callable[[], T]) -> T:
        try:
            return job()
        except (_Stopped, _Broken, _ReadFailed, _NoAnswer):
            raise
        except Exception as exc:  # never lose a thread's failure: it would look like success
            logger.exception("data-plane sender thread for job %s failed", self._job_id)
            raise _Broken(f"internal error in the data-plane sender: {exc!r}") from exc

    def _job_done(self, fut: asyncio.Future[Any]) -> None:
        self._inflight.discard(fut)
        if fut.cancelled():
            return
        exc = fut.exception()
        if isinstance(exc, _Broken):
            self._fail(exc.reason, exc.cause, refused=exc.refused)

    async def _call(self, job: Callable[[], T]) -> T:
        """Runs ``job`` in the worker thread; a cancelled caller stops it first (see _stop_thread)."""
        fut = self._submit(job)
        try:
            return await self._outcome(fut)
        except asyncio.CancelledError:
            await self._stop_thread([fut])
            raise

    async def _outcome(self, fut: asyncio.Future[T]) -> T:
        """The result of a thread job, its failures as the caller should see them."""
        try:
            return await asyncio.shield(fut)
        except _Stopped:
            raise asyncio.CancelledError from None  # only a cancelled caller stops the thread
        except _Broken as exc:
            self._fail(exc.reason, exc.cause, refused=exc.refused)
            self._raise_if_failed()
            raise AssertionError("unreachable") from None
        except _ReadFailed as exc:
            raise exc.error from None

    async def _stop_thread(self, futs: list[asyncio.Future[Any]]) -> None:
        """Stops the thread's jobs ``futs`` at a frame boundary; cuts the connection if they do not
        stop within _CLOSE_GRACE_S. Returns once they are over (or the thread is stuck in a read)."""
        self._wire.stop.set()
        try:
            pending = {fut for fut in futs if not fut.done()}
            if pending:
                _, pending = await asyncio.wait(pending, timeout=_CLOSE_GRACE_S)
            if pending:
                self._wire.cut(f"a cancelled send did not stop within {_CLOSE_GRACE_S}s; the connection was cut")
                self._fail(self._wire.cut_reason)
                await asyncio.wait(pending, timeout=_CLOSE_GRACE_S)
        finally:
            for fut in futs:
                if fut.done() and not fut.cancelled():
                    fut.exception()  # retrieved
            if not self._inflight:
                self._wire.stop.clear()

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise DataPlaneError(self._error, address=self._address, job_id=self._job_id,
                                 cause=self._error_cause, refused=self._refused)

    def _set_error(self, reason: str, cause: str = "", *, refused: bool = False) -> None:
        # The first reason wins: later ones are consequences.
        if self._error is None:
            self._error = reason
            self._error_cause = cause
            self._refused = refused

    def _fail(self, reason: str, cause: str = "", *, refused: bool = False) -> None:
        """Mark the sender unusable and wake its thread, which then fails its job."""
        self._set_error(reason, cause, refused=refused)
        self._wire.cut(reason)

    async def _request(self, frame: Frame, *, what: str, timeout_s: float, seq: int | None = None,
                       payload_bytes: int = 0) -> dict[str, Any]:
        """Sends `frame` and waits for its ACK; `payload_bytes` of it are migration data (the
        rest is framing), counted as sent once the kernel took the frame."""
        self._raise_if_failed()
        data = encode_header(frame) + frame.payload
        sent: list[bool] = []
        async with self._lock:
            try:
                ack = await self._call(lambda: self._send_request(data, timeout_s, sent))
            except asyncio.CancelledError:
                # Its ACK may still come, and would answer the next request: no next request. The
                # connection itself is whole, so abort() still tells the receiver why.
                self._set_error(f"cancelled while waiting for the ACK of {what}")
                raise
            except _NoAnswer:
                self._fail(f"no ACK for {what} within {timeout_s}s; the destination is stuck or the link is down")
                self._raise_if_failed()
                raise AssertionError("unreachable") from None
            finally:
                if sent:
                    traffic.SENT.add(payload_bytes)
        if ack is None:
            self._fail("receiver closed the connection")
            self._raise_if_failed()
        assert ack is not None
        body = _ack_body(ack)
        if ack.type != FrameType.ACK or "ok" not in body:
            self._fail(f"protocol error: receiver sent {ack.type.name} {body!r}, expected an ACK")
        elif not body["ok"]:
            self._fail(str(body.get("error") or "receiver reported a failure without a reason"),
                       str(body.get("cause") or ""), refused=True)
        elif seq is not None and ack.seq != seq:
            self._fail(f"protocol error: expected ACK for {what}, got one with seq {ack.seq}")
        self._raise_if_failed()
        return body


async def _open_socket(host: str, port: int) -> socket.socket:
    """A connected TCP socket to ``host:port`` (each address ``host`` resolves to, in turn)."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    last: OSError | None = None
    for family, kind, proto, _, addr in infos:
        sock = socket.socket(family, kind, proto)
        try:
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            await loop.sock_connect(sock, addr)
            return sock
        except OSError as exc:
            sock.close()
            last = exc
        except BaseException:
            sock.close()
            raise
    raise last or OSError(f"{host!r} resolves to no address")


def _cut(views: list[memoryview], start: int, end: int) -> list[memoryview]:
    """The views covering bytes ``start`` to ``end`` of ``views`` taken back to back."""
    out: list[memoryview] = []
    at = 0
    for view in views:
        lo, hi = max(start, at), min(end, at + len(view))
        if lo < hi:
            out.append(view[lo - at : hi - at])
        at += len(view)
    return out


def _replayed(views: list[memoryview], frame_ends: list[int], index: int
              ) -> tuple[list[memoryview], list[int], list[int | None]]:
    """Frame ``index`` of the stream twice in a row (FrameFaults.replay_frame): the views, the
    frame ends, and which frame each one is (None for the copy)."""
    start = frame_ends[index - 1] if index else 0
    end = frame_ends[index]
    size = end - start
    views = _cut(views, 0, end) + _cut(views, start, end) + _cut(views, end, frame_ends[-1])
    ends = frame_ends[: index + 1] + [end + size] + [e + size for e in frame_ends[index + 1 :]]
    pieces: list[int | None] = [*range(index + 1), None, *range(index + 1, len(frame_ends))]
    return views, ends, pieces


def _ignore(_: int) -> None:
    pass


def _ack_body(frame: Frame | None) -> dict[str, Any]:
    if frame is None:
        return {}
    try:
        body = json.loads(frame.payload) if frame.payload else {}
    except (ValueError, RecursionError):  # RecursionError: JSON nested deeper than the parser recurses
        return {"ok": False, "error": f"undecodable ACK payload {frame.payload[:100]!r}"}
    return body if isinstance(body, dict) else {"ok": False, "error": f"ACK payload is not an object: {body!r}"}


def _chunks(extents: Iterable[tuple[int, int]], chunk_bytes: int) -> Iterator[tuple[int, int]]:
    for offset, length in extents:
        if offset < 0 or length < 0:
            raise ValueError(f"extent (offset={offset}, length={length}) has a negative field")
        end = offset + length
        while offset < end:
            n = min(chunk_bytes, end - offset)
            yield offset, n
            offset += n


async def stream_extents(
    sender: DataSender,
    read: Callable[[int, int], Awaitable[bytes]],
    extents: Iterable[tuple[int, int]],
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    progress: Callable[[int], None] | None = None,
) -> int:
    """Read each ``(offset, length)`` extent in ``chunk_bytes`` pieces and send it; return bytes sent.

    The next piece is read while the current one is being sent (pipeline depth 2).
    ``progress`` is called after each piece with the bytes sent so far by this call
    (cumulative). Errors from ``read`` propagate unchanged; a short read raises DataPlaneError.
    """
    if chunk_bytes <= 0:
        raise ValueError(f"chunk_bytes={chunk_bytes} must be positive")
    pieces = _chunks(extents, chunk_bytes)
    total = 0

    def start(piece: tuple[int, int] | None) -> asyncio.Future[bytes] | None:
        if piece is None:
            return None
        return asyncio.ensure_future(read(*piece))

    current = next(pieces, None)
    pending = start(current)
    try:
        while current is not None and pending is not None:
            offset, length = current
            data = await pending
            if len(data) != length:
                raise DataPlaneError(
                    f"read({offset}, {length}) returned {len(data)} bytes; the source namespace is smaller "
                    "than the extent list says",
                    address=sender.address,
                    job_id=sender.job_id,
                )
            current = next(pieces, None)
            pending = start(current)
            await sender.send_extent(offset, data)
            total += length
            if progress is not None:
                progress(total)
    finally:
        # This function owns the read-ahead task: never leave it running behind the caller.
        if pending is not None:
            if not pending.done():
                pending.cancel()
                await asyncio.wait({pending})
            if not pending.cancelled():
                pending.exception()  # retrieved: the caller already has the error that stopped us
    return total
