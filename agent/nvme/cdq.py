"""Controller Data Queue (TP4159) for user data migration: entry format, controller-side log, host reader (pure).

A migration controller creates a User Data Migration Queue in host memory for a migratable
controller (Controller Data Queue command, SEL 0) and turns logging on with Track Send.  The
controller then posts one 32-byte entry per changed LBA range; the host finds new entries by
their phase tag, exactly as it finds completions, and hands slots back by moving the head pointer
(Set Features, FID 21h).

Entry layout (little endian), the one DESIGN.md gives, with the attribute bits as libvfn's
``examples/migrate.c`` and nvme-cli's ``plugins/lm`` decode them::

    0   4  NSID
    4   4  NLB     number of logical blocks, zero-based (as in the I/O commands' NLB)
    8   8  SLBA
    16 15  reserved
    31  1  attributes: bit 0 phase tag; bits 3:1 entry sequence attribute (ESA); bit 4 reserved;
           bit 5 DLBA (the range was deallocated, our use of that bit); bits 7:6 LBA change
           information (0 range valid, 1 all LBAs changed, 2 no range reported)

Queue-full rule (ours; the specification only says the controller reports it): one slot is always
left empty, as in every NVMe queue, and one more is kept for the entry that ends logging.  When a
range does not fit, the controller posts, instead, an entry with "all LBAs changed" and ESA
"last; queue full" and stops logging; every change from then on is covered by that entry, so the
host must copy the whole namespace again after it has turned logging back on.  No change is ever
silently lost.

Coalescing (the emulated model's own behaviour, not the specification's): the controller keeps
the newest range open while later changes extend it (same namespace, same kind, adjacent or
overlapping) and posts it when a change does not fit it, when logging stops, when the controller
is suspended, or when the host reads the queue's feature (Get Features, FID 21h).  The host
driver asks for that feature before it reads the queue, which costs a real controller one admin
command and lets the model's open range reach the host; a sequential writer thus produces one
entry instead of thousands.  The host never uses a tail pointer from the controller: it finds
new entries by their phase tag.

The queue's feature (FID 21h) moves data, not completion dwords: Get Features returns the
8-byte structure ``{le32 head pointer, le32 tail pointer trigger}`` (libnvme
``struct nvme_lm_ctrl_data_queue_fid_data``) in a buffer the host supplies; Set Features takes
the head pointer in CDW12 and, with ETPT (CDW11 bit 31), the tail pointer trigger in CDW13.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass
from enum import IntEnum

from agent.nvme.spec import CDQ_ENTRY_BYTES, CDQ_FEATURE_DATA_BYTES

_ENTRY = struct.Struct("<IIQ15xB")
assert _ENTRY.size == CDQ_ENTRY_BYTES
_POINTERS = struct.Struct("<II")
assert _POINTERS.size == CDQ_FEATURE_DATA_BYTES

_PHASE = 0x01
_ESA_SHIFT, _ESA_MASK = 1, 0x7
_DLBA = 0x20
_LBACIR_SHIFT, _LBACIR_MASK = 6, 0x3
_RESERVED_ATTRIBUTE_BITS = 0x10
MAX_RANGE_BLOCKS = 1 << 32  # NLB is a 32-bit zero-based count
MIN_ENTRIES = 2


class EntrySequence(IntEnum):
    """ESA: where an entry sits in a logging session."""

    NONE = 0x0
    FIRST = 0x1  # the first entry after Track Send started logging
    LAST_STOPPED = 0x2  # logging stopped by Track Send
    LAST_SUSPENDED = 0x3  # logging stopped because the controller was suspended
    LAST_QUEUE_FULL = 0x7  # logging stopped because the queue filled up


class LbaChange(IntEnum):
    """LBACIR: what the entry's range means."""

    RANGE_VALID = 0x0
    ALL_CHANGED = 0x1
    NONE = 0x2


@dataclass(frozen=True)
class UdmqEntry:
    """One User Data Migration Queue entry."""

    nsid: int = 0
    slba: int = 0
    nlb: int = 0  # zero-based
    phase: int = 0
    sequence: EntrySequence = EntrySequence.NONE
    change: LbaChange = LbaChange.RANGE_VALID
    deallocated: bool = False

    def __post_init__(self) -> None:
        for name, value, limit in (("nsid", self.nsid, 0xFFFF_FFFF), ("slba", self.slba, (1 << 64) - 1),
                                   ("nlb", self.nlb, 0xFFFF_FFFF), ("phase", self.phase, 1)):
            if not isinstance(value, int) or not 0 <= value <= limit:
                raise ValueError(f"{name}={value!r} does not fit the entry field (0..{limit:#x})")

    @property
    def blocks(self) -> int:
        return self.nlb + 1

    @property
    def attributes(self) -> int:
        return (self.phase | EntrySequence(self.sequence) << _ESA_SHIFT | (_DLBA if self.deallocated else 0)
                | LbaChange(self.change) << _LBACIR_SHIFT)

    def encode(self) -> bytes:
        return _ENTRY.pack(self.nsid, self.nlb, self.slba, self.attributes)

    @classmethod
    def decode(cls, raw: bytes) -> UdmqEntry:
        if len(raw) != CDQ_ENTRY_BYTES:
            raise ValueError(f"a user data migration queue entry is {CDQ_ENTRY_BYTES} bytes, got {len(raw)}")
        nsid, nlb, slba, attributes = _ENTRY.unpack(raw)
        if attributes & _RESERVED_ATTRIBUTE_BITS or any(raw[16:31]):
            raise ValueError(f"entry has reserved bits set (attributes {attributes:#04x}, "
                             f"bytes 16..30 {raw[16:31].hex()})")
        try:
            sequence = EntrySequence(attributes >> _ESA_SHIFT & _ESA_MASK)
            change = LbaChange(attributes >> _LBACIR_SHIFT & _LBACIR_MASK)
        except ValueError as exc:
            raise ValueError(f"entry attributes {attributes:#04x} hold a reserved value: {exc}") from None
        return cls(nsid, slba, nlb, attributes & _PHASE, sequence, change, bool(attributes & _DLBA))


