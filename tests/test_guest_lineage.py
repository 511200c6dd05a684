"""The guest's run lineage and receipts: a guest restored from an older image replays the same
writes (same seqs, LBAs and contents apart from the run id), so only receipts taken before the
restore show the writes it lost. Real emulated controllers, real guest threads."""

from __future__ import annotations

import struct
import sys
import zlib
from array import array
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.emulated.controller import EmulatedController
from agent.guest.blocks import LEGACY_RUN_ID, make_legacy_block, run_label
from agent.guest.lineage import Lineage, Receipt, Segment
from agent.guest.verifier import verify
from agent.guest.workload import GuestState, GuestWorkload, WorkloadSpec
from agent.vfio_states import VfioState

MIB = 1 << 20
SIZE = 4 * MIB
TIMEOUT_S = 30.0


@pytest.fixture
def ctrl(tmp_path: Path) -> Iterator[EmulatedController]:
    c = EmulatedController("vm1", tmp_path / "vm1.img", SIZE, create=True)
    yield c
    c.close()


def _start(g: GuestWorkload, guests: list[GuestWorkload]) -> GuestWorkload:
    guests.append(g)
    g.start()
    return g


def _receipt(g: GuestWorkload) -> Receipt:
    receipt = g.status().receipt
    assert receipt is not None
    return receipt


def _twin(src: EmulatedController, path: Path) -> EmulatedController:
    """A destination holding the source's namespace and controller state: what a migration leaves."""
    dst = EmulatedController.for_resuming("vm1", path, SIZE)
    dst.write_raw(0, src.read_raw(0, SIZE))
    src.set_state(VfioState.STOP_COPY)
    dst.load_state(src.save_state())
    dst.set_state(VfioState.RUNNING)
    return dst


# ----- the lineage, pure ------------------------------------------------------------------------------


def test_lineage_maps_seqs_to_runs_and_judges_receipts() -> None:
    lineage = Lineage((Segment(0xA, 0), Segment(0xB, 100), Segment(0xC, 250)))
    assert [lineage.run_of(seq) for seq in (0, 99, 100, 249, 250, 10_000)] == [0xA, 0xA, 0xB, 0xB, 0xC, 0xC]
    assert lineage.receipt_for(180) == Receipt(0xB, 180, 100)
    assert lineage.receipt_problem(Receipt(0xB, 249, 100), next_seq=300) is None
    assert lineage.receipt_problem(Receipt(0xC, 299), next_seq=300) is None
    assert lineage.receipt_problem(Receipt(0xB, 260, 100), next_seq=300) == (
        f"acknowledged write seq 260 of run {run_label(0xB)}: not in the guest's history (the guest resumed "
        "from an older image, where that run ends before seq 250); writes 250..260 were lost")
    assert lineage.receipt_problem(Receipt(0xD, 1834, 1501), next_seq=300) == (
        f"acknowledged write seq 1834 of run {run_label(0xD)}: not in the guest's history (the guest resumed "
        "from an older image); writes 1501..1834 were lost")
    assert "that run's writes up to seq 7 were lost" in (lineage.receipt_problem(Receipt(0xD, 7), 300) or "")
    assert "the receipt is not of this guest" in (lineage.receipt_problem(Receipt(0xB, 50), 300) or "")
    assert lineage.receipt_problem(Receipt(0xC, 300), next_seq=300) is not None  # not yet written here
    # A run that wrote nothing (its guest was restarted at once) yields to the next at that seq.
    empty = Lineage((Segment(0xA, 0), Segment(0xB, 100), Segment(0xC, 100)))
    assert empty.run_of(100) == 0xC and empty.receipt_for(99) == Receipt(0xA, 99, 0)
    with pytest.raises(ValueError, match="not in order"):
        Lineage((Segment(0xA, 5), Segment(0xB, 1)))
    with pytest.raises(ValueError, match="twice"):
        Lineage((Segment(0xA, 0), Segment(0xA, 1)))


# ----- runs and receipts of a real guest -------------------------------------------------------------


