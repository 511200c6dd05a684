"""Tests of the emulated NVMe controller and its controller-state container, on real sparse files."""

from __future__ import annotations

import hashlib
import os
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.backend import MigratableController, Snapshot
from agent.emulated.controller import (
    BLOCK_BYTES,
    ControllerGoneError,
    EmulatedController,
    LbaOutOfRangeError,
    NotRunningError,
    StateFormatError,
    WrongStateError,
)
from agent.emulated.model.subsystem import PRIMARY_CNTLID
from agent.namespace_digest import digest_extents
from agent.nvme import cdq, commands
from agent.nvme.commands import Cqe
from agent.nvme.spec import Status
from agent.nvme.state_format import (
    HEADER_BYTES,
    MAGIC,
    STATE_FORMAT_VERSION,
    ControllerRegisters,
    ControllerState,
    QueueState,
    decode_state,
    encode_state,
)
from agent.vfio_states import IllegalTransition, VfioState

MIB = 1 << 20
S = VfioState


def blk(fill: int, count: int = 1) -> bytes:
    return bytes([fill]) * (BLOCK_BYTES * count)


@pytest.fixture
def ctrl(tmp_path: Path) -> Iterator[EmulatedController]:
    c = EmulatedController("c1", tmp_path / "c1.img", 4 * MIB, create=True)
    yield c
    c.close()


# ----- construction -------------------------------------------------------------------------------


def test_new_controller_is_running_and_sparse(ctrl: EmulatedController) -> None:
    assert isinstance(ctrl, MigratableController)
    assert ctrl.vfio_state is S.RUNNING
    assert ctrl.block_count == 1024
    assert ctrl.namespace_path.stat().st_size == 4 * MIB
    assert ctrl.namespace_path.stat().st_blocks == 0
    assert ctrl.data_extents() == []


@pytest.mark.parametrize("size", [0, -4096, 4097, 6000])
def test_bad_namespace_size(tmp_path: Path, size: int) -> None:
    with pytest.raises(ValueError, match=f"namespace_bytes={size} must be a positive multiple of 4096"):
        EmulatedController("c1", tmp_path / "x.img", size, create=True)
    assert not (tmp_path / "x.img").exists()


def test_create_refuses_existing_and_open_checks_size(tmp_path: Path) -> None:
    p = tmp_path / "c.img"
    with EmulatedController("c1", p, MIB, create=True) as c:
        c.write_blocks(5, blk(7))
    with pytest.raises(FileExistsError, match="already exists; pass create=False"):
        EmulatedController("c1", p, MIB, create=True)
    with pytest.raises(ValueError, match=r"is 1048576 bytes but namespace_bytes=2097152"):
        EmulatedController("c1", p, 2 * MIB, create=False)
    with pytest.raises(FileNotFoundError, match="pass create=True"):
        EmulatedController("c1", tmp_path / "missing.img", MIB, create=False)
    with EmulatedController("c1", p, MIB, create=False) as reopened:
        assert reopened.read_blocks(5, 1) == blk(7)


# ----- guest I/O ----------------------------------------------------------------------------------


def test_write_read_and_bounds(ctrl: EmulatedController) -> None:
    ctrl.write_blocks(10, blk(1) + blk(2))
    assert ctrl.read_blocks(10, 2) == blk(1) + blk(2)
    assert ctrl.read_blocks(12, 1) == bytes(BLOCK_BYTES)
    assert ctrl.read_raw(10 * BLOCK_BYTES + 5, 3) == b"\x01\x01\x01"
    ctrl.write_blocks(1023, blk(9))
    with pytest.raises(LbaOutOfRangeError, match=r"lba 1023\.\.1024 is outside the namespace \(lba 0\.\.1023\)"):
        ctrl.write_blocks(1023, blk(9, 2))
    with pytest.raises(LbaOutOfRangeError, match="lba -1"):
        ctrl.read_blocks(-1, 1)
    with pytest.raises(ValueError, match="write of 100 bytes"):
        ctrl.write_blocks(0, b"x" * 100)
    with pytest.raises(ValueError, match="count=0"):
        ctrl.read_blocks(0, 0)
    with pytest.raises(LbaOutOfRangeError, match="offset=4194300 length=8"):
        ctrl.read_raw(4 * MIB - 4, 8)


def test_extents_are_block_aligned_and_merged(ctrl: EmulatedController) -> None:
    ctrl.write_blocks(3, blk(1))
    ctrl.write_blocks(100, blk(1, 2))
    ctrl.write_blocks(102, blk(1))
    assert ctrl.data_extents() == [(3 * BLOCK_BYTES, BLOCK_BYTES), (100 * BLOCK_BYTES, 3 * BLOCK_BYTES)]


