"""Tests for the migration data plane (agent/dataplane): framing, rate limit, sender <-> receiver.

Everything runs over real sockets on 127.0.0.1 into a real file; the only test-specific class is
``FileSink``, a minimal DestinationSink that is the target of the transfer, not a stand-in for
one of our components. Waits are on conditions with deadlines, never on bare sleeps.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import itertools
import json
import os
import random
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.dataplane.framing import (
    HEADER_SIZE,
    MAGIC,
    VERSION,
    ChecksumError,
    Frame,
    FrameError,
    FrameType,
    encode_frame,
    encode_header,
    read_frame,
)
from agent.dataplane.ratelimit import MAX_SLEEP_SLICE_S, TokenBucket
from agent.dataplane.receiver import CAUSE_NO_SPACE, DataReceiver, decode_final_payload, encode_final_payload
from agent.dataplane.sender import DataPlaneError, DataSender, FrameFaults, stream_extents
from cluster.grpc_tls import TlsFiles
from orchctl import certs

MiB = 1024 * 1024
DEADLINE_S = 10.0  # generous upper bound for anything that should finish "promptly"


# -- helpers ---------------------------------------------------------------------------------


class FileSink:
    """Writes extents into a real file, records rounds and final blobs."""

    def __init__(self, path: Path, *, final_error: str | None = None, notify_at: int = 0) -> None:
        self.path = path
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        self.final_error = final_error
        self.plan = b""
        self.guest_map: list[bytes] = []
        self.rounds: list[int] = []
        self.final: tuple[bytes, bytes] | None = None
        self.extents: list[tuple[int, int]] = []
        self.written = 0
        self.notify_at = notify_at
        self.reached = asyncio.Event()
        self.block: asyncio.Event | None = None  # when set to an Event, apply_extent waits on it
        self.full_at: int | None = None  # an extent at this offset fails as on a full disk

    async def apply_extent(self, offset: int, data: bytes) -> None:
        if self.block is not None:
            await self.block.wait()
        if offset == self.full_at:
            raise OSError(errno.ENOSPC, "No space left on device")
        await asyncio.to_thread(os.pwrite, self.fd, data, offset)
        self.extents.append((offset, len(data)))
        self.written += len(data)
        if self.notify_at and self.written >= self.notify_at:
            self.reached.set()

    async def apply_round_end(self, round: int) -> None:
        self.rounds.append(round)

    async def apply_guest_map(self, piece: bytes) -> None:
        self.guest_map.append(piece)

    async def apply_plan(self, plan: bytes) -> None:
        self.plan = plan

    async def apply_final(self, state_blob: bytes, guest_blob: bytes) -> dict[str, Any]:
        if self.final_error is not None:
            raise RuntimeError(self.final_error)
        self.final = (state_blob, guest_blob)
        return {}

    def close(self) -> None:
        os.close(self.fd)


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


async def file_reader(path: Path) -> tuple[int, Callable[[int, int], Awaitable[bytes]]]:
    fd = os.open(path, os.O_RDONLY)

    async def read(offset: int, length: int) -> bytes:
        return await asyncio.to_thread(os.pread, fd, length, offset)

    return fd, read


@pytest.fixture
def sinks(tmp_path: Path) -> Iterator[list[FileSink]]:
    made: list[FileSink] = []
    yield made
    for s in made:
        s.close()


def new_sink(sinks: list[FileSink], tmp_path: Path, name: str = "dest.img", **kw: object) -> FileSink:
    s = FileSink(tmp_path / name, **kw)  # type: ignore[arg-type]
    sinks.append(s)
    return s


# -- framing -----------------------------------------------------------------------------------


frames = st.builds(
    Frame,
    type=st.sampled_from(list(FrameType)),
    offset=st.integers(0, 2**64 - 1),
    seq=st.integers(0, 2**64 - 1),
    payload=st.binary(max_size=1024),
)


def decode(data: bytes, max_payload: int = 8 * MiB) -> Frame | None:
    async def run() -> Frame | None:
        reader = asyncio.StreamReader()
        reader.feed_data(data)
        reader.feed_eof()
        return await read_frame(reader, max_payload=max_payload)

    return asyncio.run(run())


@settings(max_examples=200, deadline=None)
@given(frames)
def test_frame_round_trip(frame: Frame) -> None:
    data = encode_frame(frame)
    assert len(data) == HEADER_SIZE + len(frame.payload)
    assert data[:HEADER_SIZE] == encode_header(frame)
    assert decode(data) == frame


@settings(max_examples=300, deadline=None)
@given(frames, st.data())
def test_any_single_bit_flip_is_detected(frame: Frame, data: st.DataObject) -> None:
    encoded = bytearray(encode_frame(frame))
    bit = data.draw(st.integers(0, len(encoded) * 8 - 1), label="bit")
    encoded[bit // 8] ^= 1 << (bit % 8)
    with pytest.raises(FrameError):
        decode(bytes(encoded))


def test_payload_bit_flip_is_a_checksum_error_naming_the_frame() -> None:
    frame = Frame(FrameType.EXTENT, offset=4096, seq=7, payload=b"x" * 100)
    encoded = bytearray(encode_frame(frame))
    encoded[HEADER_SIZE + 50] ^= 0x10
    with pytest.raises(ChecksumError) as info:
        decode(bytes(encoded))
    msg = str(info.value)
    assert "EXTENT" in msg and "offset 4096" in msg and "seq 7" in msg
    assert "expected xxh3 0x" in msg and "computed 0x" in msg


def test_clean_eof_truncation_oversize_and_garbage() -> None:
    good = encode_frame(Frame(FrameType.EXTENT, offset=1, seq=2, payload=b"abc"))
    assert decode(b"") is None
    with pytest.raises(FrameError, match="inside a frame header"):
        decode(good[:10])
    with pytest.raises(FrameError, match="inside the payload"):
        decode(good[:-1])
    with pytest.raises(FrameError, match="above the 2-byte limit"):
        decode(good, max_payload=2)
    with pytest.raises(FrameError, match="bad frame magic"):
        decode(b"HTTP" + good[4:])
    assert good.startswith(MAGIC)


async def test_back_to_back_frames_then_eof() -> None:
    sent = [Frame(FrameType.EXTENT, offset=i * 10, seq=i, payload=bytes([i]) * i) for i in range(5)]
    reader = asyncio.StreamReader()
    reader.feed_data(b"".join(encode_frame(f) for f in sent))
    reader.feed_eof()
    got = [await read_frame(reader) for _ in sent]
    assert got == sent
    assert await read_frame(reader) is None


def test_encode_rejects_out_of_range_fields() -> None:
    with pytest.raises(ValueError, match="offset -1"):
        encode_header(Frame(FrameType.EXTENT, offset=-1))
    with pytest.raises(ValueError, match="seq"):
        encode_header(Frame(FrameType.ROUND_END, seq=2**64))


def test_final_payload_codec() -> None:
    assert decode_final_payload(encode_final_payload(b"state", b"guest")) == (b"state", b"guest")
    assert decode_final_payload(encode_final_payload(b"", b"")) == (b"", b"")
    with pytest.raises(ValueError, match="declares a 100-byte state blob"):
        decode_final_payload((100).to_bytes(4, "big") + b"short")


# -- token bucket (deterministic: fake clock, fake sleep) --------------------------------------


class FakeTime:
    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        assert seconds > 0
        self.sleeps.append(seconds)
        self.now += seconds


async def test_bucket_holds_average_rate() -> None:
    t = FakeTime()
    bucket = TokenBucket(1000, burst_bytes=100, clock=t.clock, sleep=t.sleep)
    await bucket.acquire(100)  # the initial burst is free
    assert t.sleeps == []
    start = t.now
    for _ in range(10):
        await bucket.acquire(500)
    # 5000 bytes at 1000 B/s: exactly 5 s, no more, no less.
    assert t.now - start == pytest.approx(5.0, abs=1e-6)
    assert max(t.sleeps) <= MAX_SLEEP_SLICE_S + 1e-9


async def test_bucket_credit_is_capped_at_burst() -> None:
    t = FakeTime()
    bucket = TokenBucket(1000, burst_bytes=200, clock=t.clock, sleep=t.sleep)
    t.now += 3600  # idle for an hour: credit must not exceed the burst
    start = t.now
    await bucket.acquire(1200)
    assert t.now - start == pytest.approx(1.0, abs=1e-6)


async def test_bucket_default_burst_and_rate_changes() -> None:
    t = FakeTime()
    bucket = TokenBucket(10_000, clock=t.clock, sleep=t.sleep)
    assert bucket.burst == 1000 and bucket.rate == 10_000

    # Dropping to unlimited while a waiter pays a long debt releases it at the next slice.
    slow = TokenBucket(100, burst_bytes=1, clock=t.clock, sleep=t.sleep)
    calls = 0

    async def sleep_then_unlimit(seconds: float) -> None:
        nonlocal calls
        calls += 1
        await t.sleep(seconds)
        if calls == 3:
            slow.set_rate(None)

    slow._sleep = sleep_then_unlimit
    start = t.now
    await slow.acquire(1_000_000)  # would be ~10000 s at 100 B/s
    assert calls == 3 and t.now - start == pytest.approx(3 * MAX_SLEEP_SLICE_S)
    assert slow.rate is None

    before = len(t.sleeps)
    await bucket.acquire(0)
    unlimited = TokenBucket(None, clock=t.clock, sleep=t.sleep)
    await unlimited.acquire(10**12)
    assert len(t.sleeps) == before

    # A cancelled acquire refunds its tokens: the next caller is not charged for unsent bytes.
    refund = TokenBucket(1000, burst_bytes=100, clock=t.clock, sleep=t.sleep)
    waiter = asyncio.create_task(refund.acquire(100_000))
    gate = asyncio.Event()

    async def parked_sleep(seconds: float) -> None:
        gate.set()
        await asyncio.Event().wait()

    refund._sleep = parked_sleep
    await asyncio.wait_for(gate.wait(), DEADLINE_S)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    refund._sleep = t.sleep
    start = t.now
    await refund.acquire(100)
    assert t.now == start

    with pytest.raises(ValueError, match="-5"):
        TokenBucket(-5)
    with pytest.raises(ValueError, match="negative"):
        await bucket.acquire(-1)


# -- sender <-> receiver over real sockets ---------------------------------------------------


async def test_32mib_arrives_byte_identical_with_rounds_and_final(
    receiver: DataReceiver, tmp_path: Path, sinks: list[FileSink]
) -> None:
    src = tmp_path / "src.img"
    size = 32 * MiB
    src.write_bytes(os.urandom(size))
    sink = new_sink(sinks, tmp_path)
    receiver.register("job-1", "tok-1", sink)

    # Irregular extents in shuffled order: exercises chunk splitting and out-of-order offsets.
    rng = random.Random(7)
    cuts = sorted(rng.sample(range(1, size), 40))
    bounds = [0, *cuts, size]
    extents = [(a, b - a) for a, b in itertools.pairwise(bounds)]
    rng.shuffle(extents)
    half = len(extents) // 2

    fd, read = await file_reader(src)
    progress: list[int] = []
    try:
        sender = await DataSender.connect(receiver.address, "job-1", "tok-1")
        async with sender:
            n1 = await stream_extents(sender, read, extents[:half], progress=progress.append)
            ack0 = await asyncio.wait_for(sender.end_round(0), DEADLINE_S)
            n2 = await stream_extents(sender, read, extents[half:], chunk_bytes=512 * 1024)
            ack1 = await asyncio.wait_for(sender.end_round(1), DEADLINE_S)
            final = await asyncio.wait_for(sender.send_final(b"\x00state\xff", b"guest" * 1000), DEADLINE_S)
            assert sender.bytes_sent == size
    finally:
        os.close(fd)

    assert n1 + n2 == size
    assert progress == sorted(progress) and progress[-1] == n1
    assert ack0["ok"] and ack0["round"] == 0 and ack0["bytes_received"] == n1
    assert ack1["round"] == 1 and ack1["bytes_received"] == size
    assert final["ok"] is True
    assert sink.rounds == [0, 1]
    assert sink.final == (b"\x00state\xff", b"guest" * 1000)
    assert sha256_file(sink.path) == sha256_file(src)
    stats = receiver.session_stats("job-1")
    assert stats.done and stats.last_error is None
    assert stats.bytes_received == size and stats.rounds == 2


async def test_a_failed_write_behind_is_reported_with_its_offset_and_later_frames_are_dropped(
    receiver: DataReceiver, tmp_path: Path, sinks: list[FileSink]
) -> None:
    """Large extents are written while the next frame arrives; a write that fails is still the
    reason the source hears (with the disk-full cause), and nothing after it is applied."""
    sink = new_sink(sinks, tmp_path)
    sink.full_at = 2 * MiB
    receiver.register("job-w", "t", sink)
    sender = await DataSender.connect(receiver.address, "job-w", "t")

    def read_into(offset: int, buffer: memoryview) -> None:
        buffer[:] = bytes([offset // MiB]) * len(buffer)

    async with sender:
        with pytest.raises(DataPlaneError, match=r"failed to write extent at offset 2097152") as info:
            await asyncio.wait_for(sender.send_ranges(read_into, [(0, 8 * MiB)], chunk_bytes=MiB), DEADLINE_S)
            await asyncio.wait_for(sender.end_round(0), DEADLINE_S)
    assert info.value.cause == CAUSE_NO_SPACE
    stats = await asyncio.wait_for(receiver.wait_session_end("job-w"), DEADLINE_S)
    assert stats.bytes_received == 2 * MiB
    assert sink.extents == [(0, MiB), (MiB, MiB)]


async def test_extents_are_applied_in_send_order(receiver: DataReceiver, tmp_path: Path, sinks: list[FileSink]) -> None:
    # Overlapping writes: only in-order application gives the last value at offset 0.
    sink = new_sink(sinks, tmp_path)
    receiver.register("job-o", "t", sink)
    sender = await DataSender.connect(receiver.address, "job-o", "t")
    async with sender:
        for i in range(50):
            await sender.send_extent(0, bytes([i]) * 4096)
        await asyncio.wait_for(sender.end_round(5), DEADLINE_S)
    assert sink.path.read_bytes() == bytes([49]) * 4096
    assert [off for off, _ in sink.extents] == [0] * 50


async def test_apply_final_error_reaches_the_source(
    receiver: DataReceiver, tmp_path: Path, sinks: list[FileSink]
) -> None:
    sink = new_sink(sinks, tmp_path, final_error="controller state version 9 is not supported (max 1)")
    receiver.register("job-f", "t", sink)
    sender = await DataSender.connect(receiver.address, "job-f", "t")
    async with sender:
        await sender.send_extent(0, b"a" * 1000)
        with pytest.raises(DataPlaneError) as info:
            await asyncio.wait_for(sender.send_final(b"s", b"g"), DEADLINE_S)
        # And the sender stays failed afterwards instead of pretending all is well.
        with pytest.raises(DataPlaneError):
            await sender.send_extent(0, b"b")
    assert info.value.reason == "controller state version 9 is not supported (max 1)"
    assert "job-f" in str(info.value)
    stats = receiver.session_stats("job-f")
    assert not stats.done and stats.last_error == "controller state version 9 is not supported (max 1)"


@pytest.mark.parametrize(("faults", "refusal", "landed"), [
    (FrameFaults(corrupt_frame=3),
     "data-plane frame corrupt: checksum mismatch in EXTENT frame at offset 2097152 seq 3", 2),
    # The same bytes again: the checksum holds, the seq gives it away.
    (FrameFaults(replay_frame=3), "data-plane frame seq 3 replayed or out of order (expected 4)", 3),
], ids=["corrupted", "replayed"])
@pytest.mark.parametrize("how", ["send_extent", "send_ranges"])
async def test_a_corrupted_or_replayed_frame_is_detected_and_stops_writes(
    receiver: DataReceiver, tmp_path: Path, sinks: list[FileSink], faults: FrameFaults, refusal: str, landed: int,
    how: str
) -> None:
    sink = new_sink(sinks, tmp_path)
    receiver.register("job-c", "tok-c", sink)
    sender = await DataSender.connect(receiver.address, "job-c", "tok-c")
    sender.faults = faults

    def read_into(offset: int, buffer: memoryview) -> None:
        buffer[:] = bytes([offset // MiB + 1]) * len(buffer)

    async def push() -> None:
        if how == "send_ranges":  # four frames to a batch: the bad one is inside a batch
            await sender.send_ranges(read_into, [(i * MiB, MiB) for i in range(16)], chunk_bytes=4 * MiB)
        else:
            for i in range(16):
                await sender.send_extent(i * MiB, bytes([i + 1]) * MiB)
        await sender.end_round(0)

    async with sender:
        with pytest.raises(DataPlaneError) as info:
            await asyncio.wait_for(push(), DEADLINE_S)
    assert refusal in str(info.value)
    stats = await asyncio.wait_for(receiver.wait_session_end("job-c"), DEADLINE_S)
    assert stats.last_error == info.value.reason and not stats.done
    assert stats.bytes_received == landed * MiB
    # The frames before the bad one landed, once each; nothing of it or after it did.
    assert sink.extents == [(i * MiB, MiB) for i in range(landed)]
    assert sink.path.read_bytes() == b"".join(bytes([i + 1]) * MiB for i in range(landed))

    # The job is dead on the destination: a new connection with the same token is refused.
    with pytest.raises(DataPlaneError, match="already used"):
        await DataSender.connect(receiver.address, "job-c", "tok-c")
    assert os.fstat(sink.fd).st_size == landed * MiB


async def refusal_after(receiver: DataReceiver, job: str, frames: list[Frame]) -> str:
    """Streams `frames` by hand after a good HELLO; returns the receiver's refusal."""
    host, port = receiver.address.rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        await hello_and_ack(reader, writer, job, "tok")
        writer.write(b"".join(encode_frame(f) for f in frames))
        await writer.drain()
        while True:
            ack = await asyncio.wait_for(read_frame(reader), DEADLINE_S)
            assert ack is not None, "the receiver hung up without refusing"
            body = json.loads(ack.payload)
            if not body["ok"]:
                return str(body["error"])
    finally:
        writer.close()


