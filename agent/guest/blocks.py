"""Self-describing 4 KiB guest blocks (pure): each says which LBA and which write it belongs to.

Layout: a 24-byte header (8-byte magic, u64 LBA, u64 write sequence number, little-endian) and
4072 bytes of filler derived from the header with one blake2b call, so a block can be checked
without keeping its contents anywhere: a lost write, a misplaced write, a torn block and a
never-written block each give a different reason.
"""

from __future__ import annotations

import hashlib
import struct

BLOCK_BYTES = 4096
MAGIC = b"NVMGBLK1"
_HEADER = struct.Struct("<8sQQ")
HEADER_BYTES = _HEADER.size
_FILLER_BYTES = BLOCK_BYTES - HEADER_BYTES
_ZEROS = bytes(BLOCK_BYTES)
_U64_LIMIT = 1 << 64


def make_block(lba: int, seq: int) -> bytes:
    """The 4096 bytes the guest writes to ``lba`` in its write number ``seq`` (0 = prefill)."""
    if not 0 <= lba < _U64_LIMIT or not 0 <= seq < _U64_LIMIT:
        raise ValueError(f"lba={lba} and seq={seq} must both fit an unsigned 64-bit integer")
    header = _HEADER.pack(MAGIC, lba, seq)
    digest = hashlib.blake2b(header, digest_size=64).digest()
    # 4072 = 63 * 64 + 40: repeat the digest and cut, cheaper than hashing more.
    return header + (digest * (_FILLER_BYTES // 64 + 1))[:_FILLER_BYTES]


def block_seq(data: bytes) -> int | None:
    """The sequence number a block's header claims, or None if it has no valid header."""
    if len(data) != BLOCK_BYTES:
        return None
    magic, _lba, seq = _HEADER.unpack_from(data)
    return seq if magic == MAGIC else None


def check_block(data: bytes, lba: int, seq: int) -> str | None:
    """None if ``data`` is exactly what write ``seq`` put at ``lba``; otherwise why not."""
    if len(data) != BLOCK_BYTES:
        return f"lba {lba}: block is {len(data)} bytes, expected {BLOCK_BYTES}"
    if data == _ZEROS:
        return f"lba {lba}: never written (zeros)"
    magic, held_lba, held_seq = _HEADER.unpack_from(data)
    if magic != MAGIC:
        return f"lba {lba}: header corrupt (magic {magic!r})"
    if held_lba != lba:
        return f"lba {lba}: holds the block of lba {held_lba} (seq {held_seq}), a misplaced write"
    if held_seq != seq:
        return f"lba {lba}: holds seq {held_seq}, expected seq {seq}"
    if data != make_block(lba, seq):
        return f"lba {lba}: filler corrupt"
    return None
