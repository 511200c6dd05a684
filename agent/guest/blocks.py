"""Self-describing 4 KiB guest blocks (pure): each says which LBA, which write and which run of the
guest it belongs to.

Layout (format 2, magic ``NVMGBLK2``): a 32-byte header (8-byte magic, u64 LBA, u64 write sequence
number, u64 run id, little-endian) and 4064 bytes of filler derived from the header with one
blake2b call, so a block can be checked without keeping its contents anywhere: a lost write, a
misplaced write, a write of another run, a torn block and a never-written block each give a
different reason.

The run id is drawn at random each time a guest starts (see ``agent.guest.workload``): the LBA and
seq of a write are a pure function of (seed, seq), so without it a guest restored from an older
image would write byte-identical blocks and hide the writes it lost.

Format 1 (magic ``NVMGBLK1``, 24-byte header without a run id) is still read: its blocks count as
written by ``LEGACY_RUN_ID``, the run a guest state of version 1 is given when decoded.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass

BLOCK_BYTES = 4096
MAGIC = b"NVMGBLK2"
LEGACY_MAGIC = b"NVMGBLK1"
LEGACY_RUN_ID = 0  # never drawn for a new run
_HEADER = struct.Struct("<8sQQQ")
_LEGACY_HEADER = struct.Struct("<8sQQ")
HEADER_BYTES = _HEADER.size
_ZEROS = bytes(BLOCK_BYTES)
_U64_LIMIT = 1 << 64


def run_label(run_id: int) -> str:
    """How a run id is shown to people: 16 hex digits."""
    return f"{run_id:016x}"


@dataclass(frozen=True)
class BlockId:
    """What a block's header claims: the write (seq) of which run (run_id) put it at which LBA."""

    lba: int
    seq: int
    run_id: int


def _fill(header: bytes) -> bytes:
    digest = hashlib.blake2b(header, digest_size=64).digest()
    filler = BLOCK_BYTES - len(header)
    # Repeat the digest and cut: cheaper than hashing more.
    return header + (digest * (filler // 64 + 1))[:filler]


def _check_u64(**values: int) -> None:
    for name, value in values.items():
        if not 0 <= value < _U64_LIMIT:
            raise ValueError(f"{name}={value} must fit an unsigned 64-bit integer")


def make_block(lba: int, seq: int, run_id: int) -> bytes:
    """The 4096 bytes run ``run_id`` of the guest writes to ``lba`` in its write ``seq`` (0 = prefill)."""
    _check_u64(lba=lba, seq=seq, run_id=run_id)
    return _fill(_HEADER.pack(MAGIC, lba, seq, run_id))


def make_legacy_block(lba: int, seq: int) -> bytes:
    """A block as format 1 wrote it (no run id): what an older agent left in a namespace."""
    _check_u64(lba=lba, seq=seq)
    return _fill(_LEGACY_HEADER.pack(LEGACY_MAGIC, lba, seq))


def block_id(data: bytes) -> BlockId | None:
    """What a block's header claims, or None if it has no valid header (either format)."""
    if len(data) != BLOCK_BYTES:
        return None
    magic = data[:8]
    if magic == MAGIC:
        _m, lba, seq, run_id = _HEADER.unpack_from(data)
        return BlockId(lba, seq, run_id)
    if magic == LEGACY_MAGIC:
        _m, lba, seq = _LEGACY_HEADER.unpack_from(data)
        return BlockId(lba, seq, LEGACY_RUN_ID)
    return None


def block_seq(data: bytes) -> int | None:
    """The sequence number a block's header claims, or None if it has no valid header."""
    held = block_id(data)
    return held.seq if held is not None else None


def _expected_bytes(data: bytes, lba: int, seq: int, run_id: int) -> bytes:
    if data[:8] == LEGACY_MAGIC:
        return make_legacy_block(lba, seq)
    return make_block(lba, seq, run_id)


def check_block(data: bytes, lba: int, seq: int, run_id: int) -> str | None:
    """None if ``data`` is exactly what write ``seq`` of run ``run_id`` put at ``lba``; otherwise why not."""
    if len(data) != BLOCK_BYTES:
        return f"lba {lba}: block is {len(data)} bytes, expected {BLOCK_BYTES}"
    if data == _ZEROS:
        return f"lba {lba}: never written (zeros)"
    held = block_id(data)
    if held is None:
        return f"lba {lba}: header corrupt (magic {data[:8]!r})"
    if held.lba != lba:
        return f"lba {lba}: holds the block of lba {held.lba} (seq {held.seq}), a misplaced write"
    if held.seq != seq:
        return f"lba {lba}: holds seq {held.seq}, expected seq {seq}"
    if held.run_id != run_id:
        return (f"lba {lba}: holds seq {seq} of run {run_label(held.run_id)}, but in the guest's history "
                f"seq {seq} is of run {run_label(run_id)}; the block's write is not acknowledged by this "
                "history (the guest resumed from an older image)")
    if data != _expected_bytes(data, lba, seq, run_id):
        return f"lba {lba}: filler corrupt"
    return None