def extent(seq: int, fill: bytes) -> Frame:
    return Frame(FrameType.EXTENT, offset=0, seq=seq, payload=fill * 4096)


@pytest.mark.parametrize(("frames", "refusal", "left"), [
    # An older extent for an offset sent again after a newer one would roll its data back.
    ([extent(1, b"A"), extent(2, b"B"), extent(1, b"A")],
     "data-plane frame seq 1 replayed or out of order (expected 3)", b"B"),
    ([extent(1, b"A"), extent(3, b"C")],
     "data-plane frame seq 3 out of order: 1 frame(s) before it never arrived (expected 2)", b"A"),
    ([extent(2, b"B")], "data-plane frame seq 2 out of order: 1 frame(s) before it never arrived (expected 1)", b""),
    # Numbering runs over the whole connection: a round does not restart it.
    ([extent(1, b"A"), Frame(FrameType.ROUND_END, seq=0), extent(1, b"B")],
     "data-plane frame seq 1 replayed or out of order (expected 2)", b"A"),
], ids=["older-frame-replayed", "frame-skipped", "first-frame-missing", "replayed-across-a-round"])
async def test_an_extent_out_of_sequence_is_refused_before_it_is_written(
    receiver: DataReceiver, tmp_path: Path, sinks: list[FileSink], frames: list[Frame], refusal: str, left: bytes
) -> None:
    sink = new_sink(sinks, tmp_path)
    receiver.register("job-seq", "tok", sink)
    error = await refusal_after(receiver, "job-seq", frames)
    assert refusal in error and "was not written" in error, error
    stats = await asyncio.wait_for(receiver.wait_session_end("job-seq"), DEADLINE_S)
    assert stats.last_error == error and not stats.done
    assert sink.path.read_bytes() == left * 4096
    assert stats.bytes_received == len(sink.extents) * 4096


