"""The NBD server's transmission phase in-process, against a real EmulatedController: many
requests in one segment (a client's whole queue), requests split across segments, the largest
write, dirty tracking of what NBD writes, a suspended controller, unexport and close with a
client connected, the request counters. The client is tests/nbdprobe.RawNbd, written from the
protocol document; the server runs on an event loop of its own thread, as in the agent.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import socket
import struct
import threading
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from agent.emulated.controller import EmulatedController
from agent.nbd import protocol as p
from agent.nbd.server import MAX_REQUEST_BYTES, NbdServer
from agent.vfio_states import VfioState
from orchctl.localcluster import wait_for
from tests.nbdprobe import RawNbd

T = TypeVar("T")
MiB = 1 << 20
NS_BYTES = 16 * MiB
DEADLINE_S = 10.0


class ServedController:
    """An NbdServer exporting one controller, on an event loop in a thread of its own."""

    def __init__(self, controller: EmulatedController) -> None:
        self.controller = controller
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="test-nbd-loop", daemon=True)
        self.thread.start()
        self.server = NbdServer("127.0.0.1", 0, "127.0.0.1",
                                lambda cid: controller if cid == controller.controller_id else None)
        self.call(self.server.start())
        self.uri = self.call(self._export())

    async def _export(self) -> str:
        return self.server.export(self.controller.controller_id)

    def call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(DEADLINE_S)

    def on_loop(self, fn: Any, *args: Any) -> Any:
        async def run() -> Any:
            return fn(*args)
        return self.call(run())

    def client(self) -> RawNbd:
        client = RawNbd(self.uri)
        replies = client.go(self.controller.controller_id)
        assert replies[-1][0] == p.REP_ACK, replies
        return client

    def close(self) -> None:
        try:
            self.call(self.server.close())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(DEADLINE_S)
            self.loop.close()


@pytest.fixture
def served(tmp_path: Path) -> Iterator[ServedController]:
    controller = EmulatedController("s1", tmp_path / "s1.ns", NS_BYTES, create=True)
    served = ServedController(controller)
    try:
        yield served
    finally:
        served.close()
        controller.release()


def request(command: int, cookie: int, offset: int = 0, length: int = 0, payload: bytes = b"", flags: int = 0
            ) -> bytes:
    return struct.pack(">IHHQQI", p.REQUEST_MAGIC, flags, command, cookie, offset, length) + payload


def reply(client: RawNbd, read_length: int = 0) -> tuple[int, int, bytes]:
    """(cookie, error, data) of the next simple reply; `read_length` bytes of data follow a good READ."""
    magic, error, cookie = struct.unpack(">IIQ", client.recv(16))
    assert magic == p.SIMPLE_REPLY_MAGIC
    return cookie, error, client.recv(read_length) if read_length and not error else b""


def test_a_whole_queue_in_one_segment_is_answered_in_order_and_reads_see_earlier_writes(
        served: ServedController) -> None:
    client = served.client()
    blocks = [os.urandom(4096) for _ in range(64)]
    wire = b"".join(request(p.CMD_WRITE, i, i * 8192, 4096, block) for i, block in enumerate(blocks))
    wire += b"".join(request(p.CMD_READ, 100 + i, i * 8192, 4096) for i in range(64))
    wire += request(p.CMD_FLUSH, 200) + request(p.CMD_TRIM, 201, 0, 4096)
    wire += request(p.CMD_WRITE_ZEROES, 202, 4096, 4096) + request(p.CMD_READ, 203, 4096, 4096)
    wire += request(p.CMD_READ, 204, 4095, 4096)  # unaligned: EINVAL, the stream goes on
    client.sock.sendall(wire)
    for i in range(64):
        assert reply(client) == (i, 0, b"")
    for i in range(64):
        assert reply(client, 4096) == (100 + i, 0, blocks[i])
    assert reply(client) == (200, 0, b"")
    assert reply(client) == (201, 0, b"")
    assert reply(client) == (202, 0, b"")
    assert reply(client, 4096) == (203, 0, bytes(4096))
    assert reply(client) == (204, p.EINVAL, b"")
    for i, block in enumerate(blocks):
        assert served.controller.read_raw(i * 8192, 4096) == block


def test_requests_split_anywhere_across_segments_are_answered(served: ServedController) -> None:
    client = served.client()
    client.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    block = os.urandom(4096)
    wire = request(p.CMD_WRITE, 1, 12288, 4096, block) + request(p.CMD_READ, 2, 12288, 4096)
    # Cut at a header's middle, at the header/payload boundary, in the payload, in the next header.
    cuts = [0, 5, 28, 29, 2000, 4124, 4130, len(wire)]
    for a, b in itertools.pairwise(cuts):
        client.sock.sendall(wire[a:b])
    assert reply(client) == (1, 0, b"")
    assert reply(client, 4096) == (2, 0, block)


def test_the_largest_write_and_read_round_trip_and_the_connection_goes_on(served: ServedController) -> None:
    client = served.client()
    big = os.urandom(MAX_REQUEST_BYTES)
    small = os.urandom(4096)
    client.sock.sendall(request(p.CMD_WRITE, 1, 0, len(big), big) + request(p.CMD_WRITE, 2, 8 * MiB, 4096, small)
                        + request(p.CMD_READ, 3, 0, len(big)))
    assert reply(client) == (1, 0, b"")
    assert reply(client) == (2, 0, b"")
    assert reply(client, len(big)) == (3, 0, big)
    assert client.request(p.CMD_READ, 8 * MiB, 4096) == (0, small)
    assert served.controller.read_raw(0, len(big)) == big


def test_nbd_writes_are_the_dirty_blocks_migration_takes(served: ServedController) -> None:
    served.controller.start_dirty_tracking()
    served.controller.take_dirty_lbas()
    client = served.client()
    written = [3, 4, 5, 700, 1024, 4095]
    client.sock.sendall(b"".join(request(p.CMD_WRITE, lba, lba * 4096, 4096, os.urandom(4096)) for lba in written)
                        + request(p.CMD_WRITE, 9, 2000 * 4096, 3 * 4096, os.urandom(3 * 4096))
                        + request(p.CMD_WRITE_ZEROES, 10, 3000 * 4096, 2 * 4096)
                        + request(p.CMD_READ, 11, 100 * 4096, 4096))
    for _ in range(len(written) + 2):
        assert reply(client)[1] == 0
    assert reply(client, 4096)[1] == 0
    assert served.controller.take_dirty_lbas() == sorted([*written, 2000, 2001, 2002, 3000, 3001])


def test_a_request_to_a_suspended_controller_waits_and_completes_after_resume(served: ServedController) -> None:
    client = served.client()
    block = os.urandom(4096)
    served.controller.set_state(VfioState.STOP)
    client.sock.sendall(request(p.CMD_WRITE, 1, 0, 4096, block))
    client.sock.settimeout(0.3)
    with pytest.raises(TimeoutError):
        client.sock.recv(1)  # no answer while suspended (an answer now would be the bug)
    assert served.controller.read_raw(0, 4096) == bytes(4096)
    client.sock.settimeout(DEADLINE_S)
    served.controller.set_state(VfioState.RUNNING)
    served.on_loop(served.server.controller_changed, served.controller.controller_id)
    assert reply(client) == (1, 0, b"")
    assert served.controller.read_raw(0, 4096) == block


def test_unexport_cuts_a_connected_client_and_close_ends_an_idle_one(served: ServedController) -> None:
    first, second = served.client(), served.client()
    assert first.request(p.CMD_READ, 0, 4096) == (0, bytes(4096))
    assert second.request(p.CMD_READ, 0, 4096) == (0, bytes(4096))
    wait_for("two clients in transmission", lambda: served.on_loop(served.server.clients) == 2, DEADLINE_S)
    served.on_loop(served.server.unexport, served.controller.controller_id)
    assert first.closed_by_server() and second.closed_by_server()
    wait_for("clients gone", lambda: served.on_loop(served.server.clients) == 0, DEADLINE_S)
    served.on_loop(served.server.export, served.controller.controller_id)
    idle = served.client()
    assert idle.request(p.CMD_FLUSH, 0, 0) == (0, b"")
    served.call(served.server.close())  # returns only once the connection's thread is out
    assert idle.closed_by_server()


def test_disconnect_answers_what_came_before_it_and_requests_are_counted(served: ServedController) -> None:
    client = served.client()
    block = os.urandom(4096)
    client.sock.sendall(request(p.CMD_WRITE, 1, 4096, 4096, block) + request(p.CMD_READ, 2, 4096, 4096)
                        + request(p.CMD_DISC, 3) + request(p.CMD_READ, 4, 0, 4096))
    assert reply(client) == (1, 0, b"")
    assert reply(client, 4096) == (2, 0, block)
    assert client.closed_by_server()  # nothing after DISC is answered
    wait_for("client gone", lambda: served.on_loop(served.server.clients) == 0, DEADLINE_S)
    live = served.client()
    assert live.request(p.CMD_READ, 0, 4096)[0] == 0
    live.sock.sendall(request(77, 9))  # an unknown command: EINVAL, counted as OTHER
    assert reply(live) == (9, p.EINVAL, b"")
    counts = served.on_loop(lambda: served.server.requests)
    assert counts == {"WRITE": 1, "READ": 2, "DISC": 1, "OTHER": 1}
