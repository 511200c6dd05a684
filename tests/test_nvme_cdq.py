"""The Controller Data Queue: entry layout, phase tags, coalescing, and the queue-full rule."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.nvme import cdq
from agent.nvme.cdq import CdqReader, CdqRing, EntrySequence, LbaChange, UdmqEntry, UserDataLog

BLOCKS = 64


def make(entries: int) -> tuple[bytearray, UserDataLog, CdqReader]:
    memory = bytearray(entries * 32)
    return memory, UserDataLog(CdqRing(memoryview(memory), entries)), CdqReader(memoryview(memory), entries)


def drain(log: UserDataLog, reader: CdqReader) -> list[UdmqEntry]:
    """What a host does: read every new entry, then hand the slots back."""
    entries = [UdmqEntry(nsid, slba, nlb, attributes & 1, *cdq.describe(attributes))
               for nsid, slba, nlb, attributes in reader.take()]
    log.ring.set_head(reader.head)
    return entries


def test_entry_layout() -> None:
    entry = UdmqEntry(nsid=0x01020304, slba=0x1122334455667788, nlb=0x0A0B0C0D, phase=1,
                      sequence=EntrySequence.LAST_SUSPENDED, change=LbaChange.RANGE_VALID, deallocated=True)
    raw = entry.encode()
    assert raw.hex() == "04030201" "0d0c0b0a" "8877665544332211" + "00" * 15 + f"{1 | 3 << 1 | 1 << 5:02x}"
    assert UdmqEntry.decode(raw) == entry
    assert entry.blocks == 0x0A0B0C0E
    marker = UdmqEntry(phase=0, sequence=EntrySequence.LAST_QUEUE_FULL, change=LbaChange.ALL_CHANGED)
    assert marker.encode()[31] == 7 << 1 | 1 << 6


@settings(max_examples=200)
@given(st.integers(0, 0xFFFF_FFFF), st.integers(0, (1 << 64) - 1), st.integers(0, 0xFFFF_FFFF), st.integers(0, 1),
       st.sampled_from(EntrySequence), st.sampled_from(LbaChange), st.booleans())
def test_entry_round_trip(nsid: int, slba: int, nlb: int, phase: int, sequence: EntrySequence, change: LbaChange,
                          deallocated: bool) -> None:
    entry = UdmqEntry(nsid, slba, nlb, phase, sequence, change, deallocated)
    raw = entry.encode()
    assert len(raw) == 32
    assert UdmqEntry.decode(raw) == entry


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (bytes(31), "32 bytes, got 31"),
        (bytes(31) + bytes([0x10]), "reserved bits set"),
        (bytes(20) + b"\x01" + bytes(11), "reserved bits set"),
        (bytes(31) + bytes([4 << 1]), "reserved value"),  # ESA 4
        (bytes(31) + bytes([3 << 6]), "reserved value"),  # LBACIR 3
    ],
)
def test_bad_entries(raw: bytes, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        UdmqEntry.decode(raw)


def test_entries_for_size() -> None:
    assert cdq.entries_for(16) == 2
    assert cdq.entries_for(65536 * 8) == 65536
    for bad in (8, 12, 0):
        with pytest.raises(ValueError, match=f"queue size {bad} dwords"):
            cdq.entries_for(bad)


def test_phase_tag_flips_when_the_queue_wraps() -> None:
    memory, log, reader = make(4)  # room for two ranges between drains (one slot empty, one reserved)
    log.start()
    seen = []
    for lap in range(5):
        log.record(1, 10 * lap, 1)
        log.record(1, 10 * lap + 5, 1)  # not adjacent: a second entry
        log.flush()
        seen += [(e.slba, e.phase) for e in drain(log, reader)]
    # Slots 0,1 | 2,3 | 0,1 | 2,3 | 0,1: phase 1 on the first pass over the queue, 0 on the
    # second, 1 on the third.
    assert [phase for _, phase in seen] == [1, 1, 1, 1, 0, 0, 0, 0, 1, 1]
    assert [slba for slba, _ in seen] == [n for lap in range(5) for n in (10 * lap, 10 * lap + 5)]
    assert memory[31] & 1 == 1 and memory[2 * 32 + 31] & 1 == 0  # slot 0 from the 3rd pass, slot 2 the 2nd
    assert not log.overflowed


def test_first_and_last_entries_and_coalescing() -> None:
    _, log, reader = make(16)
    log.record(1, 0, 1)  # not logging yet: nothing
    log.start()
    log.start()  # idempotent
    for lba in (5, 6, 7, 4):  # adjacent writes, one growing range
        log.record(1, lba, 1)
    log.record(1, 6, 2)  # overlapping
    log.record(2, 8, 1)  # another namespace: a new range
    log.record(2, 9, 1, deallocated=True)  # another kind: a new range
    log.stop()
    entries = drain(log, reader)
    assert [(e.nsid, e.slba, e.blocks, e.sequence, e.change, e.deallocated) for e in entries] == [
        (1, 4, 4, EntrySequence.FIRST, LbaChange.RANGE_VALID, False),
        (2, 8, 1, EntrySequence.NONE, LbaChange.RANGE_VALID, False),
        (2, 9, 1, EntrySequence.LAST_STOPPED, LbaChange.RANGE_VALID, True),
    ]
    log.stop()  # already stopped: no marker
    log.start()
    log.stop(EntrySequence.LAST_SUSPENDED)  # nothing open: a marker without a range
    assert [(e.sequence, e.change) for e in drain(log, reader)] == [(EntrySequence.LAST_SUSPENDED, LbaChange.NONE)]


def test_a_full_queue_reports_all_lbas_changed_and_stops_logging() -> None:
    _, log, reader = make(4)  # 3 usable slots, the last kept for the entry that ends the session
    log.start()
    for lba in (0, 10, 20):
        log.record(1, lba, 1)
    log.record(1, 30, 1)  # posts 20 into the last free slot before the reserve: queue full
    assert not log.logging and log.overflowed
    log.record(1, 40, 1)  # not logged, and covered by the overflow entry
    with pytest.raises(cdq.CdqFullError, match="4-entry queue is full"):
        log.start()
    entries = drain(log, reader)
    assert [(e.slba, e.sequence, e.change) for e in entries] == [
        (0, EntrySequence.FIRST, LbaChange.RANGE_VALID),
        (10, EntrySequence.NONE, LbaChange.RANGE_VALID),
        (0, EntrySequence.LAST_QUEUE_FULL, LbaChange.ALL_CHANGED),
    ]
    log.start()  # the host made room: logging may start again
    log.record(1, 50, 1)
    log.flush()
    assert [(e.slba, e.sequence) for e in drain(log, reader)] == [(50, EntrySequence.FIRST)]


def test_head_pointer_checks() -> None:
    _, log, reader = make(8)
    log.start()
    log.record(1, 0, 1)
    log.flush()
    with pytest.raises(ValueError, match="head pointer 2 passes the tail 1"):
        log.ring.set_head(2)
    with pytest.raises(ValueError, match="head pointer 8 is outside the 8-entry queue"):
        log.ring.set_head(8)
    assert reader.has_at_least(1) and not reader.has_at_least(2)
    drain(log, reader)
    assert log.ring.head == 1 and not reader.has_at_least(1)


def test_a_huge_deallocation_is_split_into_entry_sized_ranges() -> None:
    _, log, reader = make(8)
    log.start()
    log.record(1, 0, 2 * cdq.MAX_RANGE_BLOCKS + 5, deallocated=True)
    log.stop()
    assert [(e.slba, e.blocks) for e in drain(log, reader)] == [
        (0, cdq.MAX_RANGE_BLOCKS), (cdq.MAX_RANGE_BLOCKS, cdq.MAX_RANGE_BLOCKS), (2 * cdq.MAX_RANGE_BLOCKS, 5)]


ops = st.lists(
    st.one_of(
        st.tuples(st.just("write"), st.integers(0, BLOCKS - 1), st.integers(1, 4), st.booleans()),
        st.tuples(st.just("drain")),
        st.tuples(st.just("take")),
    ),
    max_size=80,
)


@settings(max_examples=300, deadline=None)
@given(st.integers(2, 8), ops)
def test_no_change_is_ever_lost(entries: int, script: list[tuple[object, ...]]) -> None:
    """Whatever the queue size and however late the host reads, every change since the last take is
    in what the host takes: as a range, or as "all LBAs changed"."""
    _, log, reader = make(entries)
    log.start()
    dirty: set[int] = set()
    all_changed = False
    since_take: set[int] = set()

    def host_drain() -> None:
        nonlocal all_changed
        restart = False
        for e in drain(log, reader):
            if e.change == LbaChange.RANGE_VALID:
                dirty.update(range(e.slba, e.slba + e.blocks))
            elif e.change == LbaChange.ALL_CHANGED:
                all_changed = True
            restart |= e.sequence == EntrySequence.LAST_QUEUE_FULL
        if restart:
            log.start()

    for op in script:
        if op[0] == "write":
            _, lba, count, dealloc = op
            assert isinstance(lba, int) and isinstance(count, int) and isinstance(dealloc, bool)
            count = min(count, BLOCKS - lba)
            log.record(1, lba, count, dealloc)
            since_take.update(range(lba, lba + count))
        elif op[0] == "drain":
            host_drain()
        else:
            log.flush()
            host_drain()
            taken = set(range(BLOCKS)) if all_changed else set(dirty)
            assert since_take <= taken
            dirty.clear()
            all_changed = False
            since_take.clear()
    log.stop()
    host_drain()
    assert all_changed or since_take <= dirty