@pytest.mark.parametrize("rounds", [[0, 0], [3, 2]], ids=["round-replayed", "round-reordered"])
async def test_a_round_end_out_of_order_is_refused(
    receiver: DataReceiver, tmp_path: Path, sinks: list[FileSink], rounds: list[int]
) -> None:
    sink = new_sink(sinks, tmp_path)
    receiver.register("job-rnd", "tok", sink)
    error = await refusal_after(receiver, "job-rnd", [Frame(FrameType.ROUND_END, seq=r) for r in rounds])
    first, second = rounds
    assert f"ROUND_END for round {second} replayed or out of order (round {first} already ended" in error, error
    assert sink.rounds == [first]


async def test_wrong_token_unknown_job_and_replay_are_refused(
    receiver: DataReceiver, tmp_path: Path, sinks: list[FileSink]
) -> None:
    sink = new_sink(sinks, tmp_path)
    receiver.register("job-a", "right", sink)

    with pytest.raises(DataPlaneError, match="wrong data-plane token for job 'job-a'") as info:
        await DataSender.connect(receiver.address, "job-a", "wrong")
    assert "right" not in str(info.value)  # the real token never leaks into errors
    with pytest.raises(DataPlaneError, match="'job-zz' is not registered"):
        await DataSender.connect(receiver.address, "job-zz", "right")

    first = await DataSender.connect(receiver.address, "job-a", "right")
    async with first:
        with pytest.raises(DataPlaneError, match="already used"):
            await DataSender.connect(receiver.address, "job-a", "right")
        # The refused replay did not disturb the real session.
        await first.send_extent(0, b"ok" * 100)
        await asyncio.wait_for(first.end_round(0), DEADLINE_S)
    # Still refused after the first session ended.
    with pytest.raises(DataPlaneError, match="already used"):
        await DataSender.connect(receiver.address, "job-a", "right")
    assert sink.written == 200

    # Re-registering requires an explicit unregister; then a new token works.
    with pytest.raises(ValueError, match="unregister"):
        receiver.register("job-a", "again", sink)
    receiver.unregister("job-a")
    receiver.register("job-a", "fresh", sink)
    second = await DataSender.connect(receiver.address, "job-a", "fresh")
    await second.close()