def test_every_start_after_a_restore_is_a_new_run(ctrl: EmulatedController, tmp_path: Path,
                                                   guests: list[GuestWorkload]) -> None:
    g1 = GuestWorkload(ctrl, WorkloadSpec(seed=4))
    g1.prefill()
    assert g1.status().receipt is None  # the prefill alone is no write to hand out a receipt for
    _start(g1, guests).wait_acked(20, timeout=TIMEOUT_S)
    first = g1.status()
    assert first.receipt is not None and first.receipt.run_id == first.run_id
    assert g1.lineage().segments == (Segment(first.run_id, 0),)
    g1.pause()
    image = g1.export_state()
    g1.stop()
    dst = _twin(ctrl, tmp_path / "dst.img")
    g2 = GuestWorkload.from_state(dst, image)
    assert g2.status().run_id == first.run_id  # not started yet: still the image's run
    _start(g2, guests).wait_acked(first.acked_writes + 20, timeout=TIMEOUT_S)
    second = g2.status()
    assert second.run_id != first.run_id
    image_seq = GuestState.decode(image).next_seq
    assert g2.lineage().segments == (Segment(first.run_id, 0), Segment(second.run_id, image_seq))
    assert GuestState.decode(image).lineage.segments == (Segment(first.run_id, 0),)
    g2.stop()
    result = verify(dst, g2)
    assert result.ok, result.first_mismatch
    dst.release()


def test_a_guest_resumed_from_an_older_image_is_caught_by_a_receipt(
        ctrl: EmulatedController, tmp_path: Path, guests: list[GuestWorkload]) -> None:
    """The reported case: the destination ran the guest a while, then was restarted from the
    switchover image; the restored guest replays the same writes over the ones it lost."""
    source = GuestWorkload(ctrl, WorkloadSpec(seed=9))
    source.prefill()
    _start(source, guests).wait_acked(50, timeout=TIMEOUT_S)
    source.pause()
    image = source.export_state()  # the switchover image
    switchover_seq = GuestState.decode(image).next_seq
    source.stop()
    dst = _twin(ctrl, tmp_path / "dst.img")

    # The destination runs the guest; someone sees a receipt; it runs on past it.
    first_life = _start(GuestWorkload.from_state(dst, image), guests)
    first_life.wait_acked(first_life.status().acked_writes + 300, timeout=TIMEOUT_S)
    receipt = _receipt(first_life)
    assert receipt.run_first_seq == switchover_seq and receipt.seq >= switchover_seq + 299
    assert verify(dst, first_life, [receipt]).ok
    first_life.wait_acked(first_life.status().acked_writes + 100, timeout=TIMEOUT_S)
    first_life.stop()
    last_seq_of_first_life = first_life.status().next_seq - 1

    # Restarted from the image: its namespace file kept the newer blocks, its guest state did not.
    second_life = _start(GuestWorkload.from_state(dst, image), guests)
    second_life.wait_for(lambda s: s.next_seq > last_seq_of_first_life + 50, timeout=TIMEOUT_S)
    second_life.stop()

    # Without the receipt nothing shows: every block of the lost run was replayed, identical but
    # for the run id, and the acknowledged map came from the same image.
    blind = verify(dst, second_life)
    assert blind.ok, blind.first_mismatch
    assert blind.blocks_checked == dst.block_count

    caught = verify(dst, second_life, [receipt])
    assert not caught.ok
    assert caught.receipts_checked == 1 and caught.mismatches == 1
    assert caught.first_mismatch == (
        f"acknowledged write seq {receipt.seq} of run {run_label(receipt.run_id)}: not in the guest's history "
        f"(the guest resumed from an older image); writes {switchover_seq}..{receipt.seq} were lost")
    dst.release()


def test_a_receipt_past_the_image_of_the_same_run_is_caught(
        ctrl: EmulatedController, tmp_path: Path, guests: list[GuestWorkload]) -> None:
    """The image is older than a receipt of its own run: that run ends earlier in the history."""
    g1 = GuestWorkload(ctrl, WorkloadSpec(seed=2))
    g1.prefill()
    _start(g1, guests).wait_acked(40, timeout=TIMEOUT_S)
    g1.pause()
    image = g1.export_state()
    image_seq = GuestState.decode(image).next_seq
    g1.unpause()
    g1.wait_acked(g1.status().acked_writes + 100, timeout=TIMEOUT_S)
    receipt = _receipt(g1)
    g1.pause()
    dst = _twin(ctrl, tmp_path / "dst.img")
    g1.stop()
    g2 = _start(GuestWorkload.from_state(dst, image), guests)
    g2.wait_for(lambda s: s.next_seq > receipt.seq + 20, timeout=TIMEOUT_S)
    g2.stop()
    assert verify(dst, g2).ok
    caught = verify(dst, g2, [receipt])
    assert not caught.ok
    assert caught.first_mismatch.endswith(f"writes {image_seq}..{receipt.seq} were lost")
    dst.release()


