"""Destination side of the migration data plane.

The destination agent runs one ``DataReceiver`` (a plain asyncio TCP server). For every incoming
migration it ``register``s the job with a one-time token and a ``DestinationSink`` that writes
into the new controller's namespace. The source agent connects with ``DataSender`` and streams:

    HELLO {job_id, token}        -> ACK {"ok": true, "kind": "hello", "features": [...]} or {"ok": false, "error": ...}
    EXTENT(seq=1, 2, 3, ...)*    applied in order through sink.apply_extent
    ROUND_END(seq=round)         -> ACK(seq=round) {"ok": true, "kind": "round_end", "bytes_received": N}
    ... more rounds (EXTENT seq keeps counting; round numbers only grow) ...
    GUEST_MAP(piece)*            the guest's map, applied by sink.apply_guest_map (no ACK of its own:
                                 the next ROUND_END's covers it)
    SWITCHOVER_PLAN(plan)        kept by sink.apply_plan for FINAL (optional, no ACK of its own)
    FINAL(u32 len + state + guest) -> ACK {"ok": true, "kind": "final", ...what sink.apply_final
                                    returned: with a plan, how the switchover ended}
                                    / {"ok": false, "error": ...}
    ABORT(reason)                ends the session

Any failure (corrupt frame, sink error, protocol violation, idle timeout) marks the session
failed with a readable reason, answers with a not-ok ACK and closes the connection. A sink that
failed for lack of space (its error, or one behind it, is ENOSPC or EDQUOT) adds
``"cause": "no_space"`` to that ACK: this destination is unfit, another node may well do. A failed or
used token can never be reused, so a stray or replayed connection cannot write into a namespace;
the destination must register the job again with a fresh token.

Within a session an EXTENT frame's seq must be exactly one more than the last one's (the sender
numbers them 1, 2, 3, ... over the whole connection, across rounds), and a ROUND_END's round must
be above the last one's. The checksum catches a changed frame, not a valid one sent again: an
older extent re-injected after a newer one for the same offset would silently roll data back. A
frame out of sequence (replayed, duplicated, reordered or after a gap) fails the session before
its payload reaches the sink.

A not-ok ACK is a refusal: with a SWITCHOVER_PLAN it means the destination did not commit and
never will (the sink refuses only before it sent the commit, or when etcd refused it); an outcome
it does not know comes back in an ok ACK.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import ssl as ssl_module
import struct
from dataclasses import dataclass, field
from typing import Any, Protocol

from agent.datadir import no_space
from agent.dataplane import traffic
from agent.dataplane.framing import (
    HEADER_SIZE,
    Frame,
    FrameError,
    FrameType,
    encode_frame,
    frame_length,
    read_frame,
)
from agent.dataplane.stream import FrameStreamProtocol, FrameStreamReader
from cluster.grpc_tls import identity_of_der
from cluster.identity import Identity, Role
from cluster.ratelimited_log import malformed_input

__all__ = [
    "CAUSE_NO_SPACE",
    "FINAL_MAX_PAYLOAD",
    "STREAM_LIMIT",
    "DataReceiver",
    "DestinationSink",
    "ReceiverStats",
    "decode_final_payload",
    "encode_final_payload",
    "parse_hello",
]

logger = logging.getLogger(__name__)
DATA_PLANE_KIND = "data-plane"  # malformed input of this kind is logged at most once per window

# Read size of the sender's StreamReader (it reads only ACKs) and of the receiver's discard loop.
STREAM_LIMIT = 4 * 1024 * 1024
# The cause of a refusal, in its ACK, when the destination's disk is full.
CAUSE_NO_SPACE = "no_space"
# Connections held at once: from one peer address, and in all. A migration uses one per job;
# an agent is source of at most a few dozen jobs at once.
MAX_CONNECTIONS_PER_PEER = 64
MAX_CONNECTIONS = 1024
# Before authentication a peer may only send a small HELLO.
HELLO_MAX_PAYLOAD = 64 * 1024
# What this receiver takes beyond the frames every version does; the HELLO ACK lists them, and a
# sender uses one only when its receiver listed it (a rolling upgrade has both versions at once).
FEATURES = ("guest_map",)
# FINAL carries controller state plus guest state, which can be much larger than an extent.
FINAL_MAX_PAYLOAD = 64 * 1024 * 1024
# After a failure we half-close and keep discarding what the source already had in flight for
# up to this long, so the kernel does not answer its data with a RST that would race (and can
# destroy) our error ACK on the source side.
_LINGER_S = 2.0
_CLOSE_GRACE_S = 2.0
# An extent at least this large is written while the next frame arrives (see _WriteBehind).
WRITE_BEHIND_MIN_BYTES = 256 * 1024

_FINAL_LEN = struct.Struct("!I")


def encode_final_payload(state_blob: bytes, guest_blob: bytes) -> bytes:
    """FINAL payload: u32 length of the state blob, the state blob, then the guest blob."""
    return _FINAL_LEN.pack(len(state_blob)) + state_blob + guest_blob


def decode_final_payload(payload: bytes) -> tuple[bytes, bytes]:
    """Inverse of ``encode_final_payload``; ValueError names the inconsistent lengths."""
    if len(payload) < _FINAL_LEN.size:
        raise ValueError(f"FINAL payload of {len(payload)} bytes is shorter than its 4-byte length prefix")
    (state_len,) = _FINAL_LEN.unpack_from(payload)
    if state_len > len(payload) - _FINAL_LEN.size:
        raise ValueError(
            f"FINAL payload declares a {state_len}-byte state blob but carries only "
            f"{len(payload) - _FINAL_LEN.size} bytes after the prefix"
        )
    end = _FINAL_LEN.size + state_len
    return payload[_FINAL_LEN.size : end], payload[end:]


def parse_hello(payload: bytes) -> tuple[str, str]:
    """(job_id, token) from a HELLO payload; ValueError says what is wrong with it.

    It comes before authentication, from anyone who can reach the port: JSON nested deeper than
    the parser recurses, or strings that are not text (a lone surrogate escaped as \\ud800), are
    refused like any other malformed HELLO.
    """
    try:
        hello = json.loads(payload)
    except RecursionError:
        raise ValueError("the JSON nests too deeply") from None
    if not isinstance(hello, dict):
        raise ValueError(f"the JSON is {type(hello).__name__}, not an object")
    job_id, token = hello.get("job_id"), hello.get("token")
    if not isinstance(job_id, str) or not isinstance(token, str):
        raise ValueError("job_id and token must be strings")
    for name, value in (("job_id", job_id), ("token", token)):
        try:
            value.encode()
        except UnicodeEncodeError:
            raise ValueError(f"{name} holds a lone surrogate, not text") from None
    return job_id, token


class DestinationSink(Protocol):
    """Where a session's data goes on the destination (the new controller's backend)."""

    async def apply_extent(self, offset: int, data: bytes) -> None:
        """Write ``data`` at namespace byte ``offset``. ``data`` is the receiver's buffer: it is
        reused for a later frame once this returns, so keep no reference to it."""
        ...

    async def apply_round_end(self, round: int) -> None: ...

    async def apply_plan(self, plan: bytes) -> None:
        """Keep the switchover plan for FINAL; raise to refuse it."""
        ...

    async def apply_guest_map(self, piece: bytes) -> None:
        """Add a piece of the guest's map (agent.guest.map_sync) for FINAL; raise to refuse it."""
        ...

    async def apply_final(self, state_blob: bytes, guest_blob: bytes) -> dict[str, Any]:
        """Load controller and guest state (and with a plan, switch over); raise to refuse (the
        message goes to the source). What it returns goes into the ACK."""
        ...