def test_dirty_tracking(ctrl: EmulatedController) -> None:
    ctrl.write_blocks(1, blk(1))  # before tracking: not logged
    with pytest.raises(WrongStateError, match="dirty tracking is off"):
        ctrl.take_dirty_lbas()
    assert ctrl.dirty_block_count() == 0
    ctrl.start_dirty_tracking()
    ctrl.write_blocks(9, blk(1, 3))
    ctrl.write_blocks(2, blk(1))
    ctrl.write_blocks(9, blk(2))
    assert ctrl.dirty_block_count() == 4
    assert ctrl.take_dirty_lbas() == [2, 9, 10, 11]
    assert ctrl.take_dirty_lbas() == []
    ctrl.start_dirty_tracking()  # idempotent: keeps what is logged
    ctrl.write_blocks(5, blk(1))
    ctrl.start_dirty_tracking()
    assert ctrl.take_dirty_lbas() == [5]
    ctrl.stop_dirty_tracking()
    ctrl.write_blocks(6, blk(1))
    assert ctrl.dirty_block_count() == 0


def test_suspend_refuses_guest_io_and_resume_allows_it(ctrl: EmulatedController) -> None:
    ctrl.write_blocks(0, blk(3))
    ctrl.set_state(S.STOP)
    with pytest.raises(NotRunningError, match="guest write refused in state STOP"):
        ctrl.write_blocks(0, blk(4))
    with pytest.raises(NotRunningError, match="guest read refused"):
        ctrl.read_blocks(0, 1)
    assert ctrl.read_raw(0, BLOCK_BYTES) == blk(3)  # the migration controller still reads
    with pytest.raises(WrongStateError, match="write_raw needs state RESUMING, but it is STOP"):
        ctrl.write_raw(0, blk(4))
    ctrl.set_state(S.RUNNING)
    ctrl.write_blocks(0, blk(4))
    assert ctrl.read_blocks(0, 1) == blk(4)


def test_pre_copy_tracks_and_stop_copy_suspends(ctrl: EmulatedController) -> None:
    ctrl.set_state(S.PRE_COPY)
    assert ctrl.dirty_tracking
    ctrl.write_blocks(7, blk(1))  # guest I/O continues in PRE_COPY
    ctrl.set_state(S.RUNNING)  # Track Send stop
    assert not ctrl.dirty_tracking
    ctrl.set_state(S.PRE_COPY)  # a fresh log
    assert ctrl.take_dirty_lbas() == []
    ctrl.write_blocks(8, blk(1))
    with pytest.raises(WrongStateError, match="save_state needs state STOP or STOP_COPY"):
        ctrl.save_state()
    ctrl.set_state(S.STOP_COPY)
    with pytest.raises(NotRunningError):
        ctrl.write_blocks(8, blk(2))
    assert ctrl.take_dirty_lbas() == [8]  # the final round still sees the log
    assert decode_state(ctrl.save_state()).controller_id == "c1"
    with pytest.raises(IllegalTransition, match="STOP_COPY to PRE_COPY"):
        ctrl.set_state(S.PRE_COPY)
    with pytest.raises(IllegalTransition, match="RUNNING_P2P"):
        ctrl.set_state(S.RUNNING_P2P)
    ctrl.set_state(S.RUNNING)  # rollback: Resume, tracking off
    assert ctrl.vfio_state is S.RUNNING
    assert not ctrl.dirty_tracking


# ----- the NVMe commands underneath ----------------------------------------------------------------


def _cdq_pointers(ctrl: EmulatedController, cdqid: int = 1) -> tuple[int, int] | int:
    """(head pointer, tail pointer trigger) of the change log, the 8-byte data of Get Features 21h
    on the primary, or the error status."""
    raw, data = ctrl.model.submit_admin(PRIMARY_CNTLID, commands.get_cdq_pointers(cdqid).encode())
    cqe = Cqe.decode(raw)
    return cdq.decode_pointers(data) if cqe.ok else cqe.status


