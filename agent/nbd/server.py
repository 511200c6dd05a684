"""The agent's NBD server: exports a controller's namespace through the controller's guest I/O
path, so real clients (qemu-io, nbdcopy, fio's nbd engine, the kernel's nbd-client) can be the
guest.

One listener per agent, its port chosen when the agent starts; the export name is the
controller id, so one port serves every controller the agent runs (one firewall rule, one
address per node, and the NBD handshake already selects an export by name). A controller is
visible only after `export()` (AgentService.ExportController) and only while it runs here.

Protocol: fixed newstyle handshake with NBD_OPT_GO / INFO / EXPORT_NAME / LIST / ABORT; simple
replies only (structured replies and metadata contexts are refused with NBD_REP_ERR_UNSUP, which
every client handles). Transmission flags HAS_FLAGS, SEND_FLUSH, SEND_FUA, SEND_TRIM,
SEND_WRITE_ZEROES and CAN_MULTI_CONN (all connections share one controller and a flush is an
fsync of its one file). Offsets and lengths must be multiples of the 4096-byte block
(advertised with NBD_INFO_BLOCK_SIZE); anything else gets EINVAL.

Migration semantics: while the controller is suspended (stop-and-copy) a request is not failed,
it waits and is retried once the controller runs again (a rollback resumes it). When the
controller leaves this node (released after COMMIT) or is unexported, its connections are
closed: stalled requests never complete there, and the client reconnects to the new owner.

TLS: when the agent has the cluster's certificates (--tls-*), the server is in the protocol's
TLS-required mode: a client must send NBD_OPT_STARTTLS before anything else, and after the
handshake its certificate must name an operator or the orchestrator (agent/nbd/tls_policy.py has
the rules); the URIs it hands out are then nbds://. Without them, plaintext as before and
NBD_OPT_STARTTLS is answered NBD_REP_ERR_POLICY.

Transmission never blocks the event loop (which also serves gRPC and the migration data plane)
on file I/O. A plaintext connection, once negotiated, is handed to a thread of its own that reads
requests, runs them on the controller and sends the replies with blocking calls, many requests
per system call: this is the fast path (`_SocketConnection`). A TLS connection stays on asyncio's
TLS transport; each of its requests runs in a small thread pool of the server's own, so a deep
client queue cannot crowd the migration's `asyncio.to_thread` calls out of the default executor.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import socket
import ssl
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TypeVar

from agent.backend import BLOCK_BYTES, GuestDrivenController
from agent.controller_errors import ControllerError, ControllerGoneError, NotRunningError
from agent.nbd import protocol as p
from agent.nbd.tls_policy import Action, TlsStage, certificate_names_host, option_verdict
from agent.qos import GuestIoPolicy
from agent.vfio_states import VfioState
from cluster import names
from cluster.grpc_tls import TlsFiles, identity_of_der
from cluster.identity import nbd_refusal
from cluster.ratelimited_log import malformed_input

log = logging.getLogger(__name__)

T = TypeVar("T")

MAX_REQUEST_BYTES = 4 << 20  # largest READ/WRITE; advertised as the maximum block size
CHUNK_BYTES = 1 << 20  # one controller call per MiB: a big request never holds its lock long
MAX_INFLIGHT = 32  # TLS: requests per connection being served at once (bounds memory to 128 MiB)
RECV_BYTES = 256 << 10  # plaintext: what one recv may take (a client's whole queue of 4 KiB writes)
MAX_PENDING_REPLY_BYTES = 4 << 20  # plaintext: replies held before they are sent, at most (plus one)
# Connections at once: from one peer address, and in all. Each may hold MAX_INFLIGHT requests'
# buffers (TLS), or its receive buffer, one largest WRITE and MAX_PENDING_REPLY_BYTES of replies
# (plaintext); a client needs one (a few with multi-conn).
MAX_CONNECTIONS_PER_PEER = 16
MAX_CONNECTIONS = 256
MAX_OPTION_BYTES = 64 << 10
TLS_HANDSHAKE_TIMEOUT_S = 10.0
IO_THREADS = 4
# A stalled request waits for a wake-up from the host (resume, release); this re-check is the
# backstop for a state change that reaches the controller by a path that does not notify.
STALL_RECHECK_S = 0.02
TRANSMISSION_FLAGS = (p.TFLAG_HAS_FLAGS | p.TFLAG_SEND_FLUSH | p.TFLAG_SEND_FUA | p.TFLAG_SEND_TRIM
                      | p.TFLAG_SEND_WRITE_ZEROES | p.TFLAG_CAN_MULTI_CONN)
_ALLOWED_FLAGS = {
    p.CMD_READ: 0,
    p.CMD_WRITE: p.CMD_FLAG_FUA,
    p.CMD_FLUSH: 0,
    p.CMD_TRIM: p.CMD_FLAG_FUA,
    p.CMD_WRITE_ZEROES: p.CMD_FLAG_FUA | p.CMD_FLAG_NO_HOLE,
}
_IOV_MAX = 1024  # buffers one sendmsg may take (Linux's IOV_MAX)
_OTHER_COMMAND = max(p.COMMAND_NAMES) + 1  # where a connection counts commands without a name
_GUEST_IO_STATES = frozenset({VfioState.RUNNING, VfioState.PRE_COPY})
# The controller's limit each command counts against (agent/qos.py); a flush counts against none.
_LIMITED_AS = {p.CMD_READ: "read", p.CMD_WRITE: "write", p.CMD_WRITE_ZEROES: "write", p.CMD_TRIM: "trim"}
# Commands whose latency the migration pacer watches: what a guest waits on when it reads or writes.
_TIMED = frozenset({p.CMD_READ, p.CMD_WRITE})


class ExportGone(Exception):
    """The controller left this node, was unexported, or the server is closing."""


@dataclass
class _Export:
    controller_id: str
    connections: set[_Connection] = field(default_factory=set)
    # Replaced on every notification: a request takes the current one *before* it tries the
    # controller, so a wake-up that comes while it tries is not missed (TLS connections, on the loop).
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    # The same for connections served by threads: a request reads `generation` before it tries.
    generation: int = 0
    _generation_changed: threading.Condition = field(default_factory=threading.Condition)

    def notify(self) -> None:
        self.changed.set()
        self.changed = asyncio.Event()
        with self._generation_changed:
            self.generation += 1
            self._generation_changed.notify_all()

    def wait_changed(self, seen: int, timeout_s: float) -> None:
        """From a connection's thread: until a notification after `seen` was read, or the timeout."""
        with self._generation_changed:
            self._generation_changed.wait_for(lambda: self.generation != seen, timeout_s)


