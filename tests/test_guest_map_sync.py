"""The guest's map of acknowledged blocks travels while the guest runs (agent.guest.map_sync): a
base after precopy, the changes after each round, and at the switchover only the last changes.

Pure pieces first (assembly, its refusals, the state encodings), then real sessions over the real
data plane in process with the guest writing throughout: the destination's guest continues with
exactly the source's map, and a receiver that does not list the feature gets the map whole."""

from __future__ import annotations

import asyncio
import struct
import zlib
from array import array
from collections.abc import Callable
from pathlib import Path

import pytest

from agent.dataplane import receiver as receiver_module
from agent.dataplane.receiver import DataReceiver, decode_final_payload
from agent.emulated.controller import EmulatedController
from agent.guest.lineage import Lineage, Segment
from agent.guest.map_journal import read_journal
from agent.guest.map_sync import MapAssembly, MapSyncError, base_pieces, delta_piece
from agent.guest.workload import (
    MAP_RAW,
    MAP_STATE_VERSION,
    STATE_VERSION,
    GuestState,
    GuestStateError,
    GuestWorkload,
    WorkloadSpec,
)
from agent.sessions import DestinationSession, TransferFacts, decode_guest
from tests.session_rig import session_rig

MiB = 1 << 20


def _state(acked: array[int]) -> GuestState:
    return GuestState(WorkloadSpec(write_iops=100, seed=9), len(acked), 77, acked, 1.5, 0.25, 40, 1, 2,
                      Lineage((Segment(11, 0), Segment(12, 30))))


def _assembled(acked: array[int], piece_blocks: int = 3) -> MapAssembly:
    assembly = MapAssembly()
    for piece in base_pieces(5, acked, piece_blocks):
        assembly.apply(piece)
    return assembly


def test_base_and_deltas_rebuild_the_map() -> None:
    acked = array("Q", range(1, 11))
    assembly = _assembled(acked)
    assert assembly.complete and assembly.pieces == 4 and assembly.acked == acked
    assembly.apply(delta_piece(5, 10, [0, 9], [100, 900]))
    assembly.apply(delta_piece(5, 10, [9], [901]))
    assert list(assembly.acked) == [100, *range(2, 10), 901]


_TEN_IN_FOURS = list(base_pieces(5, array("Q", range(10)), 4))


@pytest.mark.parametrize(("pieces", "message"), [
    (lambda: [delta_piece(5, 10, [1], [2])], "does not continue sync 0x0"),
    (lambda: [_TEN_IN_FOURS[0], delta_piece(5, 10, [1], [2])], "before its base was complete"),
    (lambda: [_TEN_IN_FOURS[0], _TEN_IN_FOURS[2]], "for LBA 8 of sync 0x5 out of order"),
    (lambda: [*base_pieces(5, array("Q", range(10))), delta_piece(6, 10, [1], [2])],
     "sync 0x6 does not continue sync 0x5"),
    (lambda: [*base_pieces(5, array("Q", range(10))), delta_piece(5, 10, [10], [2])],
     "names LBA 10 of a map of 10 blocks"),
    (lambda: [b"\x01" * 10], "shorter than its"),
    (lambda: [b"\x09" + bytes(31)], "unknown kind 9"),
], ids=["delta-first", "delta-early", "base-gap", "other-sync", "lba-outside", "short", "kind"])
def test_a_piece_that_does_not_continue_the_map_is_refused(pieces: Callable[[], list[bytes]], message: str) -> None:
    assembly = MapAssembly()
    with pytest.raises(MapSyncError, match=message):
        for piece in pieces():
            assembly.apply(piece)


def test_the_state_encodings_decode_to_the_same_state() -> None:
    acked = array("Q", [1, 0, 5, 7, 1, 1, 3])
    state = _state(acked)
    assert GuestState.decode(state.encode()) == state and state.encode()[0] == STATE_VERSION
    raw = state.encode_raw()
    assert raw[0] == MAP_STATE_VERSION and GuestState.decode(raw) == state
    assembly = _assembled(array("Q", [1, 0, 5, 0, 1, 1, 2]))
    synced = state.encode_synced(5, [3, 6], [7, 3])
    assert len(synced) < len(raw)
    assert GuestState.decode(synced, assembly) == state and assembly.acked == acked


@pytest.mark.parametrize(("assembly", "message"), [
    (None, "changes since sync 0x5, and the map this destination assembled is none"),
    (MapAssembly(), "assembled is none"),
], ids=["no-assembly", "empty-assembly"])
def test_a_synced_state_without_its_map_is_refused(assembly: MapAssembly | None, message: str) -> None:
    synced = _state(array("Q", range(7))).encode_synced(5, [1], [2])
    with pytest.raises(GuestStateError, match=message):
        GuestState.decode(synced, assembly)


def test_a_synced_state_of_another_sync_or_size_is_refused() -> None:
    synced = _state(array("Q", range(7))).encode_synced(6, [1], [2])
    with pytest.raises(GuestStateError, match=r"since sync 0x6, and the map this destination assembled is sync 0x5 "
                                              r"\(7 of 7 blocks\)"):
        GuestState.decode(synced, _assembled(array("Q", range(7))))
    wrong_size = _state(array("Q", range(7))).encode_synced(5, [1], [2])
    with pytest.raises(GuestStateError, match="covers 7 blocks, its synced map 8"):
        GuestState.decode(wrong_size, _assembled(array("Q", range(8))))