def test_dirty_lbas_come_from_the_change_log(ctrl: EmulatedController) -> None:
    assert _cdq_pointers(ctrl) == Status.INVALID_CONTROLLER_DATA_QUEUE  # no queue before tracking
    ctrl.set_state(S.PRE_COPY)
    for lba in range(100, 110):  # sequential: the controller coalesces them into one entry
        ctrl.write_blocks(lba, blk(1))
    ctrl.write_blocks(7, blk(1))
    ctrl.write_blocks(500, blk(1, 3))
    assert _cdq_pointers(ctrl) == (0, 0)  # three ranges posted, none consumed yet
    assert ctrl.dirty_block_count() == 14
    assert _cdq_pointers(ctrl) == (3, 0)  # the host took them and moved the head past them
    assert ctrl.take_dirty_lbas() == [7, *range(100, 110), 500, 501, 502]
    ctrl.set_state(S.STOP_COPY)  # Suspend: the guest's controller is suspended in the model
    assert ctrl.model.suspended(ctrl.cntlid)
    ctrl.set_state(S.RUNNING)  # Resume, and the change log is deleted
    assert not ctrl.model.suspended(ctrl.cntlid)
    assert _cdq_pointers(ctrl) == Status.INVALID_CONTROLLER_DATA_QUEUE


def test_a_full_change_log_makes_every_block_dirty(ctrl: EmulatedController) -> None:
    ctrl.cdq_entries = 8  # too small to drain early: room for six ranges, then "all LBAs changed"
    ctrl.set_state(S.PRE_COPY)
    for n in range(10):
        ctrl.write_blocks(n * 10, blk(n))
    assert ctrl.dirty_block_count() == ctrl.block_count
    ctrl.write_blocks(5, blk(1))
    assert ctrl.take_dirty_lbas() == list(range(ctrl.block_count))
    ctrl.write_blocks(6, blk(1))  # logging was turned back on when the full queue was seen
    assert ctrl.take_dirty_lbas() == [6]


def test_the_host_drains_the_change_log_before_it_fills(ctrl: EmulatedController) -> None:
    ctrl.cdq_entries = 64  # the guest's write path drains once four entries wait
    ctrl.set_state(S.PRE_COPY)
    written = [n * 37 % 1000 for n in range(300)]  # never adjacent: one entry per write
    for lba in written:
        ctrl.write_blocks(lba, blk(1))
    assert ctrl.take_dirty_lbas() == sorted(written)  # exact: the 64-entry queue never overflowed


def test_state_moves_in_pieces(tmp_path: Path) -> None:
    src = EmulatedController("c" * 200, tmp_path / "src.img", MIB, create=True)
    src.state_piece_bytes = 64
    for n in range(9):
        src.write_blocks(n, blk(n))
    src.set_state(S.STOP_COPY)
    blob = src.save_state()
    assert len(blob) > 5 * 64
    assert blob == encode_state(src.current_state())
    dst = EmulatedController.for_resuming("c" * 200, tmp_path / "dst.img", MIB)
    dst.state_piece_bytes = 64
    empty = dst.current_state()
    with pytest.raises(StateFormatError, match=r"Set Controller State \(last piece\) for CNTLID 1 .* failed with "
                                               r"status INVALID_FIELD \(0x002\): controller state checksum mismatch"):
        dst.load_state(blob[:-1] + bytes([blob[-1] ^ 1]))
    assert dst.current_state() == empty  # a rejected state changes nothing
    dst.load_state(blob)
    assert dst.current_state() == src.current_state()
    dst.set_state(S.RUNNING)
    dst.write_blocks(9, blk(9))  # the guest continues on the loaded queues, from I/O queue 1
    sq1 = src.current_state().submission_queues[1]
    assert (sq1.qid, sq1.tail) == (1, 3)
    assert dst.current_state().submission_queues[1].tail == 4
    for c in (src, dst):
        c.close()


# ----- controller state ---------------------------------------------------------------------------


def test_controller_state_round_trips_to_destination(tmp_path: Path) -> None:
    src = EmulatedController("c1", tmp_path / "src.img", 4 * MIB, create=True)
    dst = EmulatedController.for_resuming("c1", tmp_path / "dst.img", 4 * MIB)
    initial = src.current_state()
    for n in range(4 * 256 + 4):  # every I/O queue pair wraps once: the phase tags flip
        src.write_blocks(n % 300, blk(n % 300 % 251))
    advanced = src.current_state()
    assert advanced.submission_queues != initial.submission_queues
    assert advanced.completion_queues[1].attributes != initial.completion_queues[1].attributes  # phase flipped
    assert dst.vfio_state is S.RESUMING
    assert dst.current_state() != advanced
    with pytest.raises(StateFormatError, match="no controller state loaded"):
        dst.set_state(S.RUNNING)
    assert dst.vfio_state is S.RESUMING  # the failed arc left it where it was
    src.set_state(S.STOP_COPY)
    for offset, length in src.data_extents():
        dst.write_raw(offset, src.read_raw(offset, length))
    dst.load_state(src.save_state())
    assert dst.current_state() == src.current_state()
    dst.set_state(S.RUNNING)
    assert dst.read_blocks(299, 1) == blk(299 % 251)
    assert dst.digest() == src.digest()
    src.release()
    dst.close()