def encode_pointers(head: int, tail_trigger: int) -> bytes:
    """The Get Features FID 21h data: le32 head pointer, le32 tail pointer trigger."""
    return _POINTERS.pack(head, tail_trigger)


def decode_pointers(data: bytes) -> tuple[int, int]:
    """(head pointer, tail pointer trigger) from Get Features FID 21h data."""
    if len(data) < CDQ_FEATURE_DATA_BYTES:
        raise ValueError(f"controller data queue feature data is {CDQ_FEATURE_DATA_BYTES} bytes, got {len(data)}: "
                         "the Get Features command needs an 8-byte data buffer")
    head, trigger = _POINTERS.unpack_from(data)
    return int(head), int(trigger)


def entry_lbas(slba: int, nlb: int, namespace_blocks: int) -> range:
    """The LBAs a range-valid entry names (NLB zero-based); ValueError names the fields when the range
    leaves the namespace.  The host expands a range into LBAs, so an entry from a broken or hostile
    device claiming four billion blocks must be refused before it is expanded."""
    if not 0 <= slba <= slba + nlb < namespace_blocks:
        raise ValueError(f"entry range slba={slba} nlb={nlb} (zero-based) is outside the "
                         f"{namespace_blocks}-block namespace")
    return range(slba, slba + nlb + 1)


def entries_for(size_dwords: int) -> int:
    """Entries in a queue of ``size_dwords`` (the CDQ create command's size field)."""
    per_entry = CDQ_ENTRY_BYTES // 4
    if size_dwords % per_entry or size_dwords // per_entry < MIN_ENTRIES:
        raise ValueError(f"queue size {size_dwords} dwords is not a whole number of at least {MIN_ENTRIES} "
                         f"{CDQ_ENTRY_BYTES}-byte entries")
    return size_dwords // per_entry


def _check_buffer(buffer: memoryview, entries: int) -> None:
    if entries < MIN_ENTRIES or len(buffer) < entries * CDQ_ENTRY_BYTES:
        raise ValueError(f"a {entries}-entry queue needs {entries * CDQ_ENTRY_BYTES} bytes and at least "
                         f"{MIN_ENTRIES} entries; the buffer has {len(buffer)} bytes")


class CdqFullError(Exception):
    """Logging cannot start: the queue has no free slot until the host moves the head."""


class CdqRing:
    """Controller side of the queue: posts entries at the tail into the host's buffer."""

    def __init__(self, buffer: memoryview, entries: int) -> None:
        _check_buffer(buffer, entries)
        self._buffer = buffer
        self.entries = entries
        self.head = 0
        self.tail = 0
        self.phase = 1  # the first pass writes phase 1 over the host's zeroed memory

    @property
    def used(self) -> int:
        return (self.tail - self.head) % self.entries

    def post(self, nsid: int, slba: int, nlb: int, sequence: EntrySequence, change: LbaChange,
             deallocated: bool) -> None:
        if self.used >= self.entries - 1:
            raise AssertionError("posting into a full controller data queue")  # UserDataLog prevents this
        attributes = (self.phase | sequence << _ESA_SHIFT | (_DLBA if deallocated else 0)
                      | change << _LBACIR_SHIFT)
        _ENTRY.pack_into(self._buffer, self.tail * CDQ_ENTRY_BYTES, nsid, nlb, slba, attributes)
        self.tail += 1
        if self.tail == self.entries:
            self.tail = 0
            self.phase ^= 1

    def set_head(self, head: int) -> None:
        """The host returned slots up to ``head``; it may not pass the tail."""
        if not 0 <= head < self.entries:
            raise ValueError(f"head pointer {head} is outside the {self.entries}-entry queue")
        if (head - self.head) % self.entries > self.used:
            raise ValueError(f"head pointer {head} passes the tail {self.tail} (head was {self.head})")
        self.head = head