@dataclass(frozen=True)
class ReceiverStats:
    """Snapshot of one job's session.

    ``bytes_received`` counts EXTENT payload bytes applied through the sink; ``frames`` counts
    valid frames processed, HELLO included; ``last_error`` is the first failure reason (None while
    healthy); ``done`` is True once FINAL was applied and acknowledged.
    """

    bytes_received: int
    frames: int
    last_error: str | None
    done: bool
    connected: bool = False
    rounds: int = 0


@dataclass(eq=False)
class _Connection:
    writer: asyncio.StreamWriter
    peer: str
    peer_host: str = ""
    task: asyncio.Task[None] = field(init=False)


@dataclass(eq=False)
class _Session:
    job_id: str
    token: str
    sink: DestinationSink
    source_node: str = ""  # with TLS, the only agent that may stream this job
    bytes_received: int = 0
    frames: int = 0
    rounds: int = 0
    extent_seq: int = 0  # seq of the last EXTENT applied; the next must carry extent_seq + 1
    last_round: int = -1  # the last round ended; the next ROUND_END must name a higher one
    error: str | None = None
    done: bool = False
    # Set at the first accepted HELLO and never cleared: the token is one-time.
    used_by: str | None = None
    conn: _Connection | None = field(default=None, repr=False)
    # Set when the (only) connection of this session has ended, for whatever reason.
    ended: asyncio.Event = field(default_factory=asyncio.Event, repr=False)

    def fail(self, reason: str) -> None:
        # Keep the first reason: later errors are usually consequences of it.
        if self.error is None:
            self.error = reason