def test_load_state_checks_identity_and_state(tmp_path: Path) -> None:
    src = EmulatedController("c1", tmp_path / "src.img", MIB, create=True)
    src.set_state(S.STOP)
    blob = src.save_state()
    other = EmulatedController.for_resuming("c2", tmp_path / "c2.img", MIB)
    with pytest.raises(StateFormatError, match="for controller 'c1', not 'c2'"):
        other.load_state(blob)
    bigger = EmulatedController.for_resuming("c1", tmp_path / "big.img", 2 * MIB)
    with pytest.raises(StateFormatError, match="namespace_bytes=1048576, but controller c1 has 2097152"):
        bigger.load_state(blob)
    with pytest.raises(WrongStateError, match="load_state needs state RESUMING"):
        src.load_state(blob)
    with pytest.raises(StateFormatError, match="bad magic"):
        bigger.load_state(b"X" * 100)
    for c in (src, other, bigger):
        c.close()


def test_write_raw_unaligned_in_resuming(tmp_path: Path) -> None:
    dst = EmulatedController.for_resuming("c1", tmp_path / "d.img", MIB)
    dst.write_raw(BLOCK_BYTES - 2, b"abcd")
    assert dst.read_raw(BLOCK_BYTES - 2, 4) == b"abcd"
    assert dst.data_extents() == [(0, 2 * BLOCK_BYTES)]
    dst.close()
    again = EmulatedController.for_resuming("c1", tmp_path / "d.img", MIB, create=False)
    assert again.vfio_state is S.RESUMING
    assert again.read_raw(BLOCK_BYTES - 2, 4) == b"abcd"
    again.release()


# ----- digests and snapshots ----------------------------------------------------------------------


def test_digest_is_the_content_digest_of_the_namespace(ctrl: EmulatedController) -> None:
    ctrl.write_blocks(17, blk(5))
    image = ctrl.namespace_path.read_bytes()
    assert ctrl.digest() == digest_extents([(0, len(image))], lambda o, n: image[o:o + n])


def test_digest_of_a_sparse_namespace_reads_only_what_is_written(tmp_path: Path) -> None:
    # 64 GiB, two blocks written: hashing holes would take minutes; this takes a moment.
    big = EmulatedController("big", tmp_path / "big.ns", 64 << 30, create=True)
    zeroed = EmulatedController("zeroed", tmp_path / "zeroed.ns", 64 << 30, create=True)
    try:
        for c in (big, zeroed):
            c.write_blocks(3, blk(7))
            c.write_blocks((64 << 30) // BLOCK_BYTES - 1, blk(8))
        zeroed.write_blocks(1000, bytes(BLOCK_BYTES * 4))  # written zeroes read as the holes they replace
        assert zeroed.data_extents() != big.data_extents()
        assert big.digest() == zeroed.digest()
        zeroed.write_blocks(1001, blk(9))
        assert big.digest() != zeroed.digest()
    finally:
        big.close()
        zeroed.close()


def test_snapshot_keeps_the_old_contents(ctrl: EmulatedController) -> None:
    ctrl.write_blocks(0, blk(1, 4))
    before = ctrl.digest()
    snap = ctrl.begin_snapshot()
    assert isinstance(snap, Snapshot)
    ctrl.write_blocks(1, blk(2, 2))
    ctrl.write_blocks(1, blk(3))  # already preserved once: the first old contents must stay
    ctrl.write_blocks(600, blk(4))  # a hole before
    assert ctrl.digest() != before
    assert snap.digest() == before
    snap.close()
    with pytest.raises(ValueError, match="snapshot is closed"):
        snap.digest()


def test_release_deletes_the_file_and_everything_fails_after(ctrl: EmulatedController) -> None:
    ctrl.write_blocks(0, blk(1))
    snap = ctrl.begin_snapshot()
    path = ctrl.namespace_path
    ctrl.release()
    assert not path.exists()
    for call in (
        lambda: ctrl.vfio_state,
        lambda: ctrl.write_blocks(0, blk(1)),
        lambda: ctrl.read_raw(0, 1),
        lambda: ctrl.data_extents(),
        lambda: ctrl.set_state(S.STOP),
        lambda: ctrl.take_dirty_lbas(),
        lambda: ctrl.begin_snapshot(),
        lambda: snap.digest(),
        lambda: ctrl.digest(),
    ):
        with pytest.raises(ControllerGoneError, match="controller c1 was released"):
            call()
    ctrl.release()  # a retried release is harmless
    assert ctrl.controller_id == "c1"


# ----- state container ----------------------------------------------------------------------------

u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFF_FFFF)
u64 = st.integers(0, (1 << 64) - 1)