class UserDataLog:
    """The controller's logging of user data changes into one queue (Track Send, LACT start/stop)."""

    def __init__(self, ring: CdqRing) -> None:
        self.ring = ring
        self.logging = False
        self.overflowed = False  # logging ended with "all LBAs changed"
        self._first = False  # the next entry is the first of a session
        # The open range: (nsid, first lba, end lba exclusive, deallocated), not yet posted.
        self._open: tuple[int, int, int, bool] | None = None

    def start(self) -> None:
        """Track Send, LACT start: idempotent while logging."""
        if self.logging:
            return
        if self.ring.used >= self.ring.entries - 1:
            raise CdqFullError(f"the {self.ring.entries}-entry queue is full ({self.ring.used} entries not "
                               "consumed); move the head pointer first")
        self.logging = True
        self.overflowed = False
        self._first = True

    def record(self, nsid: int, slba: int, blocks: int, deallocated: bool = False) -> None:
        """A command changed ``blocks`` LBAs from ``slba``."""
        if not self.logging:
            return
        end = slba + blocks
        if self._open is not None:
            o_nsid, o_start, o_end, o_dealloc = self._open
            if (o_nsid == nsid and o_dealloc == deallocated and slba <= o_end and end >= o_start
                    and max(end, o_end) - min(slba, o_start) <= MAX_RANGE_BLOCKS):
                self._open = (nsid, min(slba, o_start), max(end, o_end), deallocated)
                return
            self._post_open(EntrySequence.NONE)
            if not self.logging:  # the queue filled up: the overflow entry covers this change too
                return
        while end - slba > MAX_RANGE_BLOCKS:  # only for huge deallocations
            self._open = (nsid, slba, slba + MAX_RANGE_BLOCKS, deallocated)
            self._post_open(EntrySequence.NONE)
            if not self.logging:
                return
            slba += MAX_RANGE_BLOCKS
        self._open = (nsid, slba, end, deallocated)

    def flush(self) -> None:
        """Post the open range, if any (the host is about to read the pointers)."""
        if self.logging and self._open is not None:
            self._post_open(EntrySequence.NONE)

    def stop(self, why: EntrySequence = EntrySequence.LAST_STOPPED) -> None:
        """End logging: the open range, or a marker without a range, carries ``why``."""
        if not self.logging:
            return
        if self._open is not None:
            self._post_open(why)
        else:
            self._post(0, 0, 0, why, LbaChange.NONE, False)
        self.logging = False

    def _post_open(self, sequence: EntrySequence) -> None:
        assert self._open is not None
        nsid, start, end, deallocated = self._open
        self._open = None
        self._post(nsid, start, end - start - 1, sequence, LbaChange.RANGE_VALID, deallocated)

    def _post(self, nsid: int, slba: int, nlb: int, sequence: EntrySequence, change: LbaChange,
              deallocated: bool) -> None:
        ending = sequence != EntrySequence.NONE
        # Keep the last free slot for the entry that ends the session, so an overflow can always
        # be reported.
        if not ending and self.ring.used >= self.ring.entries - 2:
            self._open = None
            self.ring.post(0, 0, 0, EntrySequence.LAST_QUEUE_FULL, LbaChange.ALL_CHANGED, False)
            self.logging = False
            self.overflowed = True
            return
        if self._first and not ending:
            sequence = EntrySequence.FIRST
        self._first = False
        self.ring.post(nsid, slba, nlb, sequence, change, deallocated)


class CdqReader:
    """Host side of the queue: finds new entries by phase tag and tracks the head it will report."""

    def __init__(self, buffer: memoryview, entries: int) -> None:
        _check_buffer(buffer, entries)
        self._buffer = buffer
        self.entries = entries
        self.head = 0
        self.phase = 1

    def has_at_least(self, count: int) -> bool:
        """Whether ``count`` new entries are posted: one look at the phase tag of the count-th slot."""
        if not 0 < count < self.entries:
            return False
        slot = self.head + count - 1
        phase = self.phase
        if slot >= self.entries:
            slot -= self.entries
            phase ^= 1
        return self._buffer[slot * CDQ_ENTRY_BYTES + CDQ_ENTRY_BYTES - 1] & _PHASE == phase

    def take(self) -> Iterator[tuple[int, int, int, int]]:
        """Consume every new entry as (nsid, slba, nlb, attributes), advancing the head."""
        buffer, entries = self._buffer, self.entries
        while True:
            nsid, nlb, slba, attributes = _ENTRY.unpack_from(buffer, self.head * CDQ_ENTRY_BYTES)
            if attributes & _PHASE != self.phase:
                return
            self.head += 1
            if self.head == entries:
                self.head = 0
                self.phase ^= 1
            yield nsid, slba, nlb, attributes


def sequence_of(attributes: int) -> int:
    """The ESA of an entry's attribute byte (compare with EntrySequence)."""
    return attributes >> _ESA_SHIFT & _ESA_MASK


def change_of(attributes: int) -> int:
    """The LBACIR of an entry's attribute byte (compare with LbaChange)."""
    return attributes >> _LBACIR_SHIFT & _LBACIR_MASK


def describe(attributes: int) -> tuple[EntrySequence, LbaChange, bool]:
    """(sequence, change, deallocated) of an entry's attribute byte, as enum members."""
    return EntrySequence(sequence_of(attributes)), LbaChange(change_of(attributes)), bool(attributes & _DLBA)
