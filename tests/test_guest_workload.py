"""Tests of the guest workload, its blocks and its verifier, including a live migration done by hand
between two emulated controllers with the guest writing throughout (real files, real threads)."""

from __future__ import annotations

import itertools
import time
from array import array
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.emulated.controller import BLOCK_BYTES, EmulatedController
from agent.guest.blocks import (
    HEADER_BYTES,
    LEGACY_RUN_ID,
    MAGIC,
    block_id,
    block_seq,
    check_block,
    make_block,
    make_legacy_block,
)
from agent.guest.lineage import Lineage, Segment
from agent.guest.verifier import verify
from agent.guest.workload import GuestState, GuestStateError, GuestWorkload, WorkloadSpec
from agent.vfio_states import VfioState

MIB = 1 << 20
S = VfioState


@pytest.fixture
def ctrl(tmp_path: Path) -> Iterator[EmulatedController]:
    c = EmulatedController("vm1", tmp_path / "vm1.img", 4 * MIB, create=True)
    yield c
    c.close()


def run(ctrl: EmulatedController, guests: list[GuestWorkload], spec: WorkloadSpec, *,
        prefill: bool = True) -> GuestWorkload:
    g = GuestWorkload(ctrl, spec)
    if prefill:
        g.prefill()
    guests.append(g)
    g.start()
    return g


# ----- blocks -------------------------------------------------------------------------------------


RUN = 0x3FA2_0000_0000_0001


def test_block_layout_and_checks() -> None:
    b = make_block(17, 9, RUN)
    assert len(b) == BLOCK_BYTES
    assert b[:8] == MAGIC
    assert int.from_bytes(b[8:16], "little") == 17
    assert int.from_bytes(b[24:32], "little") == RUN
    assert block_seq(b) == 9
    assert block_id(b) is not None and block_id(b).run_id == RUN  # type: ignore[union-attr]
    assert b != make_block(17, 10, RUN) and b[HEADER_BYTES:] != make_block(18, 9, RUN)[HEADER_BYTES:]
    assert b[HEADER_BYTES:] != make_block(17, 9, RUN + 1)[HEADER_BYTES:]
    assert check_block(b, 17, 9, RUN) is None
    assert check_block(make_block(17, 4, RUN), 17, 9, RUN) == "lba 17: holds seq 4, expected seq 9"
    assert check_block(bytes(BLOCK_BYTES), 17, 9, RUN) == "lba 17: never written (zeros)"
    assert check_block(make_block(16, 9, RUN), 17, 9, RUN) == \
        "lba 17: holds the block of lba 16 (seq 9), a misplaced write"
    other_run = check_block(make_block(17, 9, RUN + 1), 17, 9, RUN) or ""
    assert other_run.startswith("lba 17: holds seq 9 of run 3fa2000000000002, but in the guest's history seq 9 "
                                "is of run 3fa2000000000001"), other_run
    torn = bytearray(b)
    torn[3000] ^= 0xFF
    assert check_block(bytes(torn), 17, 9, RUN) == "lba 17: filler corrupt"
    assert check_block(b"\x01" + b[1:], 17, 9, RUN) is not None
    assert "header corrupt" in (check_block(b"\x01" + b[1:], 17, 9, RUN) or "")
    assert check_block(b[:100], 17, 9, RUN) == "lba 17: block is 100 bytes, expected 4096"