def test_receipts_taken_before_a_migration_verify_after_it(ctrl: EmulatedController, tmp_path: Path,
                                                           guests: list[GuestWorkload]) -> None:
    """A normal switchover (pause, export, continue elsewhere) keeps every receipt in the history."""
    g1 = GuestWorkload(ctrl, WorkloadSpec(pattern="hot", hot_fraction=0.2, seed=5))
    g1.prefill()
    _start(g1, guests).wait_acked(30, timeout=TIMEOUT_S)
    receipts = [_receipt(g1)]
    g1.wait_acked(g1.status().acked_writes + 50, timeout=TIMEOUT_S)
    receipts.append(_receipt(g1))
    g1.pause()
    receipts.append(_receipt(g1))  # the last write before the switchover
    image = g1.export_state()
    g1.stop()
    hop1 = _twin(ctrl, tmp_path / "hop1.img")
    g2 = _start(GuestWorkload.from_state(hop1, image), guests)
    g2.wait_acked(g2.status().acked_writes + 50, timeout=TIMEOUT_S)
    receipts.append(_receipt(g2))
    g2.pause()
    image2 = g2.export_state()
    g2.stop()
    hop2 = _twin(hop1, tmp_path / "hop2.img")
    g3 = _start(GuestWorkload.from_state(hop2, image2), guests)
    g3.wait_acked(g3.status().acked_writes + 50, timeout=TIMEOUT_S)
    receipts.append(_receipt(g3))
    assert len({r.run_id for r in receipts}) == 3
    result = verify(hop2, g3, receipts)  # the guest still writing
    assert result.ok, result.first_mismatch
    assert result.receipts_checked == len(receipts)
    g3.stop()
    for c in (hop1, hop2):
        c.release()


def test_a_version_1_state_and_its_legacy_blocks_still_verify(ctrl: EmulatedController,
                                                              guests: list[GuestWorkload]) -> None:
    """A namespace prefilled by an older agent (format 1 blocks) and its version-1 guest state."""
    blocks = ctrl.block_count
    for first in range(0, blocks, 256):  # through the guest's path, 1 MiB at a time
        ctrl.write_blocks(first, b"".join(make_legacy_block(lba, 0) for lba in range(first, first + 256)))
    acked = array("Q", [1] * blocks)
    if sys.byteorder == "big":
        acked.byteswap()
    packed = zlib.compress(acked.tobytes(), 1)
    head = struct.pack("<BIIBdQQQddQQII", 1, 0, 4096, 0, 0.1, 3, blocks, 1, 0.0, 0.0, 0, 0, 0, len(packed))
    body = head + packed
    v1 = body + struct.pack("<I", zlib.crc32(body))
    assert GuestState.decode(v1).lineage.segments == (Segment(LEGACY_RUN_ID, 0),)
    g = _start(GuestWorkload.from_state(ctrl, v1), guests)
    g.wait_acked(100, timeout=TIMEOUT_S)
    assert g.status().run_id != LEGACY_RUN_ID
    result = verify(ctrl, g)
    assert result.ok, result.first_mismatch
    assert result.blocks_checked == blocks
    # A legacy block where the history has a run of its own is not that run's write.
    g.stop()
    written = next(lba for lba in range(blocks) if (g.acked_map(lba, 1).seq(lba) or 0) > 0)
    seq = g.acked_map(written, 1).seq(written)
    assert seq is not None
    ctrl.write_blocks(written, make_legacy_block(written, seq))
    assert f"holds seq {seq} of run {run_label(LEGACY_RUN_ID)}" in verify(ctrl, g).first_mismatch