def _ack(seq: int = 0, **body: Any) -> bytes:
    return encode_frame(Frame(FrameType.ACK, seq=seq, payload=json.dumps(body).encode()))


def _abort(transport: asyncio.BaseTransport) -> None:
    # Python 3.11's TLS transport drops its protocol when close() is called a second time (the
    # session's own close and a shutdown can both close it), and abort() then raises
    # AttributeError; such a transport is already on its way down.
    with contextlib.suppress(AttributeError):
        transport.abort()  # type: ignore[attr-defined]


def _extent_out_of_sequence(frame: Frame, expected: int) -> str:
    """Why an EXTENT frame whose seq is not ``expected`` is refused, naming both numbers."""
    if frame.seq < expected:
        what = "replayed or out of order"
    else:
        what = f"out of order: {frame.seq - expected} frame(s) before it never arrived"
    return (f"data-plane frame seq {frame.seq} {what} (expected {expected}): its extent at offset {frame.offset} "
            f"({len(frame.payload)} bytes) was not written; the stream was tampered with or the source is broken")


def _whole_frame_in(staged: memoryview) -> bool:
    with staged:
        return len(staged) >= HEADER_SIZE and len(staged) >= HEADER_SIZE + frame_length(staged)


def _exc_text(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


def _cause(exc: BaseException) -> str:
    return CAUSE_NO_SPACE if no_space(exc) is not None else ""


class _WriteBehind:
    """At most one large extent being written by the sink while the next frame arrives: the write
    (a thread, on another core) overlaps the receive instead of following it. Small extents are
    written in turn, as before: a task for each 4 KiB block would cost more than it saves."""

    def __init__(self, session: _Session, reader: FrameStreamReader) -> None:
        self._session = session
        self._reader = reader
        self._task: asyncio.Task[None] | None = None
        self._frame: Frame | None = None

    def start(self, frame: Frame) -> None:
        assert self._task is None, "settle() the write in flight first"
        self._frame = frame
        self._task = asyncio.get_running_loop().create_task(
            self._session.sink.apply_extent(frame.offset, frame.payload),
            name=f"dataplane-write-{self._session.job_id}")

    async def settle(self) -> tuple[str, str] | None:
        """Waits for the write in flight; its failure as (reason, cause), None if it succeeded."""
        task, frame = self._task, self._frame
        if task is None or frame is None:
            return None
        self._task = self._frame = None
        try:
            await task
        except Exception as exc:
            return (f"destination failed to write extent at offset {frame.offset} ({len(frame.payload)} bytes): "
                    f"{_exc_text(exc)}", _cause(exc))
        finally:
            if task.done() and not task.cancelled():
                # The sink is done with the payload (a cancelled write may still be in its thread).
                self._reader.recycle(frame.payload)
        self._session.bytes_received += len(frame.payload)
        return None

    async def discard(self) -> None:
        """The session ended otherwise (a failure, a cancel): the write in flight does not matter."""
        task, self._task, self._frame = self._task, None, None
        if task is not None:
            task.cancel()
            await asyncio.wait({task})
            if not task.cancelled():
                task.exception()  # retrieved: the session already has its reason


class DataReceiver:
    """TCP endpoint that accepts data-plane sessions for registered jobs."""

    def __init__(
        self,
        host: str,
        port: int = 0,
        *,
        idle_timeout_s: float | None = 300.0,
        hello_timeout_s: float = 10.0,
        ssl: ssl_module.SSLContext | None = None,
    ) -> None:
        self._host = host
        self._ssl = ssl  # TLS: every peer shows an agent's certificate, and a job's only its source's
        self._port = port
        # A cut link leaves a TCP read blocked forever; the idle timeout bounds how long a
        # session waits for the next frame (dirty rounds send continuously, so 5 min is ample).
        self._idle_timeout_s = idle_timeout_s
        self._hello_timeout_s = hello_timeout_s
        self._server: asyncio.Server | None = None
        self._address: str | None = None
        self._sessions: dict[str, _Session] = {}
        self._connections: set[_Connection] = set()
        self._closing = False

    async def start(self) -> None:
        """Bind and start accepting connections."""
        if self._server is not None:
            raise RuntimeError(f"DataReceiver already started on {self._address}")
        try:
            handshake_s = self._hello_timeout_s if self._ssl else None
            # Payloads are received straight into their own buffers (agent.dataplane.stream).
            self._server = await asyncio.get_running_loop().create_server(
                lambda: FrameStreamProtocol(self._on_connect), self._host, self._port, ssl=self._ssl,
                ssl_handshake_timeout=handshake_s)
        except OSError as exc:
            raise OSError(
                exc.errno,
                f"data-plane receiver cannot listen on {self._host}:{self._port}: {exc.strerror}; "
                "pick a free port or another address",
            ) from exc
        sockname = self._server.sockets[0].getsockname()
        host = sockname[0]
        self._address = f"[{host}]:{sockname[1]}" if ":" in host else f"{host}:{sockname[1]}"
        logger.info("data-plane receiver listening on %s", self._address)

    @property
    def address(self) -> str:
        """``host:port`` actually bound (``[v6]:port`` for IPv6)."""
        if self._address is None:
            raise RuntimeError("DataReceiver.address is unknown until start() has been awaited")
        return self._address

    def register(self, job_id: str, token: str, sink: DestinationSink, *, source_node: str = "") -> None:
        """Accept one session for ``job_id`` authenticated by ``token`` (one-time); with TLS,
        only from the agent of ``source_node``."""
        if not job_id:
            raise ValueError("job_id must be a non-empty string")
        if not token:
            raise ValueError(f"token for job {job_id!r} must be a non-empty string")
        if job_id in self._sessions:
            raise ValueError(
                f"job {job_id!r} is already registered on data-plane receiver {self._address}; "
                "call unregister(job_id) first to replace it"
            )
        self._sessions[job_id] = _Session(job_id=job_id, token=token, sink=sink, source_node=source_node)

    def unregister(self, job_id: str) -> None:
        """Forget ``job_id`` and cut its connection if one is open. Unknown ids are ignored."""
        session = self._sessions.pop(job_id, None)
        if session is None:
            return
        session.fail("job unregistered on the destination")
        session.ended.set()
        if session.conn is not None:
            session.conn.task.cancel()

    def _session(self, job_id: str) -> _Session:
        try:
            return self._sessions[job_id]
        except KeyError:
            raise KeyError(f"job {job_id!r} is not registered on data-plane receiver {self._address}") from None

    async def wait_session_end(self, job_id: str) -> ReceiverStats:
        """Wait until the session of ``job_id`` has connected and ended (done, failed, aborted,
        unregistered or receiver closed); return its final stats. Callers bound it with a timeout."""
        session = self._session(job_id)
        await session.ended.wait()
        return self._snapshot(session)

    def session_stats(self, job_id: str) -> ReceiverStats:
        """Snapshot of the session for ``job_id``; KeyError if it is not registered."""
        return self._snapshot(self._session(job_id))

    @staticmethod
    def _snapshot(s: _Session) -> ReceiverStats:
        return ReceiverStats(
            bytes_received=s.bytes_received,
            frames=s.frames,
            last_error=s.error,
            done=s.done,
            connected=s.conn is not None,
            rounds=s.rounds,
        )

    async def close(self) -> None:
        """Stop listening, tell connected sources we are going away, cancel every session task."""
        self._closing = True
        if self._server is not None:
            self._server.close()
        conns = list(self._connections)
        for conn in conns:
            conn.task.cancel()
        await asyncio.gather(*(c.task for c in conns), return_exceptions=True)
        for conn in conns:
            # Best effort: the source learns why instead of seeing a bare reset.
            with contextlib.suppress(Exception):
                conn.writer.write(_ack(ok=False, error=f"data-plane receiver {self._address} is shutting down"))
            _abort(conn.writer.transport)
        for session in self._sessions.values():
            if not session.done:
                session.fail("data-plane receiver closed")
            session.ended.set()
        if self._server is not None:
            await self._server.wait_closed()

    # -- connection handling -------------------------------------------------------------

    def _on_connect(self, reader: FrameStreamReader, writer: asyncio.StreamWriter) -> None:
        # A plain callback that spawns a task we own, rather than a coroutine callback: asyncio
        # 3.11 logs a spurious error when the task it creates for a coroutine is cancelled, and
        # close()/unregister() cancel session tasks by design.
        if self._closing:
            writer.transport.abort()
            return
        peername = writer.get_extra_info("peername")
        conn = _Connection(writer=writer, peer=str(peername), peer_host=str(peername[0]) if peername else "")
        held = sum(1 for c in self._connections if c.peer_host == conn.peer_host)
        if held >= MAX_CONNECTIONS_PER_PEER or len(self._connections) >= MAX_CONNECTIONS:
            # A session needs one connection; a peer holding dozens is broken or hostile, and each
            # costs a task and buffers. Cut before reading a byte.
            malformed_input.malformed(DATA_PLANE_KIND, "data-plane peer %s refused: it holds %d connections "
                                      "(at most %d per peer, %d in all)", conn.peer, held, MAX_CONNECTIONS_PER_PEER,
                                      MAX_CONNECTIONS)
            writer.transport.abort()
            return
        conn.task = asyncio.get_running_loop().create_task(
            self._handle_connection(conn, reader, writer), name=f"dataplane-recv-{conn.peer}"
        )
        self._connections.add(conn)

    async def _handle_connection(
        self, conn: _Connection, reader: FrameStreamReader, writer: asyncio.StreamWriter
    ) -> None:
        session: _Session | None = None
        try:
            session = await self._handshake(conn, reader, writer)
            if session is not None:
                await self._serve(session, reader, writer)
        except asyncio.CancelledError:
            if not self._closing:
                # unregister(): tell the source why, then cut the connection. close() does the
                # same for all connections itself once every task has stopped.
                with contextlib.suppress(Exception):
                    writer.write(
                        _ack(
                            ok=False,
                            error=session.error
                            if session and session.error
                            else "session cancelled on the destination",
                        )
                    )
                _abort(writer.transport)
            raise
        except OSError as exc:
            if session is not None:
                session.fail(f"connection from the source lost: {_exc_text(exc)}")
        except Exception as exc:  # the last line of defence: never kill the server, record why
            logger.exception("data-plane connection from %s failed", conn.peer)
            if session is not None:
                session.fail(f"internal receiver error: {exc!r}")
        finally:
            if session is not None and session.conn is conn:
                session.conn = None
                session.ended.set()
        try:
            await self._close_writer(writer)
        finally:
            # Tracked until the very end so close() can still cancel us while we flush.
            self._connections.discard(conn)

    async def _close_writer(self, writer: asyncio.StreamWriter) -> None:
        writer.close()
        try:
            await asyncio.wait_for(writer.wait_closed(), _CLOSE_GRACE_S)
        except (TimeoutError, OSError):
            _abort(writer.transport)

    async def _refuse(self, reader: FrameStreamReader, writer: asyncio.StreamWriter, error: str,
                      cause: str = "") -> None:
        """Send a not-ok ACK, half-close and discard in-flight data for a while (see _LINGER_S)."""
        try:
            body: dict[str, Any] = {"ok": False, "error": error}
            if cause:
                body["cause"] = cause
            writer.write(_ack(**body))
            if writer.can_write_eof():
                writer.write_eof()
            await asyncio.wait_for(writer.drain(), _LINGER_S)
            async with asyncio.timeout(_LINGER_S):
                while await reader.read(STREAM_LIMIT):
                    pass
        except (TimeoutError, OSError):
            pass

    async def _handshake(
        self, conn: _Connection, reader: FrameStreamReader, writer: asyncio.StreamWriter
    ) -> _Session | None:
        try:
            async with asyncio.timeout(self._hello_timeout_s):
                frame = await read_frame(reader, max_payload=HELLO_MAX_PAYLOAD)
        except TimeoutError:
            malformed_input.malformed(DATA_PLANE_KIND, "data-plane peer %s sent no HELLO within %.1fs", conn.peer,
                                      self._hello_timeout_s)
            return None
        except FrameError as exc:
            malformed_input.malformed(DATA_PLANE_KIND, "data-plane peer %s sent a bad HELLO frame: %s", conn.peer, exc)
            await self._refuse(reader, writer, f"bad HELLO frame: {exc}")
            return None
        except OSError:
            return None
        if frame is None:
            return None
        if frame.type != FrameType.HELLO:
            await self._refuse(reader, writer, f"expected HELLO as the first frame, got {frame.type.name}")
            return None
        try:
            job_id, token = parse_hello(frame.payload)
        except ValueError as exc:
            await self._refuse(reader, writer, f"HELLO payload must be JSON {{'job_id': str, 'token': str}}: {exc}")
            return None

        session = self._sessions.get(job_id)
        error: str | None = None
        if session is None:
            error = (
                f"job {job_id!r} is not registered on data-plane receiver {self._address}; "
                "the destination must register it before the source connects"
            )
        elif not hmac.compare_digest(session.token.encode(), token.encode()):
            error = (
                f"wrong data-plane token for job {job_id!r}; "
                "use the token the destination returned when it registered the job"
            )
        elif (peer_problem := self._peer_problem(writer, session)) is not None:
            error = peer_problem
        elif session.used_by is not None:
            error = (
                f"data-plane token for job {job_id!r} was already used by {session.used_by}; tokens are "
                "one-time: register the job again on the destination to get a new token"
                + (f" (that session failed: {session.error})" if session.error else "")
            )
        if error is not None or session is None:
            malformed_input.malformed(DATA_PLANE_KIND, "data-plane HELLO from %s refused: %s", conn.peer, error)
            await self._refuse(reader, writer, error or "refused")
            return None

        session.used_by = conn.peer
        session.conn = conn
        session.frames += 1
        writer.write(_ack(ok=True, kind="hello", job_id=job_id, features=list(FEATURES)))
        await writer.drain()
        logger.info("data-plane session for job %s from %s started", job_id, conn.peer)
        return session

    def _peer_problem(self, writer: asyncio.StreamWriter, session: _Session) -> str | None:
        """With TLS: why the peer may not stream this job (its certificate is not the source's)."""
        if self._ssl is None:
            return None
        ssl_object = writer.get_extra_info("ssl_object")
        peer = identity_of_der(ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None)
        wanted = Identity(Role.AGENT, session.source_node) if session.source_node else None
        if peer is None or peer.role is not Role.AGENT or (wanted is not None and peer != wanted):
            return (f"data-plane peer {peer or 'without an identity'} may not stream job {session.job_id!r}: "
                    f"only {wanted or 'an agent'} may")
        return None

    async def _read_next(self, reader: FrameStreamReader) -> Frame | None:
        if self._idle_timeout_s is None or _whole_frame_in(reader.staged()):
            # A frame that is all here needs no timer: arming one per 4 KiB frame cost as much
            # as the rest of its handling.
            return await read_frame(reader, max_payload=FINAL_MAX_PAYLOAD)
        async with asyncio.timeout(self._idle_timeout_s):
            return await read_frame(reader, max_payload=FINAL_MAX_PAYLOAD)

    async def _serve(self, session: _Session, reader: FrameStreamReader, writer: asyncio.StreamWriter) -> None:
        behind = _WriteBehind(session, reader)
        try:
            await self._serve_frames(session, reader, writer, behind)
        finally:
            await behind.discard()

    async def _serve_frames(self, session: _Session, reader: FrameStreamReader, writer: asyncio.StreamWriter,
                            behind: _WriteBehind) -> None:
        job = session.job_id

        async def fail(reason: str, cause: str = "") -> None:
            # The frames before the failure were good: the one still being written lands first
            # (and if it cannot, that is the first failure).
            earlier = await behind.settle()
            if earlier is not None:
                reason, cause = earlier
            session.fail(reason)
            logger.warning("data-plane session for job %s failed: %s", job, reason)
            await self._refuse(reader, writer, reason, cause)

        while True:
            try:
                frame = await self._read_next(reader)
            except FrameError as exc:
                await fail(f"data-plane frame corrupt: {exc}")
                return
            except TimeoutError:
                await fail(
                    f"no frame from the source for {self._idle_timeout_s}s (job {job}); "
                    "the source stalled or the link is down"
                )
                return
            except OSError as exc:
                await behind.settle()
                session.fail(f"connection from the source lost: {_exc_text(exc)}")
                return
            # Whatever comes next, a write still in flight comes first (frames apply in order).
            failed = await behind.settle()
            if failed is not None:
                await fail(*failed)
                return
            if frame is None:
                if not session.done:
                    session.fail(f"source closed the connection before FINAL after {session.bytes_received} bytes")
                return
            session.frames += 1

            if frame.type == FrameType.EXTENT:
                # An int compare per frame: a valid checksum does not make a frame new.
                if frame.seq != session.extent_seq + 1:
                    await fail(_extent_out_of_sequence(frame, session.extent_seq + 1))
                    return
                session.extent_seq = frame.seq
                traffic.RECEIVED.add(len(frame.payload))  # arrived whole, whatever the sink makes of it
                if len(frame.payload) >= WRITE_BEHIND_MIN_BYTES:
                    behind.start(frame)
                    continue
                try:
                    await session.sink.apply_extent(frame.offset, frame.payload)
                except Exception as exc:
                    await fail(
                        f"destination failed to write extent at offset {frame.offset} "
                        f"({len(frame.payload)} bytes): {_exc_text(exc)}",
                        _cause(exc),
                    )
                    return
                session.bytes_received += len(frame.payload)
            elif frame.type == FrameType.ROUND_END:
                if frame.seq <= session.last_round:
                    await fail(f"data-plane ROUND_END for round {frame.seq} replayed or out of order (round "
                               f"{session.last_round} already ended; expected a higher one)")
                    return
                session.last_round = frame.seq
                try:
                    await session.sink.apply_round_end(frame.seq)
                except Exception as exc:
                    await fail(f"destination failed to end round {frame.seq}: {_exc_text(exc)}")
                    return
                session.rounds += 1
                writer.write(
                    _ack(
                        frame.seq,
                        ok=True,
                        kind="round_end",
                        round=frame.seq,
                        bytes_received=session.bytes_received,
                    )
                )
                await writer.drain()
            elif frame.type == FrameType.FINAL:
                try:
                    state_blob, guest_blob = decode_final_payload(frame.payload)
                except ValueError as exc:
                    await fail(f"malformed FINAL frame: {exc}")
                    return
                traffic.RECEIVED.add(len(state_blob) + len(guest_blob))
                try:
                    outcome = await session.sink.apply_final(state_blob, guest_blob)
                except Exception as exc:
                    # The sink's own message is what the source (and the operator) needs to see.
                    await fail(_exc_text(exc), _cause(exc))
                    return
                session.done = True
                writer.write(_ack(**outcome, ok=True, kind="final", bytes_received=session.bytes_received))
                await writer.drain()
                logger.info("data-plane session for job %s done (%d bytes)", job, session.bytes_received)
                return
            elif frame.type == FrameType.GUEST_MAP:
                traffic.RECEIVED.add(len(frame.payload))
                try:
                    await session.sink.apply_guest_map(frame.payload)
                except Exception as exc:
                    await fail(f"guest map piece refused: {_exc_text(exc)}", _cause(exc))
                    return
            elif frame.type == FrameType.SWITCHOVER_PLAN:
                try:
                    await session.sink.apply_plan(frame.payload)
                except Exception as exc:
                    await fail(f"switchover plan refused: {_exc_text(exc)}")
                    return
            elif frame.type == FrameType.ABORT:
                reason = frame.payload.decode("utf-8", "replace") or "no reason given"
                session.fail(f"source aborted the transfer: {reason}")
                return
            else:
                await fail(f"unexpected {frame.type.name} frame from the source during a session")
                return