def test_legacy_blocks_read_as_the_legacy_run() -> None:
    old = make_legacy_block(17, 9)
    assert old[:8] == b"NVMGBLK1" and block_seq(old) == 9
    assert check_block(old, 17, 9, LEGACY_RUN_ID) is None
    assert "of run 0000000000000000" in (check_block(old, 17, 9, RUN) or "")
    torn = bytearray(old)
    torn[3000] ^= 0xFF
    assert check_block(bytes(torn), 17, 9, LEGACY_RUN_ID) == "lba 17: filler corrupt"


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (WorkloadSpec(write_iops=-1), "write_iops=-1"),
        (WorkloadSpec(block_bytes=1000), "block_bytes=1000 must be a positive multiple of 4096"),
        (WorkloadSpec(block_bytes=0), "block_bytes=0"),
        (WorkloadSpec(block_bytes=8 * MIB), "block_bytes=8388608 is larger than the 4194304-byte namespace"),
        (WorkloadSpec(pattern="zipf"), "pattern='zipf' is unknown"),
        (WorkloadSpec(hot_fraction=0.0), r"hot_fraction=0.0 must be in \(0, 1\]"),
        (WorkloadSpec(hot_fraction=1.5), "hot_fraction=1.5"),
        (WorkloadSpec(seed=-3), "seed=-3"),
    ],
)
def test_spec_validation(spec: WorkloadSpec, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        spec.validate(4 * MIB)


# ----- the workload -------------------------------------------------------------------------------


def test_writes_are_acknowledged_and_verified(ctrl: EmulatedController, guests: list[GuestWorkload]) -> None:
    g = run(ctrl, guests, WorkloadSpec(block_bytes=16384, seed=3))
    stats = g.wait_acked(300, timeout=10)
    assert stats.running and stats.acked_writes >= 300 and stats.io_errors == 0
    g.stop()
    stats = g.status()
    assert not stats.running
    assert stats.next_seq == stats.acked_writes + 1
    acked = g.acked_map()
    assert len(acked) == ctrl.block_count and acked.acked_count() == ctrl.block_count
    newest = max(s for s in (acked.seq(lba) for lba in range(ctrl.block_count)) if s is not None)
    assert newest == stats.next_seq - 1
    # A 16 KiB write gives its four blocks the same seq.
    lba = next(lba for lba in range(ctrl.block_count) if acked.seq(lba) == newest)
    assert lba % 4 == 0 and {acked.seq(lba + i) for i in range(4)} == {newest}
    result = verify(ctrl, g)
    assert result.ok, result.first_mismatch
    assert result.blocks_checked == ctrl.block_count


def test_patterns_choose_the_expected_lbas(ctrl: EmulatedController, guests: list[GuestWorkload]) -> None:
    seq_guest = run(ctrl, guests, WorkloadSpec(pattern="sequential"), prefill=False)
    seq_guest.wait_acked(50, timeout=10)
    seq_guest.stop()
    acked = seq_guest.acked_map()
    assert [acked.seq(lba) for lba in range(10)] == list(range(1, 11))
    assert acked.seq(seq_guest.status().acked_writes) is None  # nothing beyond the last write

    hot_ctrl = EmulatedController("hot", ctrl.namespace_path.with_name("hot.img"), 4 * MIB, create=True)
    hot = run(hot_ctrl, guests, WorkloadSpec(pattern="hot", hot_fraction=0.1), prefill=False)
    hot.wait_acked(500, timeout=10)
    hot.stop()
    written = [lba for lba in range(hot_ctrl.block_count) if hot.acked_map().seq(lba) is not None]
    assert max(written) < 102  # 10% of 1024 blocks
    assert len(written) > 50
    hot_ctrl.release()


def test_pause_parks_the_guest(ctrl: EmulatedController, guests: list[GuestWorkload]) -> None:
    g = run(ctrl, guests, WorkloadSpec())
    g.wait_acked(20, timeout=10)
    g.pause()
    frozen = g.status()
    assert frozen.paused and frozen.pauses == 1
    first = ctrl.digest()
    assert ctrl.digest() == first  # nothing is written while parked
    assert g.status().acked_writes == frozen.acked_writes
    g.pause()  # already paused: not counted again
    g.unpause()
    g.wait_acked(frozen.acked_writes + 20, timeout=10)
    assert g.status().pauses == 1


def test_suspended_controller_stalls_the_guest(ctrl: EmulatedController, guests: list[GuestWorkload]) -> None:
    g = run(ctrl, guests, WorkloadSpec())
    g.wait_acked(20, timeout=10)
    ctrl.set_state(S.STOP)
    suspended_at = time.time()
    stalled = g.wait_for(lambda s: s.io_errors >= 1, timeout=10)
    g.wait_for(lambda s: s.io_errors >= stalled.io_errors + 3, timeout=10)
    assert g.status().acked_writes == stalled.acked_writes  # stalled: the same write is retried
    resuming_at = time.time()
    ctrl.set_state(S.RUNNING)
    resumed = g.wait_acked(stalled.acked_writes + 10, timeout=10)
    # No completion between suspend and resume: the guest saw at least that long a gap.
    assert resumed.max_gap_ms >= (resuming_at - suspended_at) * 1000.0 >= 10.0
    g.stop()
    assert verify(ctrl, g).ok


def test_throttle_slows_the_guest(ctrl: EmulatedController, guests: list[GuestWorkload]) -> None:
    g = run(ctrl, guests, WorkloadSpec(write_iops=4000), prefill=False)

    def rate(writes: int) -> float:
        begin = g.status().acked_writes
        t0 = time.monotonic()
        g.wait_acked(begin + writes, timeout=10)
        return writes / (time.monotonic() - t0)

    full = rate(400)
    g.set_throttle(75)
    rate(20)  # let the schedule settle on the new period
    throttled = rate(100)
    assert g.status().throttle_percent == 75
    assert 0.12 < throttled / full < 0.4, (full, throttled)
    g.set_throttle(0)
    with pytest.raises(ValueError, match="percent=100"):
        g.set_throttle(100)


def test_unlimited_rate_throttle_uses_measured_write_time(
    ctrl: EmulatedController, guests: list[GuestWorkload]
) -> None:
    g = run(ctrl, guests, WorkloadSpec(), prefill=False)

    def rate(writes: int) -> float:
        begin = g.status().acked_writes
        t0 = time.monotonic()
        g.wait_acked(begin + writes, timeout=10)
        return writes / (time.monotonic() - t0)

    full = rate(2000)
    g.set_throttle(80)
    rate(50)
    throttled = rate(300)
    assert throttled / full < 0.5, (full, throttled)


def test_export_and_continue_on_another_controller(ctrl: EmulatedController, tmp_path: Path,
                                                   guests: list[GuestWorkload]) -> None:
    g = run(ctrl, guests, WorkloadSpec(seed=11))
    g.wait_acked(50, timeout=10)
    with pytest.raises(RuntimeError, match="pause"):
        g.export_state()
    g.pause()
    blob = g.export_state()
    before = g.status()
    state = GuestState.decode(blob)
    assert state.next_seq == before.next_seq and state.spec == WorkloadSpec(seed=11)
    acked = g.acked_map()
    assert state.acked.tolist() == [0 if s is None else s + 1 for s in map(acked.seq, range(ctrl.block_count))]
    assert len(blob) < 8 * ctrl.block_count  # compressed

    # A copy of the namespace: what the migration would have put there.
    twin = EmulatedController.for_resuming("vm1", tmp_path / "twin.img", 4 * MIB)
    twin.write_raw(0, ctrl.read_raw(0, 4 * MIB))
    twin.load_state(_suspend_and_save(ctrl))
    twin.set_state(S.RUNNING)
    g2 = GuestWorkload.from_state(twin, blob)
    guests.append(g2)
    assert g2.status().next_seq == before.next_seq
    g2.start()
    after = g2.wait_acked(before.acked_writes + 30, timeout=10)
    assert after.blackout_ms > 0
    assert after.max_gap_ms >= after.blackout_ms
    g2.stop()
    assert verify(twin, g2).ok
    with pytest.raises(ValueError, match="covers 1024 blocks but controller small has 256"):
        GuestWorkload.from_state(EmulatedController("small", tmp_path / "s.img", MIB, create=True), blob)
    twin.release()


def _suspend_and_save(ctrl: EmulatedController) -> bytes:
    ctrl.set_state(S.STOP_COPY)
    return ctrl.save_state()


def test_guest_state_decoding_errors() -> None:
    lineage = Lineage((Segment(11, 0), Segment(22, 5)))
    original = GuestState(WorkloadSpec(pattern="hot", seed=2), 4, 7, array("Q", [0, 1, 0, 6]), 123.5, 0.25, 6,
                          lineage=lineage)
    blob = original.encode()
    assert GuestState.decode(blob) == original
    with pytest.raises(GuestStateError, match="version 9 is unsupported"):
        GuestState.decode(b"\x09" + blob[1:])
    with pytest.raises(GuestStateError, match="checksum mismatch"):
        GuestState.decode(blob[:-5] + bytes([blob[-5] ^ 1]) + blob[-4:])
    with pytest.raises(GuestStateError, match="truncated"):
        GuestState.decode(blob[:10])
    with pytest.raises(GuestStateError, match="empty"):
        GuestState.decode(b"")


def test_released_controller_ends_the_guest(ctrl: EmulatedController, guests: list[GuestWorkload]) -> None:
    g = run(ctrl, guests, WorkloadSpec())
    g.wait_acked(10, timeout=10)
    ctrl.release()
    stats = g.wait_for(lambda s: not s.running, timeout=10)
    assert stats.failure == ""
    with pytest.raises(RuntimeError, match="ended before the condition held"):
        g.wait_acked(stats.acked_writes + 1, timeout=1)


# ----- the verifier -------------------------------------------------------------------------------


def test_verify_names_a_corrupted_block(ctrl: EmulatedController, guests: list[GuestWorkload]) -> None:
    g = run(ctrl, guests, WorkloadSpec(write_iops=500))
    g.wait_acked(5, timeout=10)
    g.stop()
    assert verify(ctrl, g).ok
    with open(ctrl.namespace_path, "r+b") as f:  # behind the controller's back, as a bad disk would
        f.seek(17 * BLOCK_BYTES + 2000)
        byte = f.read(1)
        f.seek(17 * BLOCK_BYTES + 2000)
        f.write(bytes([byte[0] ^ 0x40]))
    result = verify(ctrl, g)
    assert not result.ok
    assert result.mismatches == 1
    assert result.first_mismatch == "lba 17: filler corrupt"


def test_verify_catches_a_lost_write(ctrl: EmulatedController, guests: list[GuestWorkload], tmp_path: Path) -> None:
    g = run(ctrl, guests, WorkloadSpec(pattern="sequential", write_iops=2000))
    g.wait_acked(40, timeout=10)
    g.stop()
    # A destination that missed the guest's write to lba 30 still holds the prefilled block.
    dst = EmulatedController.for_resuming("vm1", tmp_path / "dst.img", 4 * MIB)
    dst.write_raw(0, ctrl.read_raw(0, 4 * MIB))
    dst.write_raw(30 * BLOCK_BYTES, make_block(30, 0, g.lineage().run_of(0)))
    result = verify(dst, g)
    assert not result.ok
    assert result.first_mismatch == "lba 30: holds seq 0, expected seq 31"
    dst.release()


def test_verify_while_the_guest_writes(ctrl: EmulatedController, guests: list[GuestWorkload]) -> None:
    g = run(ctrl, guests, WorkloadSpec(pattern="hot", hot_fraction=0.05))
    g.wait_acked(100, timeout=10)
    for _ in range(3):
        result = verify(ctrl, g)
        assert result.ok, result.first_mismatch
    assert g.status().running


# ----- a live migration by hand -------------------------------------------------------------------


def _runs(lbas: list[int]) -> Iterator[tuple[int, int]]:
    """Contiguous runs of sorted LBAs as (first, count)."""
    for _, group in itertools.groupby(enumerate(lbas), key=lambda p: p[1] - p[0]):
        run_lbas = [lba for _, lba in group]
        yield run_lbas[0], len(run_lbas)


def _copy_lbas(src: EmulatedController, dst: EmulatedController, lbas: list[int]) -> None:
    for first, count in _runs(lbas):
        dst.write_raw(first * BLOCK_BYTES, src.read_raw(first * BLOCK_BYTES, count * BLOCK_BYTES))


def test_live_migration_by_hand(tmp_path: Path, guests: list[GuestWorkload]) -> None:
    size = 8 * MIB
    src = EmulatedController("vm1", tmp_path / "src.img", size, create=True)
    dst = EmulatedController.for_resuming("vm1", tmp_path / "dst.img", size)
    guest = run(src, guests, WorkloadSpec(pattern="hot", hot_fraction=0.25, seed=5))
    guest.wait_acked(30, timeout=10)

    # PRECOPY: tracking on, then the full namespace while the guest keeps writing.
    src.set_state(S.PRE_COPY)
    for offset, length in src.data_extents():
        for at in range(offset, offset + length, MIB):
            n = min(MIB, offset + length - at)
            dst.write_raw(at, src.read_raw(at, n))
    # DIRTY_ITERATION: a few rounds of what changed meanwhile.
    dirtied = 0
    for _ in range(3):
        # Let the guest dirty more blocks before each round, so every round has work to do.
        guest.wait_acked(guest.status().acked_writes + 20, timeout=10)
        lbas = src.take_dirty_lbas()
        dirtied += len(lbas)
        _copy_lbas(src, dst, lbas)
    assert dirtied >= 20
    # STOP_AND_COPY.
    guest.pause()
    src.set_state(S.STOP_COPY)
    final = src.take_dirty_lbas()
    _copy_lbas(src, dst, final)
    dst.load_state(src.save_state())
    guest_blob = guest.export_state()
    at_switchover = guest.status()
    source_digest = src.digest()
    source_queues = src.current_state()
    guest.stop()

    # RESUMING on the destination.
    dst.set_state(S.RUNNING)
    assert dst.current_state() == source_queues
    snapshot = dst.begin_snapshot()
    moved = GuestWorkload.from_state(dst, guest_blob)
    guests.append(moved)
    moved.start()
    after = moved.wait_acked(at_switchover.acked_writes + 200, timeout=10)
    assert snapshot.digest() == source_digest  # the namespace at switchover, byte for byte
    snapshot.close()
    moved.stop()
    assert dst.digest() != source_digest  # the guest kept writing on the destination
    assert after.blackout_ms > 0 and after.next_seq > at_switchover.next_seq
    result = verify(dst, moved)
    assert result.ok, result.first_mismatch
    assert result.blocks_checked == dst.block_count
    src.release()
    assert not (tmp_path / "src.img").exists()
    dst.close()