async def test_bandwidth_limit_on_a_real_socket(receiver: DataReceiver, tmp_path: Path, sinks: list[FileSink]) -> None:
    sink = new_sink(sinks, tmp_path)
    receiver.register("job-bw", "t", sink)
    rate = 4 * MiB
    total = 3 * MiB
    sender = await DataSender.connect(receiver.address, "job-bw", "t", bandwidth_bytes_per_s=rate)
    async with sender:
        chunk = os.urandom(256 * 1024)
        start = time.monotonic()
        for i in range(total // len(chunk)):
            await sender.send_extent(i * len(chunk), chunk)
        await asyncio.wait_for(sender.end_round(0), DEADLINE_S)
        elapsed = time.monotonic() - start
    # Lower bound only (robust on slow machines): at least ~80% of bytes/rate.
    assert elapsed >= 0.8 * total / rate, f"{total} bytes at {rate} B/s took only {elapsed:.3f}s"
    assert sink.written == total


async def test_receiver_close_mid_stream_fails_sender_promptly(
    receiver: DataReceiver, tmp_path: Path, sinks: list[FileSink]
) -> None:
    sink = new_sink(sinks, tmp_path, notify_at=4 * MiB)
    receiver.register("job-x", "t", sink)
    sender = await DataSender.connect(receiver.address, "job-x", "t")
    chunk = os.urandom(MiB)

    async def stream_forever() -> None:
        i = 0
        while True:
            await sender.send_extent((i % 8) * MiB, chunk)
            i += 1

    task = asyncio.create_task(stream_forever())
    try:
        await asyncio.wait_for(sink.reached.wait(), DEADLINE_S)
        await asyncio.wait_for(receiver.close(), DEADLINE_S)
        with pytest.raises(DataPlaneError):
            await asyncio.wait_for(task, DEADLINE_S)
        with pytest.raises(DataPlaneError):
            await asyncio.wait_for(sender.end_round(0), DEADLINE_S)
    finally:
        task.cancel()
        await sender.close()
    assert sender.error is not None


async def test_unregister_mid_stream_cuts_the_session(
    receiver: DataReceiver, tmp_path: Path, sinks: list[FileSink]
) -> None:
    sink = new_sink(sinks, tmp_path, notify_at=2 * MiB)
    receiver.register("job-u", "t", sink)
    sender = await DataSender.connect(receiver.address, "job-u", "t")

    async def stream_forever() -> None:
        while True:
            await sender.send_extent(0, b"u" * MiB)

    task = asyncio.create_task(stream_forever())
    try:
        await asyncio.wait_for(sink.reached.wait(), DEADLINE_S)
        receiver.unregister("job-u")
        with pytest.raises(DataPlaneError):
            await asyncio.wait_for(task, DEADLINE_S)
    finally:
        task.cancel()
        await sender.close()
    with pytest.raises(KeyError, match="job-u"):
        receiver.session_stats("job-u")


async def test_stuck_destination_times_out_instead_of_hanging(
    receiver: DataReceiver, tmp_path: Path, sinks: list[FileSink]
) -> None:
    sink = new_sink(sinks, tmp_path)
    sink.block = asyncio.Event()  # the sink never finishes a write
    receiver.register("job-s", "t", sink)
    sender = await DataSender.connect(receiver.address, "job-s", "t")
    async with sender:
        await sender.send_extent(0, b"z" * 4096)
        with pytest.raises(DataPlaneError, match=r"no ACK for round 3 within 0\.3s"):
            await asyncio.wait_for(sender.end_round(3, timeout_s=0.3), DEADLINE_S)
        with pytest.raises(DataPlaneError, match="no ACK"):
            await sender.send_extent(0, b"again")
    sink.block.set()


async def test_receiver_idle_timeout_fails_session(tmp_path: Path, sinks: list[FileSink]) -> None:
    r = DataReceiver("127.0.0.1", idle_timeout_s=0.2)
    await r.start()
    try:
        r.register("job-i", "t", new_sink(sinks, tmp_path))
        sender = await DataSender.connect(r.address, "job-i", "t")
        async with sender:
            # The receiver gives up on a silent source and tells it why; the sender finds the
            # reason at its next call.
            await asyncio.wait_for(r.wait_session_end("job-i"), DEADLINE_S)
            with pytest.raises(DataPlaneError, match="no frame from the source"):
                await sender.send_extent(0, b"late")
        assert "no frame from the source" in (r.session_stats("job-i").last_error or "")
    finally:
        await r.close()


async def test_abort_ends_the_session_with_reason(
    receiver: DataReceiver, tmp_path: Path, sinks: list[FileSink]
) -> None:
    sink = new_sink(sinks, tmp_path)
    receiver.register("job-ab", "t", sink)
    sender = await DataSender.connect(receiver.address, "job-ab", "t")
    await sender.send_extent(0, b"q" * 10)
    await sender.abort("operator cancelled")

    stats = await asyncio.wait_for(receiver.wait_session_end("job-ab"), DEADLINE_S)
    assert not stats.connected and not stats.done
    assert stats.last_error == "source aborted the transfer: operator cancelled"
    with pytest.raises(DataPlaneError, match="aborted by the source: operator cancelled"):
        await sender.send_extent(0, b"x")


async def test_connect_errors_are_prompt_and_readable(tmp_path: Path) -> None:
    r = DataReceiver("127.0.0.1")
    await r.start()
    address = r.address
    await r.close()  # nothing listens there any more
    with pytest.raises(DataPlaneError, match="cannot connect"):
        await asyncio.wait_for(DataSender.connect(address, "j", "t", connect_timeout_s=2), DEADLINE_S)
    with pytest.raises(ValueError, match="not 'host:port'"):
        await DataSender.connect("no-port-here", "j", "t")


async def test_stream_extents_short_read_and_read_errors(
    receiver: DataReceiver, tmp_path: Path, sinks: list[FileSink]
) -> None:
    receiver.register("job-r", "t", new_sink(sinks, tmp_path))
    sender = await DataSender.connect(receiver.address, "job-r", "t")
    reads: list[tuple[int, int]] = []
    read_tasks: list[asyncio.Task[object]] = []

    async def short_read(offset: int, length: int) -> bytes:
        reads.append((offset, length))
        task = asyncio.current_task()
        assert task is not None
        read_tasks.append(task)
        return b"x" * (length if offset == 0 else length - 1)

    async with sender:
        with pytest.raises(DataPlaneError, match=r"read\(100, 100\) returned 99 bytes"):
            await stream_extents(sender, short_read, [(0, 250)], chunk_bytes=100)
        assert reads[:2] == [(0, 100), (100, 100)]
        assert sender.bytes_sent == 100

        async def broken_read(offset: int, length: int) -> bytes:
            raise OSError(5, f"I/O error reading offset {offset}")

        with pytest.raises(OSError, match="offset 0"):
            await stream_extents(sender, broken_read, [(0, 10)])
        with pytest.raises(ValueError, match="negative"):
            await stream_extents(sender, short_read, [(-1, 10)])
    # Pipeline depth 2: the failing piece was already read ahead, the third never started.
    assert len(read_tasks) == 2 and all(t.done() for t in read_tasks)


async def test_stream_extents_cancels_its_read_ahead(
    receiver: DataReceiver, tmp_path: Path, sinks: list[FileSink]
) -> None:
    sink = new_sink(sinks, tmp_path)
    receiver.register("job-p", "t", sink)
    # 50 B/s: sending the first 1000-byte piece waits in the rate limiter for ~20 s, so the
    # cancellation below lands while the read-ahead of the second piece is still pending.
    sender = await DataSender.connect(receiver.address, "job-p", "t", bandwidth_bytes_per_s=50)
    second_read_started = asyncio.Event()
    blocked: list[asyncio.Task[object]] = []

    async def read(offset: int, length: int) -> bytes:
        if offset == 0:
            return b"a" * length
        task = asyncio.current_task()
        assert task is not None
        blocked.append(task)
        second_read_started.set()
        await asyncio.Event().wait()  # a backend read that never completes
        raise AssertionError("unreachable")

    async with sender:
        streaming = asyncio.create_task(stream_extents(sender, read, [(0, 2000)], chunk_bytes=1000))
        await asyncio.wait_for(second_read_started.wait(), DEADLINE_S)
        streaming.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(streaming, DEADLINE_S)
        assert len(blocked) == 1 and blocked[0].cancelled()
        sender.set_bandwidth(None)
        await sender.send_extent(0, b"b" * 10)
        await asyncio.wait_for(sender.end_round(0), DEADLINE_S)
    assert sink.extents == [(0, 10)]


async def test_a_peer_holding_too_many_connections_is_cut_before_it_sends_a_byte(receiver: DataReceiver) -> None:
    from agent.dataplane.receiver import MAX_CONNECTIONS_PER_PEER
    host, port = receiver.address.rsplit(":", 1)
    held = [await asyncio.open_connection(host, int(port)) for _ in range(MAX_CONNECTIONS_PER_PEER)]
    try:
        # every held connection is served: a bad HELLO gets the receiver's refusal
        reader, writer = held[-1]
        writer.write(encode_frame(Frame(FrameType.ROUND_END, seq=1)))
        await writer.drain()
        assert b"expected HELLO" in await asyncio.wait_for(reader.read(4096), 10)
        # one more is cut at once (not after the 10 s a silent peer gets to send its HELLO)
        extra_reader, extra_writer = await asyncio.open_connection(host, int(port))
        try:
            got = await asyncio.wait_for(extra_reader.read(4096), 5)
        except ConnectionResetError:
            got = b""
        assert got == b""
        extra_writer.close()
    finally:
        for _, writer in held:
            writer.close()


# -- the receiver's zero-copy reader over real sockets ---------------------------------------


async def hello_and_ack(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, job: str, token: str) -> None:
    writer.write(encode_frame(Frame(FrameType.HELLO, payload=json.dumps({"job_id": job, "token": token}).encode())))
    await writer.drain()
    ack = await asyncio.wait_for(read_frame(reader), DEADLINE_S)
    assert ack is not None and json.loads(ack.payload)["ok"], ack


async def test_frames_cut_at_every_size_arrive_whole(receiver: DataReceiver, tmp_path: Path,
                                                     sinks: list[FileSink]) -> None:
    """A session sent in pieces of random sizes (1 byte to 300 KiB, so a header lands split, with
    the next payload, or alone): the receiver's reader stages some and receives others straight into
    the payload, and every byte lands where it belongs."""
    sink = new_sink(sinks, tmp_path)
    receiver.register("job-cut", "tok", sink)
    rng = random.Random(11)
    data = os.urandom(3 * MiB + 123)
    extents = [(0, 100), (100, 5), (105, MiB), (105 + MiB, 2 * MiB + 18)]
    wire = b"".join(encode_frame(Frame(FrameType.EXTENT, offset=o, seq=i + 1, payload=data[o:o + n]))
                    for i, (o, n) in enumerate(extents))
    wire += encode_frame(Frame(FrameType.ROUND_END, seq=0))
    host, port = receiver.address.rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        await hello_and_ack(reader, writer, "job-cut", "tok")
        at = 0
        while at < len(wire):
            n = rng.choice([1, 7, HEADER_SIZE - 1, HEADER_SIZE + 3, 4096, 65_537, 300_000])
            writer.write(wire[at:at + n])
            await writer.drain()
            at += n
            if rng.random() < 0.1:
                await asyncio.sleep(0.001)  # let the receiver catch up: the next piece finds it waiting
        ack = await asyncio.wait_for(read_frame(reader), DEADLINE_S)
    finally:
        writer.close()
    assert ack is not None and json.loads(ack.payload)["bytes_received"] == len(data)
    assert sink.path.read_bytes() == data


async def test_a_version_1_frame_is_refused_naming_both_versions(receiver: DataReceiver) -> None:
    host, port = receiver.address.rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        v2 = bytearray(encode_frame(Frame(FrameType.HELLO, payload=b"{}")))
        v2[4] = 1  # what an agent of the CRC-32 frame version sends
        writer.write(bytes(v2))
        await writer.drain()
        ack = await asyncio.wait_for(read_frame(reader), DEADLINE_S)
    finally:
        writer.close()
    assert ack is not None
    error = json.loads(ack.payload)["error"]
    assert f"unsupported frame version 1 (this agent speaks {VERSION})" in error


async def test_a_connection_closed_inside_a_payload_fails_the_session(receiver: DataReceiver, tmp_path: Path,
                                                                      sinks: list[FileSink]) -> None:
    sink = new_sink(sinks, tmp_path)
    receiver.register("job-eof", "tok", sink)
    host, port = receiver.address.rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    await hello_and_ack(reader, writer, "job-eof", "tok")
    frame = encode_frame(Frame(FrameType.EXTENT, offset=0, seq=1, payload=os.urandom(MiB)))
    writer.write(frame[: len(frame) // 2])
    await writer.drain()
    writer.close()
    stats = await asyncio.wait_for(receiver.wait_session_end("job-eof"), DEADLINE_S)
    assert stats.last_error is not None and "inside the payload" in stats.last_error, stats
    assert stats.bytes_received == 0 and sink.written == 0


# -- the sender's worker thread: send_ranges, TLS, cancellation -------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("pki")
    certs.init_cluster(directory, ["src=127.0.0.1", "dst=127.0.0.1"], [], [], [])
    return directory


def tls_of(pki: Path, node: str) -> TlsFiles:
    stem = pki / f"agent-{node}"
    return TlsFiles((pki / "ca.pem").read_bytes(), stem.with_suffix(".pem").read_bytes(),
                    stem.with_suffix(".key").read_bytes(), cert_file=stem.with_suffix(".pem"),
                    key_file=stem.with_suffix(".key"))


@contextlib.asynccontextmanager
async def receiver_over(pki: Path, tls: bool, **kw: Any) -> AsyncIterator[DataReceiver]:
    r = DataReceiver("127.0.0.1", ssl=tls_of(pki, "dst").ssl_context(server=True) if tls else None, **kw)
    await r.start()
    try:
        yield r
    finally:
        await r.close()


async def connect_to(r: DataReceiver, pki: Path, tls: bool, job: str, **kw: Any) -> DataSender:
    context = tls_of(pki, "src").ssl_context(server=False) if tls else None
    return await DataSender.connect(r.address, job, "t", ssl=context, server_hostname="dst" if tls else None, **kw)


class FileRanges:
    """A source file read the way a backend's read_raw_into reads, recording the threads it ran on."""

    def __init__(self, path: Path) -> None:
        self.fd = os.open(path, os.O_RDONLY)
        self.threads: set[int] = set()
        self.calls = 0

    def read_into(self, offset: int, buffer: memoryview) -> None:
        self.threads.add(threading.get_ident())
        self.calls += 1
        assert os.preadv(self.fd, [buffer], offset) == len(buffer)

    def close(self) -> None:
        os.close(self.fd)


@pytest.mark.parametrize("tls", [False, True], ids=["plaintext", "tls"])
async def test_send_ranges_arrive_byte_identical_read_and_sent_off_the_event_loop(
    pki: Path, tmp_path: Path, sinks: list[FileSink], tls: bool
) -> None:
    size = 24 * MiB
    src = tmp_path / "src.img"
    src.write_bytes(os.urandom(size))
    sink = new_sink(sinks, tmp_path)
    # Large runs (split into chunks) and hundreds of scattered 4 KiB blocks (batched many to a
    # send), in shuffled order.
    rng = random.Random(11)
    blocks = sorted(rng.sample(range(size // 4096 // 2, size // 4096), 700))
    extents = [(0, size // 2 - 5 * 4096), *((b * 4096, 4096) for b in blocks)]
    expected = sum(length for _, length in extents)
    source = FileRanges(src)
    progress: list[int] = []
    try:
        async with receiver_over(pki, tls) as r:
            r.register("job-r", "t", sink, source_node="src" if tls else "")
            async with await connect_to(r, pki, tls, "job-r") as sender:
                sent = await asyncio.wait_for(sender.send_ranges(source.read_into, extents, chunk_bytes=MiB,
                                                                 progress=progress.append), DEADLINE_S)
                ack = await asyncio.wait_for(sender.end_round(0), DEADLINE_S)
                assert sent == expected == sender.bytes_sent == ack["bytes_received"]
                await asyncio.wait_for(sender.send_final(b"state", b"guest"), DEADLINE_S)
    finally:
        source.close()
    assert progress == sorted(progress) and progress[-1] == expected
    assert threading.get_ident() not in source.threads  # the event loop's thread never read
    got = sink.path.read_bytes()
    original = src.read_bytes()
    for offset, length in extents:
        assert got[offset:offset + length] == original[offset:offset + length], f"extent at {offset}"
    assert sink.final == (b"state", b"guest")


async def test_send_ranges_cancelled_between_frames_leaves_a_whole_stream(
    receiver: DataReceiver, tmp_path: Path, sinks: list[FileSink]
) -> None:
    """A cancel while the thread reads the next batch: it stops before sending it, every byte
    sent is counted once, and the connection carries on."""
    sink = new_sink(sinks, tmp_path)
    receiver.register("job-b", "t", sink)
    second_read = threading.Event()
    release = threading.Event()

    def read_into(offset: int, buffer: memoryview) -> None:
        if offset >= MiB:
            second_read.set()
            release.wait(DEADLINE_S)
        buffer[:] = bytes([1 + offset // MiB]) * len(buffer)

    async with await DataSender.connect(receiver.address, "job-b", "t") as sender:
        task = asyncio.create_task(sender.send_ranges(read_into, [(0, 3 * MiB)], chunk_bytes=MiB))
        assert await asyncio.to_thread(second_read.wait, DEADLINE_S)
        task.cancel()
        await wait_until(lambda: sender._wire.stop.is_set())
        release.set()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, DEADLINE_S)
        assert sender.error is None and sender.bytes_sent == MiB
        await sender.send_extent(5 * MiB, b"after")
        ack = await asyncio.wait_for(sender.end_round(0), DEADLINE_S)
    assert ack["bytes_received"] == MiB + 5
    assert sink.extents == [(0, MiB), (5 * MiB, 5)]


@pytest.mark.parametrize("tls", [False, True], ids=["plaintext", "tls"])
async def test_a_cancel_stops_a_send_blocked_on_a_full_socket_promptly(
    pki: Path, tmp_path: Path, sinks: list[FileSink], tls: bool
) -> None:
    """The receiver stops reading; the thread blocks inside a frame. A cancel ends the call within
    a second or so (not the 60 s stall timeout), the thread stops, the connection is cut."""
    sink = new_sink(sinks, tmp_path)
    block = sink.block = asyncio.Event()
    async with receiver_over(pki, tls) as r:
        r.register("job-k", "t", sink, source_node="src" if tls else "")
        sender = await connect_to(r, pki, tls, "job-k", stall_timeout_s=60)
        try:
            def read_into(offset: int, buffer: memoryview) -> None:
                buffer[:] = b"k" * len(buffer)

            task = asyncio.create_task(sender.send_ranges(read_into, [(0, 256 * MiB)]))
            # Blocked: the kernel's buffers on both sides are full, the sender no longer advances.
            await wait_until(lambda: sink.extents == [] and sender.bytes_sent > 0 and not block.is_set()
                             and stalled(sender))
            started = time.monotonic()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await asyncio.wait_for(task, DEADLINE_S)
            assert time.monotonic() - started < 3.0
            assert not sender._inflight  # the thread's job is over
            assert sender.error is not None and "cut" in sender.error
            with pytest.raises(DataPlaneError, match="cut"):
                await sender.send_extent(0, b"x")
        finally:
            await sender.close()
            block.set()
    await wait_until(lambda: not any(t.name.startswith("dataplane-send-job-k") for t in threading.enumerate()))


_last_sent: dict[int, tuple[int, float]] = {}


def stalled(sender: DataSender, quiet_s: float = 0.5) -> bool:
    """The sender's count has not moved for ``quiet_s``."""
    now = time.monotonic()
    count, since = _last_sent.get(id(sender), (-1, now))
    if count != sender.bytes_sent:
        _last_sent[id(sender)] = (sender.bytes_sent, now)
        return False
    return now - since >= quiet_s


async def wait_until(condition: Callable[[], bool], deadline_s: float = DEADLINE_S) -> None:
    deadline = time.monotonic() + deadline_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


async def test_a_cancel_while_waiting_for_an_ack_retires_the_sender_but_keeps_the_connection_for_abort(
    receiver: DataReceiver, tmp_path: Path, sinks: list[FileSink]
) -> None:
    sink = new_sink(sinks, tmp_path)
    block = sink.block = asyncio.Event()  # the destination never gets to the round's ACK
    receiver.register("job-q", "t", sink)
    sender = await DataSender.connect(receiver.address, "job-q", "t")
    try:
        await sender.send_extent(0, b"q" * 4096)
        task = asyncio.create_task(sender.end_round(0))
        # The EXTENT is in (the sink holds it) and ROUND_END is with the sender's thread.
        await wait_until(lambda: receiver.session_stats("job-q").frames >= 2 and bool(sender._inflight)
                         and not task.done())
        started = time.monotonic()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, DEADLINE_S)
        assert time.monotonic() - started < 3.0
        assert sender.error == "cancelled while waiting for the ACK of round 0"
        assert not sender._wire.cut_reason and not sender._inflight
        with pytest.raises(DataPlaneError, match="cancelled while waiting"):
            await sender.send_extent(0, b"x")
        await asyncio.wait_for(sender.abort("operator cancelled"), DEADLINE_S)
    finally:
        await sender.close()
        block.set()


async def test_send_ranges_keeps_the_bandwidth_cap_and_asks_admit_before_each_batch(
    receiver: DataReceiver, tmp_path: Path, sinks: list[FileSink]
) -> None:
    """The cap and the node's pacer are taken on the event loop before a batch goes to the thread."""
    sink = new_sink(sinks, tmp_path)
    receiver.register("job-cap", "t", sink)
    rate, total = 4 * MiB, 3 * MiB
    admitted: list[int] = []

    async def admit(nbytes: int) -> None:
        admitted.append(nbytes)

    def read_into(offset: int, buffer: memoryview) -> None:
        buffer[:] = b"c" * len(buffer)

    async with await DataSender.connect(receiver.address, "job-cap", "t", bandwidth_bytes_per_s=rate) as sender:
        start = time.monotonic()
        sent = await asyncio.wait_for(sender.send_ranges(read_into, [(0, total)], chunk_bytes=256 * 1024,
                                                         admit=admit), DEADLINE_S)
        await asyncio.wait_for(sender.end_round(0), DEADLINE_S)
        elapsed = time.monotonic() - start
    # Lower bound only (robust on slow machines): at least ~80% of bytes/rate after the burst.
    assert elapsed >= 0.8 * (total - rate // 10) / rate, f"{total} bytes at {rate} B/s took only {elapsed:.3f}s"
    assert sent == total == sink.written
    assert admitted == [256 * 1024] * 12