class NbdServer:
    """Owns the listener, the exports and their connections; `close()` ends all of them."""

    def __init__(self, listen_host: str, port: int, advertise_host: str,
                 lookup: Callable[[str], GuestDrivenController | None], io_threads: int = IO_THREADS, *,
                 tls: TlsFiles | None = None, guest_io: GuestIoPolicy | None = None) -> None:
        """`tls`: the agent's certificates; with them every client must negotiate TLS. `guest_io`:
        the node's I/O limits (a request waits as long as they say) and where served requests'
        latencies go (migration reads yield to them)."""
        self.guest_io = guest_io
        self.listen_host = listen_host
        self.port = port
        self.advertise_host = advertise_host
        self._ssl = tls.ssl_context(server=True) if tls is not None else None
        if tls is not None and not certificate_names_host(tls.cert_pem, advertise_host):
            # qemu and libnbd check the server's certificate against the host of the URI.
            log.warning("the agent's certificate does not name %s, the host its nbds:// URIs name: NBD clients "
                        "will refuse it unless told which name to check (qemu: tls-hostname=%s); reissue it "
                        "with `orchctl certs issue DIR --role agent --name %s --host %s`", advertise_host,
                        tls.identity.name, tls.identity.name, advertise_host)
        self._lookup = lookup
        self._exports: dict[str, _Export] = {}
        self.io_pool = ThreadPoolExecutor(max_workers=io_threads, thread_name_prefix="nbd-io")
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()
        self._peers: collections.Counter[str] = collections.Counter()  # connections held, by peer address
        # Requests of connections that ended, by command (as _Connection.counts).
        self._ended_counts = [0] * (_OTHER_COMMAND + 1)

    @property
    def requests(self) -> collections.Counter[str]:
        """Requests received in the transmission phase, by command name (p.COMMAND_NAMES, or
        "OTHER"): a bounded set, for the agent's /metrics."""
        totals = list(self._ended_counts)
        for export in self._exports.values():
            for conn in list(export.connections):
                for command, n in enumerate(conn.counts):
                    totals[command] += n
        return collections.Counter({p.COMMAND_NAMES.get(command, "OTHER"): n
                                    for command, n in enumerate(totals) if n})

    def clients(self) -> int:
        """Connections in the transmission phase: clients using an export."""
        return sum(len(export.connections) for export in self._exports.values())

    # ---- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, self.listen_host, self.port)
        self.port = int(self._server.sockets[0].getsockname()[1])
        log.info("NBD server listening on %s:%d", self.listen_host, self.port)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for cid in list(self._exports):
            self.unexport(cid)
        for task in list(self._handlers):
            task.cancel()
        for task in list(self._handlers):
            with contextlib.suppress(BaseException):
                await task
        if self._server is not None:
            await self._server.wait_closed()
        # A request cancelled above may still be in a pool thread; let it finish before the host
        # closes the controllers, without blocking the loop meanwhile.
        await asyncio.to_thread(self.io_pool.shutdown, wait=True, cancel_futures=True)

    # ---- exports ----------------------------------------------------------------------------

    def uri(self, controller_id: str) -> str:
        """nbd://, or with TLS nbds:// (libnbd's scheme for TLS required; qemu takes the host,
        port and name as options beside tls-creds, see README.md)."""
        scheme = "nbds" if self._ssl is not None else "nbd"
        return f"{scheme}://{self.advertise_host}:{self.port}/{controller_id}"

    def export(self, controller_id: str) -> str:
        """Makes the controller reachable by name; idempotent. The caller checks it runs here."""
        if controller_id not in self._exports:
            self._exports[controller_id] = _Export(controller_id)
            log.info("exporting controller %s at %s", controller_id, self.uri(controller_id))
        return self.uri(controller_id)

    def unexport(self, controller_id: str) -> None:
        """Hides the export and closes its connections (requests stalled there never complete)."""
        export = self._exports.pop(controller_id, None)
        if export is None:
            return
        connections = list(export.connections)
        log.info("unexporting controller %s; closing %d NBD connection(s)", controller_id, len(connections))
        for conn in connections:
            conn.hang_up()
        export.notify()

    def controller_changed(self, controller_id: str) -> None:
        """The host resumed or replaced the controller: stalled requests try again now."""
        export = self._exports.get(controller_id)
        if export is not None:
            export.notify()

    # ---- connections ------------------------------------------------------------------------

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        peer = writer.get_extra_info("peername")
        peer_host = str(peer[0]) if peer else ""
        if self._peers[peer_host] >= MAX_CONNECTIONS_PER_PEER or len(self._handlers) >= MAX_CONNECTIONS:
            malformed_input.malformed("nbd", "NBD client %s refused: it holds %d connections (at most %d per peer, "
                                      "%d in all)", peer, self._peers[peer_host], MAX_CONNECTIONS_PER_PEER,
                                      MAX_CONNECTIONS)
            writer.transport.abort()
            return
        self._handlers.add(task)
        self._peers[peer_host] += 1
        conn: _Connection | None = None
        try:
            chosen = await self._negotiate(reader, writer)
            if chosen is not None:
                export, controller = chosen
                if self._ssl is not None:
                    conn = _StreamConnection(self, export, controller, reader, writer)
                else:
                    conn = _SocketConnection(self, export, controller, *await _detach(reader, writer))
                export.connections.add(conn)
                await conn.serve()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the client went away (or we hung up on it)
        except p.ProtocolError as exc:
            malformed_input.malformed("nbd", "NBD client %s broke the protocol: %s; hanging up", peer, exc)
        except ssl.SSLError as exc:
            # no certificate, one from another CA, or not TLS at all after NBD_OPT_STARTTLS
            malformed_input.malformed("nbd", "NBD client %s failed the TLS handshake: %s; hanging up", peer,
                                      exc.reason or exc)
        finally:
            self._peers[peer_host] -= 1
            if conn is not None:
                conn.export.connections.discard(conn)
                await conn.finish()
                for command, n in enumerate(conn.counts):
                    self._ended_counts[command] += n
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
            self._handlers.discard(task)

    def _resolve(self, name: str) -> tuple[_Export, GuestDrivenController] | str:
        """The export and its controller, or why a client may not have it."""
        export = self._exports.get(name)
        controller = self._lookup(name)
        if export is None or controller is None:
            shown = sorted(cid for cid in self._exports if self._lookup(cid) is not None)
            return (f"export {names.shown(name)} does not exist on this node (exported here: "
                    f"{', '.join(shown) or 'none'}); ask the orchestrator for the URI with "
                    f"`orchctl export CONTROLLER`")
        return export, controller

    async def _negotiate(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
                         ) -> tuple[_Export, GuestDrivenController] | None:
        writer.write(p.server_greeting())
        await writer.drain()
        (client_flags,) = p.CLIENT_FLAGS.unpack(await reader.readexactly(p.CLIENT_FLAGS.size))
        if client_flags & ~(p.CLIENT_FLAG_FIXED_NEWSTYLE | p.CLIENT_FLAG_NO_ZEROES):
            raise p.ProtocolError(f"unknown client flags {client_flags:#x}")
        no_zeroes = bool(client_flags & p.CLIENT_FLAG_NO_ZEROES)

        def reply(option: int, kind: int, data: bytes = b"") -> None:
            writer.write(p.option_reply(option, kind, data))

        stage = TlsStage.OFF if self._ssl is None else TlsStage.REQUIRED
        refusal: str | None = None  # after STARTTLS: why the client's identity may not use exports
        while True:
            magic, option, length = p.OPTION_HEADER.unpack(await reader.readexactly(p.OPTION_HEADER.size))
            if magic != p.IHAVEOPT:
                raise p.ProtocolError(f"option magic {magic:#x} is not IHAVEOPT")
            if length > MAX_OPTION_BYTES:
                raise p.ProtocolError(f"option {option} carries {length} bytes (at most {MAX_OPTION_BYTES})")
            data = await reader.readexactly(length)
            verdict = option_verdict(stage, option, length, refusal)
            if verdict.action is Action.HANG_UP:
                return None
            if verdict.action is Action.START_TLS:
                reply(option, p.REP_ACK)
                refusal = await self._start_tls(reader, writer)
                stage = TlsStage.ON
                continue
            if verdict.action is not Action.HANDLE:
                reply(option, verdict.reply, verdict.message.encode())
                await writer.drain()
                if verdict.action is Action.REPLY_AND_CLOSE:
                    return None
                continue
            if option == p.OPT_EXPORT_NAME:
                found = self._resolve(data.decode("utf-8", errors="replace"))
                if isinstance(found, str):
                    # NBD_OPT_EXPORT_NAME has no way to report an error: the protocol says hang up.
                    log.info("NBD client asked for a missing export: %s", found)
                    return None
                writer.write(p.export_name_reply(found[1].namespace_bytes, TRANSMISSION_FLAGS, no_zeroes))
                await writer.drain()
                return found
            if option == p.OPT_ABORT:
                reply(option, p.REP_ACK)
                await writer.drain()
                return None
            if option == p.OPT_LIST:
                if length:
                    reply(option, p.REP_ERR_INVALID, b"NBD_OPT_LIST takes no data")
                else:
                    for cid in sorted(self._exports):
                        if self._lookup(cid) is not None:
                            reply(option, p.REP_SERVER, p.server_entry(cid))
                    reply(option, p.REP_ACK)
            elif option in (p.OPT_INFO, p.OPT_GO):
                try:
                    go = p.parse_go(data)
                except ValueError as exc:
                    reply(option, p.REP_ERR_INVALID, str(exc).encode())
                    await writer.drain()
                    continue
                found = self._resolve(go.name)
                if isinstance(found, str):
                    reply(option, p.REP_ERR_UNKNOWN, found.encode())
                    await writer.drain()
                    continue
                export, controller = found
                reply(option, p.REP_INFO, p.info_export(controller.namespace_bytes, TRANSMISSION_FLAGS))
                # Sent whether asked for or not (the protocol allows it): clients then align.
                reply(option, p.REP_INFO, p.info_block_size(BLOCK_BYTES, BLOCK_BYTES, MAX_REQUEST_BYTES))
                if p.INFO_NAME in go.info_requests:
                    reply(option, p.REP_INFO, p.info_text(p.INFO_NAME, export.controller_id))
                if p.INFO_DESCRIPTION in go.info_requests:
                    reply(option, p.REP_INFO, p.info_text(
                        p.INFO_DESCRIPTION, f"NVMe controller {export.controller_id} namespace 1"))
                reply(option, p.REP_ACK)
                await writer.drain()
                if option == p.OPT_GO:
                    return found
            else:
                reply(option, p.REP_ERR_UNSUP, f"option {option} is not supported".encode())
            await writer.drain()

    async def _start_tls(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> str | None:
        """The TLS handshake after NBD_OPT_STARTTLS was acknowledged (the ACK written; start_tls
        flushes it first); returns why the client's certificate may not use exports, None when it may."""
        assert self._ssl is not None
        # Bytes the client sent after STARTTLS, before the handshake, would be read as if they had
        # come over TLS (the STARTTLS injection of SMTP fame): the protocol forbids them.
        # StreamReader has no public way to ask what it holds.
        if getattr(reader, "_buffer", b""):
            raise p.ProtocolError("data after NBD_OPT_STARTTLS, before the TLS handshake")
        await writer.start_tls(self._ssl, ssl_handshake_timeout=TLS_HANDSHAKE_TIMEOUT_S)
        tls_object = writer.get_extra_info("ssl_object")
        der = tls_object.getpeercert(binary_form=True) if tls_object is not None else None
        refusal = nbd_refusal(identity_of_der(der))
        if refusal is not None:
            malformed_input.malformed("nbd", "NBD client %s: %s; refusing its options",
                                      writer.get_extra_info("peername"), refusal)
        return refusal


async def _detach(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> tuple[socket.socket, bytes]:
    """The connection's socket (a duplicate), for a thread to use with blocking calls, and the
    bytes the negotiation's reader already took from it (requests the client sent right after its
    last option). The transport neither reads nor writes it after this; closing it later closes
    only its own descriptor."""
    transport = writer.transport
    assert isinstance(transport, asyncio.Transport)  # a socket's: it reads too
    transport.pause_reading()
    transport.set_write_buffer_limits(high=0)
    await writer.drain()  # every negotiation reply is out before the thread's first
    raw = writer.get_extra_info("socket")
    sock = socket.socket(raw.family, raw.type, raw.proto, fileno=os.dup(raw.fileno()))
    # StreamReader has no public way to hand over what it holds.
    buffered = bytes(getattr(reader, "_buffer", b""))
    return sock, buffered


def _check_guest_io(controller: GuestDrivenController) -> None:
    """Flush and trim touch no block, but like every guest command they wait out a suspend."""
    state = controller.vfio_state
    if state not in _GUEST_IO_STATES:
        raise NotRunningError(f"controller {controller.controller_id} is {state.name}")


def _fsync(controller: GuestDrivenController) -> None:
    _check_guest_io(controller)
    fd = os.open(controller.namespace_path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)  # flushes the file's dirty pages whichever descriptor wrote them
    finally:
        os.close(fd)


def _read(controller: GuestDrivenController, offset: int, length: int) -> bytes:
    if length <= CHUNK_BYTES:
        return controller.read_blocks(offset // BLOCK_BYTES, length // BLOCK_BYTES)
    parts = []
    for at in range(offset, offset + length, CHUNK_BYTES):
        n = min(CHUNK_BYTES, offset + length - at)
        parts.append(controller.read_blocks(at // BLOCK_BYTES, n // BLOCK_BYTES))
    return b"".join(parts)


def _write(controller: GuestDrivenController, offset: int, data: bytes, fua: bool) -> None:
    if len(data) <= CHUNK_BYTES:
        controller.write_blocks(offset // BLOCK_BYTES, data)
    else:
        view = memoryview(data)
        for at in range(0, len(view), CHUNK_BYTES):
            controller.write_blocks((offset + at) // BLOCK_BYTES, bytes(view[at:at + CHUNK_BYTES]))
    if fua:
        _fsync(controller)


def _write_zeroes(controller: GuestDrivenController, offset: int, length: int, fua: bool) -> None:
    zeroes = bytes(min(CHUNK_BYTES, length))
    for at in range(offset, offset + length, CHUNK_BYTES):
        n = min(CHUNK_BYTES, offset + length - at)
        controller.write_blocks(at // BLOCK_BYTES, zeroes[:n])
    if fua:
        _fsync(controller)


def _trim(controller: GuestDrivenController, fua: bool) -> None:
    # The guest path has no deallocate: keeping the data is a valid trim (it is only a hint).
    _check_guest_io(controller)
    if fua:
        _fsync(controller)


def _execute(controller: GuestDrivenController, command: int, flags: int, offset: int, length: int,
             payload: bytes) -> bytes:
    """One request that passed `_refusal`, on the calling thread: the data a READ returns, else b"".

    Raises NotRunningError while the controller is suspended (the caller waits and retries),
    ControllerGoneError or FileNotFoundError once it left, OSError or ControllerError on failure.
    """
    fua = bool(flags & p.CMD_FLAG_FUA)
    if command == p.CMD_READ:
        return _read(controller, offset, length)
    if command == p.CMD_WRITE:
        _write(controller, offset, payload, fua)
    elif command == p.CMD_WRITE_ZEROES:
        _write_zeroes(controller, offset, length, fua)
    elif command == p.CMD_FLUSH:
        _fsync(controller)
    elif command == p.CMD_TRIM:
        _trim(controller, fua)
    return b""


def _failed(controller: GuestDrivenController, command: int, offset: int, length: int, exc: Exception) -> None:
    log.warning("NBD %s at offset %d length %d on %s failed: %s", p.COMMAND_NAMES[command], offset, length,
                controller.controller_id, exc)


class _Connection:
    """One client in the transmission phase; `serve()` returns when it is done."""

    def __init__(self, server: NbdServer, export: _Export, controller: GuestDrivenController) -> None:
        self.server = server
        self.export = export
        self.controller = controller
        self.closing = False
        # Requests received, indexed by command (p.COMMAND_NAMES; the last slot for any other):
        # written by the one thread serving the connection, summed by NbdServer.requests.
        self.counts = [0] * (_OTHER_COMMAND + 1)

    def count(self, command: int) -> None:
        self.counts[command if command < _OTHER_COMMAND else _OTHER_COMMAND] += 1

    def hang_up(self) -> None:
        raise NotImplementedError

    async def serve(self) -> None:
        raise NotImplementedError

    async def finish(self) -> None:
        self.closing = True


class _SocketConnection(_Connection):
    """A plaintext client, served by a thread of its own with blocking socket calls.

    The thread reads what the client sent, answers every whole request in it in order, and sends
    the replies of the lot with one call before it waits for more: no task, executor hop or send
    lock per request, and the event loop never sees the traffic. A client's deep queue is served one
    request after another; that costs nothing here, since every guest command of a controller
    holds the controller's lock anyway (a client wanting more uses multi-conn).
    """

    def __init__(self, server: NbdServer, export: _Export, controller: GuestDrivenController,
                 sock: socket.socket, buffered: bytes) -> None:
        super().__init__(server, export, controller)
        self.sock = sock
        self._buffered = buffered  # read by the negotiation's StreamReader past NBD_OPT_GO
        self._loop: asyncio.AbstractEventLoop | None = None
        # (bytes, seconds) of requests served since the last send, for the pacer, which lives on
        # the event loop: handed over once per batch of replies, not per request.
        self._timings: list[tuple[int, float]] = []

    def hang_up(self) -> None:
        """Ends the thread: a blocked recv or send returns, a stalled request sees `closing`."""
        self.closing = True
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)

    async def serve(self) -> None:
        loop = self._loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()

        def settle(exc: BaseException | None) -> None:
            if done.done():
                return
            if exc is None:
                done.set_result(None)
            else:
                done.set_exception(exc)

        def run() -> None:
            outcome: BaseException | None = None
            try:
                self._transmit()
            except OSError:
                pass  # the client went away, or hang_up() cut the socket under a recv or send
            except Exception as exc:  # ProtocolError: _accept logs it
                outcome = exc
            finally:
                with contextlib.suppress(OSError):
                    self.sock.close()
                with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
                    loop.call_soon_threadsafe(settle, outcome)

        threading.Thread(target=run, name=f"nbd {self.export.controller_id}", daemon=True).start()
        try:
            await asyncio.shield(done)
        except asyncio.CancelledError:
            # The server is closing: the thread must be out before the host closes the controller.
            self.hang_up()
            await asyncio.wait([done])
            raise

    def _transmit(self) -> None:
        sock = self.sock
        sock.setblocking(True)
        size = self.controller.namespace_bytes
        header_size = p.REQUEST.size
        # Requests arrive into one buffer, reused: buf[start:end] is what is not answered yet.
        buf = bytearray(max(RECV_BYTES, len(self._buffered)))
        end = len(self._buffered)
        buf[:end] = self._buffered
        start = 0
        need = header_size  # bytes the first request not answered takes, once its header is in
        out: list[bytes] = []  # replies (headers and read data) not yet sent
        try:
            while not self.closing:
                out_bytes = 0
                while out_bytes < MAX_PENDING_REPLY_BYTES:
                    avail = end - start
                    need = header_size
                    if avail < header_size:
                        break
                    flags, command, cookie, offset, length = p.parse_request(buf, MAX_REQUEST_BYTES, start)
                    if command == p.CMD_WRITE:
                        need += length
                        if avail < need:
                            break
                        payload = bytes(memoryview(buf)[start + header_size:start + need])
                    else:
                        payload = b""
                    start += need
                    self.count(command)
                    if command == p.CMD_DISC:
                        return  # soft disconnect: what came before it is answered (sent below)
                    answered = self._answer(command, flags, cookie, offset, length, payload, size, out)
                    if answered < 0:
                        return  # the controller left: no reply, the client sees the connection close
                    out_bytes += answered
                if out:
                    _send_all(sock, out)
                self._report_timings()
                if out_bytes >= MAX_PENDING_REPLY_BYTES:
                    continue  # stopped to bound the replies held, not for want of requests
                # Keep what is not answered at the front, with room for the whole of the next request.
                if start:
                    buf[:end - start] = buf[start:end]
                    end -= start
                    start = 0
                if need > len(buf):
                    buf.extend(bytes(need - len(buf)))  # a long WRITE
                elif len(buf) > RECV_BYTES >= end and need <= RECV_BYTES:
                    del buf[RECV_BYTES:]  # after one: back to the usual size
                received = sock.recv_into(memoryview(buf)[end:])
                if not received:
                    return  # the client closed
                end += received
        finally:
            if out and not self.closing:
                _send_all(sock, out)

    def _answer(self, command: int, flags: int, cookie: int, offset: int, length: int, payload: bytes, size: int,
                out: list[bytes]) -> int:
        """Runs one request and appends its reply (header and any data) to `out`: the bytes appended,
        or -1 when the controller left (no reply)."""
        error = _refusal(command, flags, offset, length, size)
        if error:
            out.append(p.simple_reply(cookie, error))
            return p.SIMPLE_REPLY_BYTES
        controller = self.controller
        guest_io = self.server.guest_io
        limited_as = _LIMITED_AS.get(command)
        if limited_as is not None and guest_io is not None:
            held_s = guest_io.admit(controller.controller_id, limited_as, length)
            if held_s > 0:
                # The controller's I/O limit: what is answered goes out first, then this request waits.
                if out:
                    _send_all(self.sock, out)
                time.sleep(held_s)
        while not self.closing:
            seen = self.export.generation
            try:
                started = time.monotonic()
                data = _execute(controller, command, flags, offset, length, payload)
                if command in _TIMED and guest_io is not None:
                    self._timings.append((length, time.monotonic() - started))
            except NotRunningError:
                # Suspended: what is answered already goes out now, then wait for a wake-up.
                if out:
                    _send_all(self.sock, out)
                self.export.wait_changed(seen, STALL_RECHECK_S)
                continue
            except (ControllerGoneError, FileNotFoundError):
                return -1
            except (OSError, ControllerError) as exc:
                _failed(controller, command, offset, length, exc)
                out.append(p.simple_reply(cookie, p.EIO))
                return p.SIMPLE_REPLY_BYTES
            out.append(p.simple_reply(cookie))
            if data:
                out.append(data)
            return p.SIMPLE_REPLY_BYTES + len(data)
        return -1


    def _report_timings(self) -> None:
        guest_io, timings = self.server.guest_io, self._timings
        if not timings or guest_io is None or self._loop is None:
            return
        self._timings = []

        def report() -> None:
            for nbytes, seconds in timings:
                guest_io.completed(nbytes, seconds)

        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody paces any more
            self._loop.call_soon_threadsafe(report)


def _send_all(sock: socket.socket, parts: list[bytes]) -> None:
    """Sends `parts` in order, as few system calls as the kernel allows, and empties the list."""
    for first in range(0, len(parts), _IOV_MAX):
        batch = parts[first:first + _IOV_MAX]
        sent = sock.sendmsg(batch)
        total = sum(map(len, batch))
        if sent < total:  # the socket buffer filled: the rest the slow way
            sock.sendall(b"".join(batch)[sent:])
    parts.clear()


class _StreamConnection(_Connection):
    """A TLS client: asyncio's TLS transport, up to MAX_INFLIGHT requests served at once, each
    in the server's I/O pool."""

    def __init__(self, server: NbdServer, export: _Export, controller: GuestDrivenController,
                 reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        super().__init__(server, export, controller)
        self.reader = reader
        self.writer = writer
        self._slots = asyncio.Semaphore(MAX_INFLIGHT)
        self._inflight: set[asyncio.Task[None]] = set()
        self._send_lock = asyncio.Lock()

    def hang_up(self) -> None:
        """Closes the socket: the request loop ends, stalled requests are cancelled in finish()."""
        self.closing = True
        self.writer.close()

    async def finish(self) -> None:
        self.closing = True
        for task in list(self._inflight):
            task.cancel()
        for task in list(self._inflight):
            with contextlib.suppress(BaseException):
                await task

    async def serve(self) -> None:
        size = self.controller.namespace_bytes
        while not self.closing:
            header = await self.reader.readexactly(p.REQUEST.size)
            flags, command, cookie, offset, length = p.parse_request(header, MAX_REQUEST_BYTES)
            self.count(command)
            payload = b""
            if command == p.CMD_WRITE:
                payload = await self.reader.readexactly(length)
            if command == p.CMD_DISC:
                # Soft disconnect: finish what was asked before it, then close.
                await asyncio.gather(*self._inflight, return_exceptions=True)
                return
            error = _refusal(command, flags, offset, length, size)
            if error:
                await self._send(p.simple_reply(cookie, error))
                continue
            await self._slots.acquire()
            task = asyncio.create_task(self._serve_one(command, flags, cookie, offset, length, payload))
            self._inflight.add(task)
            task.add_done_callback(self._done)

    async def run_io(self, work: Callable[[], T], observed_bytes: int = -1) -> T:
        """Runs `work` in the I/O pool; while the controller is suspended, waits and retries.
        With `observed_bytes` >= 0 the attempt that succeeds is reported to the node's guest I/O
        policy (a stall while suspended is not guest latency)."""
        loop = asyncio.get_running_loop()
        while True:
            if self.closing:
                raise ExportGone()
            changed = self.export.changed
            try:
                started = time.monotonic()
                result = await loop.run_in_executor(self.server.io_pool, work)
                if observed_bytes >= 0 and self.server.guest_io is not None:
                    self.server.guest_io.completed(observed_bytes, time.monotonic() - started)
                return result
            except NotRunningError:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(changed.wait(), STALL_RECHECK_S)
            except (ControllerGoneError, FileNotFoundError):
                raise ExportGone() from None

    def _done(self, task: asyncio.Task[None]) -> None:
        self._inflight.discard(task)
        self._slots.release()

    async def _serve_one(self, command: int, flags: int, cookie: int, offset: int, length: int,
                         payload: bytes) -> None:
        ctrl = self.controller
        data = b""
        error = 0
        limited_as = _LIMITED_AS.get(command)
        if limited_as is not None and self.server.guest_io is not None:
            held_s = self.server.guest_io.admit(ctrl.controller_id, limited_as, length)
            if held_s > 0:
                await asyncio.sleep(held_s)  # the controller's I/O limit (its own queue, not a pool thread)
        try:
            data = await self.run_io(lambda: _execute(ctrl, command, flags, offset, length, payload),
                                     length if command in _TIMED else -1)
        except ExportGone:
            # No reply: the request did not complete here. The client sees the connection close.
            self.hang_up()
            return
        except (OSError, ControllerError) as exc:
            _failed(ctrl, command, offset, length, exc)
            error, data = p.EIO, b""
        await self._send(p.simple_reply(cookie, error) + data)

    async def _send(self, message: bytes) -> None:
        if self.closing:
            return
        async with self._send_lock:
            self.writer.write(message)
            await self.writer.drain()


def _refusal(command: int, flags: int, offset: int, length: int, size: int) -> int:
    """The errno for a request that must not run, or 0."""
    allowed = _ALLOWED_FLAGS.get(command)
    if allowed is None or flags & ~allowed:
        return p.EINVAL  # unknown command, or a flag it does not take
    if command == p.CMD_FLUSH:
        return 0  # offset and length carry nothing for a flush
    if length == 0 or offset % BLOCK_BYTES or length % BLOCK_BYTES:
        return p.EINVAL  # the advertised minimum block size is 4096
    if command == p.CMD_READ and length > MAX_REQUEST_BYTES:
        return p.EINVAL
    if offset + length > size:
        return p.ENOSPC if command in (p.CMD_WRITE, p.CMD_WRITE_ZEROES) else p.EINVAL
    return 0
