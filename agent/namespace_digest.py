"""The digest that says two namespaces hold the same data: over content, not over allocation.

A namespace's copies on the source and the destination hold the same blocks but not the same
allocation: holes travel as nothing, a deallocated block may arrive as written zeroes. So the
digest skips zero blocks, whatever their allocation, and hashes the others with their place:
XXH3-128 over, in LBA order, each non-zero 4 KiB block, preceded by ``b"@" + lba`` (little-endian
u64) wherever it does not follow the previous non-zero block; written ``xxh3-128:`` and 32 hex
digits. (It was sha256 until 2026-12: at 1.4 GB/s, hashing both copies took as much CPU as
moving them, and an evacuation runs many at once. XXH3 runs at many GB/s; the digest guards
against lost or corrupted blocks, not against an agent that lies, which could report anything.)
Only allocated extents need reading (a hole is zeroes), so hashing a sparse 200 GiB namespace
with 1 GiB written reads 1 GiB; data comes in chunks, so a caller can hold a lock per chunk and
never for the whole pass.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import xxhash

BLOCK_BYTES = 4096
CHUNK_BYTES = 1 << 20
ALGORITHM = "xxh3-128"
_ZERO_BLOCK = bytes(BLOCK_BYTES)


class ContentDigest:
    """Feed block-aligned chunks in increasing offset order (gaps are zeroes), then `hexdigest()`."""

    def __init__(self) -> None:
        self._hash = xxhash.xxh3_128()
        self._next_lba = -1  # the block after the last non-zero one hashed
        self._end = 0  # bytes covered so far; chunks must not go back

    def update(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data).cast("B")
        if offset % BLOCK_BYTES or len(view) % BLOCK_BYTES:
            raise ValueError(f"chunk at offset {offset} of {len(view)} bytes is not whole {BLOCK_BYTES}-byte blocks")
        if offset < self._end:
            raise ValueError(f"chunk at offset {offset} goes back before {self._end}: feed chunks in order")
        self._end = offset + len(view)
        first = offset // BLOCK_BYTES
        if len(view) and isinstance(data, bytes | bytearray) and _ZERO_BLOCK not in data:
            # No 4 KiB run of zeroes anywhere, so no zero block: one update, not one per block
            # (a Python loop over every block held the GIL long enough to stall a guest).
            if first != self._next_lba:
                self._hash.update(b"@" + first.to_bytes(8, "little"))
            self._hash.update(view)
            self._next_lba = first + len(view) // BLOCK_BYTES
            return
        run_start: int | None = None  # index (in blocks) of the non-zero run being gathered
        for k in range(len(view) // BLOCK_BYTES):
            if view[k * BLOCK_BYTES:(k + 1) * BLOCK_BYTES] == _ZERO_BLOCK:
                if run_start is not None:
                    self._hash.update(view[run_start * BLOCK_BYTES:k * BLOCK_BYTES])
                    run_start = None
                continue
            if run_start is None:
                if first + k != self._next_lba:
                    self._hash.update(b"@" + (first + k).to_bytes(8, "little"))
                run_start = k
            self._next_lba = first + k + 1
        if run_start is not None:
            self._hash.update(view[run_start * BLOCK_BYTES:])

    def hexdigest(self) -> str:
        return f"{ALGORITHM}:{self._hash.hexdigest()}"



def merge_extents(extents: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """(offset, length) ranges in any order, overlapping or touching, as sorted disjoint ranges."""
    merged: list[tuple[int, int]] = []
    for offset, length in sorted(extents):
        if merged and offset <= merged[-1][0] + merged[-1][1]:
            start, span = merged[-1]
            merged[-1] = (start, max(span, offset + length - start))
        elif length > 0:
            merged.append((offset, length))
    return merged


def chunks(extents: Iterable[tuple[int, int]], chunk_bytes: int = CHUNK_BYTES) -> Iterable[tuple[int, int]]:
    """Sorted, block-aligned (offset, length) extents cut into pieces of at most `chunk_bytes`."""
    for offset, length in extents:
        end = offset + length
        while offset < end:
            piece = min(chunk_bytes, end - offset)
            yield offset, piece
            offset += piece


def digest_extents(extents: Iterable[tuple[int, int]], read: Callable[[int, int], bytes]) -> str:
    """The content digest of a namespace whose data lies in `extents` (the rest reads as zeroes)."""
    digest = ContentDigest()
    for offset, length in chunks(extents):
        digest.update(offset, read(offset, length))
    return digest.hexdigest()