@st.composite
def queues(draw: st.DrawFn) -> tuple[QueueState, ...]:
    ids = draw(st.lists(u16, max_size=6, unique=True))
    out = []
    for qid in ids:
        size = draw(st.integers(2, 0xFFFF))
        out.append(QueueState(qid, draw(u64), size, draw(st.integers(0, size - 1)),
                              draw(st.integers(0, size - 1)), draw(u32)))
    return tuple(out)


states = st.builds(
    ControllerState,
    controller_id=st.text(min_size=1, max_size=40),
    namespace_bytes=u64,
    registers=st.builds(ControllerRegisters, u32, u32, u32, u64, u64),
    submission_queues=queues(),
    completion_queues=queues(),
)


@settings(max_examples=150, deadline=None)
@given(states)
def test_state_round_trip(state: ControllerState) -> None:
    blob = encode_state(state)
    assert blob[:8] == MAGIC
    assert decode_state(blob) == state


@settings(max_examples=150, deadline=None)
@given(states, st.data())
def test_any_flipped_byte_is_caught(state: ControllerState, data: st.DataObject) -> None:
    blob = bytearray(encode_state(state))
    at = data.draw(st.integers(0, len(blob) - 1))
    blob[at] ^= data.draw(st.integers(1, 255))
    with pytest.raises(StateFormatError):
        decode_state(bytes(blob))


def _state() -> ControllerState:
    return ControllerState("c1", MIB, ControllerRegisters(1, 1, 0x1F001F, 0x1000, 0x2000),
                           (QueueState(0, 0x1000, 32, 3, 3, 1),), (QueueState(0, 0x2000, 32, 3, 3, 5),))


def _reheader(payload: bytes, version: int = STATE_FORMAT_VERSION, flags: int = 0) -> bytes:
    return struct.pack("<8sHHI32s", MAGIC, version, flags, len(payload), hashlib.sha256(payload).digest()) + payload


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda b: b[:20], "truncated: 20 bytes, the header alone is 48"),
        (lambda b: b[:-1], "truncated: header says"),
        (lambda b: b + b"\0", "1 trailing bytes"),
        (lambda b: b"NOTMAGIC" + b[8:], "bad magic b'NOTMAGIC'"),
        (lambda b: _reheader(b[HEADER_BYTES:], version=2), r"version 2 is unsupported \(supported: 1\)"),
        (lambda b: _reheader(b[HEADER_BYTES:], flags=4), "unknown flags 0x0004"),
        (lambda b: b[:-1] + bytes([b[-1] ^ 1]), "checksum mismatch"),
        (lambda b: _reheader(b[HEADER_BYTES:-24]), "queue entry 1 needs 24 bytes"),
        (lambda b: _reheader(b[HEADER_BYTES:] + b"\0" * 5), "5 bytes left after 2 queue entries"),
        (lambda b: _reheader(b"\x02\x00\xff\xfe" + b[HEADER_BYTES + 4 :]), "controller id is not UTF-8"),
    ],
)
def test_bad_containers_say_what_is_wrong(mutate: object, message: str) -> None:
    blob = encode_state(_state())
    assert decode_state(blob) == _state()
    with pytest.raises(StateFormatError, match=message):
        decode_state(mutate(blob))  # type: ignore[operator]


def test_queue_values_are_validated() -> None:
    with pytest.raises(ValueError, match="head=40 tail=0 must both be below size=32"):
        QueueState(1, 0, 32, 40, 0)
    with pytest.raises(ValueError, match="size=70000 does not fit"):
        QueueState(1, 0, 70000, 0, 0)
    payload = encode_state(_state())[HEADER_BYTES:]
    bad_head = bytearray(payload)
    # First queue entry starts after id (2+2), namespace (8), registers (28), counts (4).
    struct.pack_into("<H", bad_head, 4 + 8 + 28 + 4 + 12, 99)
    with pytest.raises(StateFormatError, match="payload malformed: queue 0: head=99"):
        decode_state(_reheader(bytes(bad_head)))


def test_file_left_behind_only_by_close(tmp_path: Path) -> None:
    c = EmulatedController("c1", tmp_path / "keep.img", MIB, create=True)
    c.close()
    c.close()
    assert os.path.exists(tmp_path / "keep.img")
    with pytest.raises(ControllerGoneError, match="was closed"):
        c.read_raw(0, 1)
