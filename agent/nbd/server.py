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

Every namespace access runs in a small thread pool of its own, so the event loop (which also
serves gRPC and the migration data plane) never blocks on file I/O, and a deep client queue
cannot crowd the migration's own `asyncio.to_thread` calls out of the default executor.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import ssl
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
MAX_INFLIGHT = 32  # requests per connection being served at once (bounds memory to 128 MiB)
# Connections at once: from one peer address, and in all. Each may hold MAX_INFLIGHT requests'
# buffers; a client needs one (a few with multi-conn).
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
_GUEST_IO_STATES = frozenset({VfioState.RUNNING, VfioState.PRE_COPY})
# The controller's limit each command counts against (agent/qos.py); a flush counts against none.
_LIMITED_AS = {p.CMD_READ: "read", p.CMD_WRITE: "write", p.CMD_WRITE_ZEROES: "write", p.CMD_TRIM: "trim"}


class ExportGone(Exception):
    """The controller left this node, was unexported, or the server is closing."""


@dataclass
class _Export:
    controller_id: str
    connections: set[_Connection] = field(default_factory=set)
    # Replaced on every notification: a request takes the current one *before* it tries the
    # controller, so a wake-up that comes while it tries is not missed.
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def notify(self) -> None:
        self.changed.set()
        self.changed = asyncio.Event()


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
        # Requests received in the transmission phase, by command name (p.COMMAND_NAMES, or
        # "OTHER"): a bounded set, for the agent's /metrics.
        self.requests: collections.Counter[str] = collections.Counter()

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
                conn = _Connection(self, export, controller, reader, writer)
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
    parts = []
    for at in range(offset, offset + length, CHUNK_BYTES):
        n = min(CHUNK_BYTES, offset + length - at)
        parts.append(controller.read_blocks(at // BLOCK_BYTES, n // BLOCK_BYTES))
    return b"".join(parts)


def _write(controller: GuestDrivenController, offset: int, data: bytes | memoryview, fua: bool) -> None:
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


class _Connection:
    """One client in the transmission phase: reads requests, serves up to MAX_INFLIGHT at once."""

    def __init__(self, server: NbdServer, export: _Export, controller: GuestDrivenController,
                 reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.server = server
        self.export = export
        self.controller = controller
        self.reader = reader
        self.writer = writer
        self.closing = False
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
            self.server.requests[p.COMMAND_NAMES.get(command, "OTHER")] += 1
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
        fua = bool(flags & p.CMD_FLAG_FUA)
        data = b""
        error = 0
        limited_as = _LIMITED_AS.get(command)
        if limited_as is not None and self.server.guest_io is not None:
            held_s = self.server.guest_io.admit(ctrl.controller_id, limited_as, length)
            if held_s > 0:
                await asyncio.sleep(held_s)  # the controller's I/O limit (its own queue, not a pool thread)
        try:
            if command == p.CMD_READ:
                data = await self.run_io(lambda: _read(ctrl, offset, length), length)
            elif command == p.CMD_WRITE:
                await self.run_io(lambda: _write(ctrl, offset, payload, fua), length)
            elif command == p.CMD_WRITE_ZEROES:
                await self.run_io(lambda: _write_zeroes(ctrl, offset, length, fua))
            elif command == p.CMD_FLUSH:
                await self.run_io(lambda: _fsync(ctrl))
            elif command == p.CMD_TRIM:
                await self.run_io(lambda: _trim(ctrl, fua))
        except ExportGone:
            # No reply: the request did not complete here. The client sees the connection close.
            self.hang_up()
            return
        except (OSError, ControllerError) as exc:
            log.warning("NBD %s at offset %d length %d on %s failed: %s", p.COMMAND_NAMES[command], offset,
                        length, ctrl.controller_id, exc)
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
