"""Source side of the migration data plane.

``DataSender`` owns one TCP connection to the destination's ``DataReceiver``: it authenticates
with the job's one-time token, streams EXTENT frames under a bandwidth limit, and waits for the
ACKs of ROUND_END and FINAL. A background read task (owned by the sender, cancelled by
``close``) watches the connection, so when the receiver fails mid-stream (corrupt frame, sink
error, shutdown) the next call raises ``DataPlaneError`` with the receiver's reason instead of
hanging on a full socket buffer.

``stream_extents`` drives a sender from a backend read function with a two-deep pipeline: the
next chunk is read while the previous one is on the wire.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import ssl as ssl_module
from collections.abc import Awaitable, Callable, Iterable, Iterator
from typing import Any

from agent.dataplane import traffic
from agent.dataplane.framing import (
    HEADER_SIZE,
    Frame,
    FrameError,
    FrameType,
    encode_frame,
    encode_header,
    read_frame,
)
from agent.dataplane.ratelimit import TokenBucket
from agent.dataplane.receiver import CAUSE_NO_SPACE, FINAL_MAX_PAYLOAD, STREAM_LIMIT, encode_final_payload

__all__ = ["CAUSE_NO_SPACE", "DEFAULT_CHUNK_BYTES", "DataPlaneError", "DataSender", "stream_extents"]

logger = logging.getLogger(__name__)

DEFAULT_CHUNK_BYTES = 4 * 1024 * 1024
# ACKs are small JSON documents.
_ACK_MAX_PAYLOAD = 1024 * 1024
# Let a few chunks queue in the transport so the next write does not wait for the kernel to
# drain the previous one completely (keeps the socket busy between our writes).
_WRITE_HIGH_WATER = 8 * 1024 * 1024
# After a connection error on write, how long to wait for the read task to deliver the
# receiver's own reason (an error ACK that raced the reset), which is more useful than ECONNRESET.
_REASON_GRACE_S = 2.0
_CLOSE_GRACE_S = 2.0
_ABORT_REASON_MAX = 4096


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


class DataSender:
    """One authenticated data-plane connection for one job. Create with ``await DataSender.connect``."""

    # Fault hook for tests: 1-based index among EXTENT frames of this sender whose payload gets
    # one byte flipped *after* its checksum was computed, so the receiver must detect it. 0 = off.
    corrupt_frame: int = 0

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        address: str,
        job_id: str,
        bucket: TokenBucket,
        stall_timeout_s: float,
    ) -> None:
        # Use connect(); this constructor expects a connection that already passed HELLO.
        self._reader = reader
        self._writer = writer
        self._address = address
        self._job_id = job_id
        self._bucket = bucket
        self._stall_timeout_s = stall_timeout_s
        self._bytes_sent = 0
        self._extent_frames = 0
        self._error: str | None = None
        self._error_cause = ""
        self._refused = False  # the error is the receiver's own refusal (a not-ok ACK)
        self._closed = False
        self.corrupt_frame = 0
        # ACKs come back in request order (the receiver handles frames strictly in order).
        self._waiters: collections.deque[asyncio.Future[tuple[Frame, dict[str, Any]]]] = collections.deque()
        self._read_task: asyncio.Task[None] = asyncio.get_running_loop().create_task(
            self._read_loop(), name=f"dataplane-sender-read-{job_id}"
        )

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

        ``stall_timeout_s`` bounds how long one write may wait for the receiver to take data
        (a cut link otherwise blocks a full socket forever).
        """
        host, port = _parse_address(address)
        bucket = TokenBucket(bandwidth_bytes_per_s)
        try:
            async with asyncio.timeout(connect_timeout_s):
                # With TLS the destination must present `server_hostname`'s certificate (its node).
                reader, writer = await asyncio.open_connection(host, port, limit=STREAM_LIMIT, ssl=ssl,
                                                               server_hostname=server_hostname if ssl else None)
        except TimeoutError:
            raise DataPlaneError(
                f"timed out after {connect_timeout_s}s connecting; check the destination agent is up and "
                "the data-plane address is reachable",
                address=address,
                job_id=job_id,
            ) from None
        except ssl_module.SSLCertVerificationError as exc:
            raise DataPlaneError(
                f"the data plane at that address is not node {server_hostname!r}'s: {exc.verify_message}; "
                "nothing was sent",
                address=address,
                job_id=job_id,
            ) from exc
        except OSError as exc:
            raise DataPlaneError(
                f"cannot connect: {exc}; check the destination agent is up and listening on that address",
                address=address,
                job_id=job_id,
            ) from exc

        writer.transport.set_write_buffer_limits(high=_WRITE_HIGH_WATER)
        hello = Frame(FrameType.HELLO, payload=json.dumps({"job_id": job_id, "token": token}).encode())
        try:
            async with asyncio.timeout(connect_timeout_s):
                writer.write(encode_frame(hello))
                await writer.drain()
                ack = await read_frame(reader, max_payload=_ACK_MAX_PAYLOAD)
        except asyncio.CancelledError:
            writer.transport.abort()  # nobody else owns this connection yet
            raise
        except (TimeoutError, OSError, FrameError) as exc:
            writer.transport.abort()
            what = f"no answer to HELLO within {connect_timeout_s}s" if isinstance(exc, TimeoutError) else exc
            raise DataPlaneError(f"handshake failed: {what}", address=address, job_id=job_id) from None
        body = _ack_body(ack)
        if ack is None or ack.type != FrameType.ACK or not body.get("ok"):
            writer.transport.abort()
            reason = body.get("error") if ack is not None else None
            raise DataPlaneError(
                str(reason or "receiver closed the connection without answering HELLO"),
                address=address,
                job_id=job_id,
            )
        return cls(reader, writer, address=address, job_id=job_id, bucket=bucket, stall_timeout_s=stall_timeout_s)

    # -- public API ------------------------------------------------------------------------

    @property
    def bytes_sent(self) -> int:
        """EXTENT payload bytes handed to the connection so far (headers not counted)."""
        return self._bytes_sent

    @property
    def address(self) -> str:
        return self._address

    @property
    def job_id(self) -> str:
        return self._job_id

    @property
    def error(self) -> str | None:
        """Why this sender can no longer be used, or None while it is healthy."""
        return self._error

    def set_bandwidth(self, bytes_per_s: int | None) -> None:
        """Change the limit (None/0 = unlimited); applies to the next chunk and to waiters within 0.1 s."""
        self._bucket.set_rate(bytes_per_s)

    async def send_extent(self, offset: int, data: bytes) -> None:
        """Send ``data`` for namespace byte ``offset``; returns when the transport accepted it."""
        if offset < 0:
            raise ValueError(f"extent offset {offset} is negative")
        self._raise_if_failed()
        if not data:
            return
        await self._bucket.acquire(len(data) + HEADER_SIZE)
        self._raise_if_failed()
        self._extent_frames += 1
        frame = Frame(FrameType.EXTENT, offset=offset, seq=self._extent_frames, payload=data)
        header = encode_header(frame)
        payload = data
        if self.corrupt_frame and self._extent_frames == self.corrupt_frame:
            flipped = bytearray(data)
            flipped[len(flipped) // 2] ^= 0x01
            payload = bytes(flipped)
        await self._send(header, payload)
        self._bytes_sent += len(data)
        traffic.SENT.add(len(data))

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
        await self._send(encode_header(Frame(FrameType.SWITCHOVER_PLAN, payload=plan)), plan)

    async def abort(self, reason: str) -> None:
        """Tell the receiver we give up (best effort), then close."""
        if self._error is None and not self._closed:
            payload = reason.encode("utf-8", "replace")[:_ABORT_REASON_MAX]
            with contextlib.suppress(Exception):
                self._writer.write(encode_frame(Frame(FrameType.ABORT, payload=payload)))
                await asyncio.wait_for(self._writer.drain(), _CLOSE_GRACE_S)
            self._set_error(f"aborted by the source: {reason}")
        await self.close()

    async def close(self) -> None:
        """Stop the read task and close the connection. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._set_error("sender closed")
        self._read_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._read_task
        self._fail_waiters()
        self._writer.close()
        try:
            await asyncio.wait_for(self._writer.wait_closed(), _CLOSE_GRACE_S)
        except (TimeoutError, OSError):
            self._writer.transport.abort()

    async def __aenter__(self) -> DataSender:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # -- internals -------------------------------------------------------------------------

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise DataPlaneError(self._error, address=self._address, job_id=self._job_id,
                                 cause=self._error_cause, refused=self._refused)

    def _set_error(self, reason: str, cause: str = "", *, refused: bool = False) -> None:
        # The first reason wins: later ones (EOF after an error ACK) are consequences.
        if self._error is None:
            self._error = reason
            self._error_cause = cause
            self._refused = refused

    def _fail_waiters(self) -> None:
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_exception(DataPlaneError(self._error or "failed", address=self._address, job_id=self._job_id,
                                                 cause=self._error_cause, refused=self._refused))

    def _fail(self, reason: str, cause: str = "", *, refused: bool = False) -> None:
        """Mark the sender unusable, wake every waiter, drop the connection."""
        self._set_error(reason, cause, refused=refused)
        self._fail_waiters()
        # Aborting also wakes a writer blocked in drain(), which then sees _error.
        self._writer.transport.abort()

    async def _read_loop(self) -> None:
        try:
            while True:
                frame = await read_frame(self._reader, max_payload=_ACK_MAX_PAYLOAD)
                if frame is None:
                    self._fail("receiver closed the connection")
                    return
                body = _ack_body(frame)
                if frame.type != FrameType.ACK or "ok" not in body:
                    self._fail(f"protocol error: receiver sent {frame.type.name} {body!r}, expected an ACK")
                    return
                if not body["ok"]:
                    self._fail(str(body.get("error") or "receiver reported a failure without a reason"),
                               str(body.get("cause") or ""), refused=True)
                    return
                if not self._waiters:
                    self._fail(f"protocol error: unexpected ACK {body!r} with no request outstanding")
                    return
                fut = self._waiters.popleft()
                if not fut.done():
                    fut.set_result((frame, body))
        except FrameError as exc:
            self._fail(f"corrupt frame from receiver: {exc}")
        except OSError as exc:
            self._fail(f"connection to receiver lost: {exc!r}")
        except Exception as exc:  # never die silently: a dead reader would make waits hang
            logger.exception("data-plane reader for job %s crashed", self._job_id)
            self._fail(f"internal error in the data-plane ACK reader: {exc!r}")

    async def _send(self, header: bytes, payload: bytes) -> None:
        # Two writes instead of header + payload: concatenating would copy every 1 MiB chunk.
        writer = self._writer
        try:
            writer.write(header)
            if payload:
                writer.write(payload)
            async with asyncio.timeout(self._stall_timeout_s):
                await writer.drain()
        except TimeoutError:
            self._fail(
                f"receiver accepted no data for {self._stall_timeout_s}s; the destination is stuck or the link is down"
            )
        except OSError as exc:
            if self._error is None and not self._read_task.done():
                # The receiver may have sent an error ACK just before the reset; let the read
                # task deliver it so the caller sees the real reason.
                await asyncio.wait({self._read_task}, timeout=_REASON_GRACE_S)
            self._fail(f"connection to receiver lost: {exc!r}")
        self._raise_if_failed()

    async def _request(self, frame: Frame, *, what: str, timeout_s: float, seq: int | None = None,
                       payload_bytes: int = 0) -> dict[str, Any]:
        """Sends `frame` and waits for its ACK; `payload_bytes` of it are migration data (the
        rest is framing), counted as sent once the connection took the frame."""
        self._raise_if_failed()
        fut: asyncio.Future[tuple[Frame, dict[str, Any]]] = asyncio.get_running_loop().create_future()
        # Registered before writing: the ACK can arrive while we are still in drain().
        self._waiters.append(fut)
        try:
            await self._send(encode_header(frame), frame.payload)
            traffic.SENT.add(payload_bytes)
            try:
                async with asyncio.timeout(timeout_s):
                    ack, body = await fut
            except TimeoutError:
                self._fail(f"no ACK for {what} within {timeout_s}s; the destination is stuck or the link is down")
                self._raise_if_failed()
                raise AssertionError("unreachable") from None
        finally:
            with contextlib.suppress(ValueError):
                self._waiters.remove(fut)
            if fut.done() and not fut.cancelled():
                fut.exception()  # retrieved: no "exception was never retrieved" noise
        if seq is not None and ack.seq != seq:
            self._fail(f"protocol error: expected ACK for {what}, got one with seq {ack.seq}")
            self._raise_if_failed()
        return body


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