def test_an_unknown_map_encoding_is_refused() -> None:
    raw = bytearray(_state(array("Q", range(3))).encode_raw())
    at = raw.index(bytes([MAP_RAW]), len(raw) - 8 * 3 - 5)
    raw[at] = 9
    body = bytes(raw[:-4])
    with pytest.raises(GuestStateError, match="map encoding 9 is unknown"):
        GuestState.decode(body + struct.pack("<I", zlib.crc32(body)))


async def _migrate(tmp_path: Path, receiver: DataReceiver, rounds: int) -> tuple[
        GuestWorkload, DestinationSession, list[TransferFacts], array[int]]:
    """A guest writing on c1 migrated by real sessions over the real data plane; returns the
    source's guest (paused, stopped), the destination's session (LOADED) and the steps' facts,
    and the source's map as it paused."""
    async with session_rig(tmp_path, receiver, 32 * MiB, WorkloadSpec(write_iops=3000, seed=4),
                           state_path=tmp_path / "c1.state", keep_destination=True) as rig:
        workload, outbound = rig.workload, rig.outbound
        await asyncio.to_thread(workload.wait_acked, 50, 30)
        facts = [await outbound.start_precopy(receiver.address, "t1", 0)]
        for round_no in range(1, rounds + 1):
            before = workload.status().acked_writes
            await asyncio.to_thread(workload.wait_acked, before + 20, 30)  # the map changes between rounds
            facts.append(await outbound.dirty_round(round_no, 0, 0))
        facts.append(await outbound.stop_and_copy())
        return workload, rig.inbound, facts, _map_of(workload, rig.source.block_count)


def _map_of(workload: GuestWorkload, blocks: int) -> array[int]:
    acked = workload.acked_map()
    return array("Q", (v + 1 if (v := acked.seq(lba)) is not None else 0 for lba in range(blocks)))


async def test_the_map_goes_while_the_guest_runs_and_the_switchover_carries_only_its_last_changes(
        tmp_path: Path, receiver: DataReceiver) -> None:
    workload, inbound, facts, paused = await _migrate(tmp_path, receiver, rounds=2)
    try:
        assert inbound.guest_map is not None and inbound.guest_map.complete
        assert inbound.guest_map.pieces == 3  # the base (one piece for 8192 blocks), then a delta per round
        assert inbound.workload is not None and inbound.guest_was_running
        assert _map_of(inbound.workload, len(paused)) == paused, "the destination's map is not the source's"
        whole = len(workload.export_state())  # what FINAL's guest part was before: the map compressed
        final = facts[-1]
        assert final.state_bytes < whole, f"FINAL carried {final.state_bytes} bytes, the whole guest state is {whole}"
        # For a restart of the destination's agent: the state file holds the last changes, the
        # journal beside it the pieces before them.
        _, guest_blob = decode_final_payload((tmp_path / "c1.state").read_bytes())
        assert guest_blob[1] == MAP_STATE_VERSION and len(guest_blob) < whole
        fresh = EmulatedController.for_resuming("c1", tmp_path / "again.ns", 32 * MiB)
        try:
            again = await DestinationSession.reload(fresh, tmp_path / "c1.state", "c1", "mig-1", guest=fresh,
                                                    backend="emulated")
            assert again.guest_map is not None and again.guest_map.pieces == 3
            restored, running = decode_guest(fresh, again.guest_blob, again.guest_map)
            assert running and _map_of(restored, len(paused)) == paused
        finally:
            fresh.close()
        # The pieces are counted: every byte that went is in the steps' figures, once.
        assert sum(f.bytes_sent + f.state_bytes for f in facts) == facts[-1].total_bytes_sent
    finally:
        inbound.ctrl.close()


async def test_a_receiver_without_the_feature_gets_the_map_whole(
        tmp_path: Path, receiver: DataReceiver, monkeypatch: pytest.MonkeyPatch) -> None:
    # An agent of the version before: its HELLO ACK lists no features.
    monkeypatch.setattr(receiver_module, "FEATURES", ())
    _, inbound, _, paused = await _migrate(tmp_path, receiver, rounds=1)
    try:
        assert inbound.guest_map is None and not (tmp_path / "c1.guestmap").exists()
        assert inbound.workload is not None and _map_of(inbound.workload, len(paused)) == paused
    finally:
        inbound.ctrl.close()


async def test_a_damaged_journal_is_named_and_the_guest_does_not_start_from_a_wrong_map(
        tmp_path: Path, receiver: DataReceiver) -> None:
    _, inbound, _, _ = await _migrate(tmp_path, receiver, rounds=1)
    inbound.ctrl.close()
    journal = tmp_path / "c1.guestmap"
    journal.write_bytes(journal.read_bytes()[:-5])
    with pytest.raises(MapSyncError, match=f"guest map journal {journal} ends inside a"):
        read_journal(journal)
    fresh = EmulatedController.for_resuming("c1", tmp_path / "again.ns", 32 * MiB)
    try:
        again = await DestinationSession.reload(fresh, tmp_path / "c1.state", "c1", "mig-1", guest=fresh,
                                                backend="emulated")
        assert again.guest_map is None
        with pytest.raises(GuestStateError, match="the map this destination assembled is none"):
            decode_guest(fresh, again.guest_blob, again.guest_map)
    finally:
        fresh.close()
