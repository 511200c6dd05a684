"""The guest's map of acknowledged blocks, sent while the guest runs. Pure.

The map (one u64 per LBA: 2 MiB per GiB of namespace) is part of the guest's state and moves with
it. Sent whole at the switchover it cost the paused guest its compression on the source and its
decompression on the destination (about 17 and 7 ms per GiB). Instead the source sends it
like the namespace: a base while the guest runs, then after each copy round the entries that
changed since the piece before, and at the switchover only those changed since the last round.

A sync is named by a random 64-bit id, drawn when the base is taken: every piece carries it, so
pieces of two syncs (a rolled-back attempt and the next) never mix. Pieces, all little-endian:

    kind u8 (1 BASE, 2 DELTA), 3 reserved bytes, sync id u64, block count u64, first LBA u64, count u32
    BASE:  count values, for LBAs first .. first + count - 1 (bases come in order from LBA 0)
    DELTA: count LBAs, then count values (first LBA is 0)

``MapAssembly`` rebuilds the map from the pieces on the destination; it refuses a piece that
does not continue what it holds, naming what it expected.
"""

from __future__ import annotations

import struct
import sys
from array import array
from collections.abc import Iterator

__all__ = ["BASE_PIECE_BLOCKS", "MapAssembly", "MapSyncError", "base_pieces", "decode_delta_body",
           "delta_body", "delta_piece"]

_KIND_BASE = 1
_KIND_DELTA = 2
_PIECE = struct.Struct("<B3xQQQI")
# Up to 4 MiB of values per base piece: well under the data plane's frame limit.
BASE_PIECE_BLOCKS = 512 * 1024
_COUNT = struct.Struct("<I")


class MapSyncError(ValueError):
    """A map piece that is malformed or does not continue the map being assembled."""


def _le(values: array[int]) -> bytes:
    if sys.byteorder == "big":
        values = array("Q", values)
        values.byteswap()
    return values.tobytes()


def _from_le(raw: bytes | memoryview) -> array[int]:
    values = array("Q")
    values.frombytes(raw)
    if sys.byteorder == "big":
        values.byteswap()
    return values


def base_pieces(sync_id: int, acked: array[int], piece_blocks: int = BASE_PIECE_BLOCKS) -> Iterator[bytes]:
    """The whole map as BASE pieces, in LBA order."""
    blocks = len(acked)
    for first in range(0, blocks, piece_blocks):
        values = acked[first : first + piece_blocks]
        yield _PIECE.pack(_KIND_BASE, sync_id, blocks, first, len(values)) + _le(values)


def delta_body(lbas: list[int], values: list[int]) -> bytes:
    """count u32, the LBAs, then their values: the changed entries, also as the switchover's map."""
    return _COUNT.pack(len(lbas)) + _le(array("Q", lbas)) + _le(array("Q", values))


def decode_delta_body(body: bytes | memoryview, blocks: int) -> tuple[array[int], array[int]]:
    if len(body) < _COUNT.size:
        raise MapSyncError(f"map delta of {len(body)} bytes is shorter than its count")
    (count,) = _COUNT.unpack_from(body)
    if len(body) != _COUNT.size + 16 * count:
        raise MapSyncError(f"map delta says {count} entries ({_COUNT.size + 16 * count} bytes) but is "
                           f"{len(body)} bytes")
    view = memoryview(body)
    lbas = _from_le(view[_COUNT.size : _COUNT.size + 8 * count])
    values = _from_le(view[_COUNT.size + 8 * count :])
    if count and max(lbas) >= blocks:
        raise MapSyncError(f"map delta names LBA {max(lbas)} of a map of {blocks} blocks")
    return lbas, values


def delta_piece(sync_id: int, blocks: int, lbas: list[int], values: list[int]) -> bytes:
    return _PIECE.pack(_KIND_DELTA, sync_id, blocks, 0, len(lbas)) + _le(array("Q", lbas)) + _le(array("Q", values))


class MapAssembly:
    """The destination's copy of the map, built from the pieces in the order they were sent."""

    def __init__(self) -> None:
        self.sync_id = 0
        self.acked = array("Q")
        self.block_count = 0
        self.pieces = 0

    @property
    def complete(self) -> bool:
        return self.sync_id != 0 and len(self.acked) == self.block_count

    def apply(self, piece: bytes | memoryview) -> None:
        if len(piece) < _PIECE.size:
            raise MapSyncError(f"map piece of {len(piece)} bytes is shorter than its {_PIECE.size}-byte header")
        kind, sync_id, blocks, first, count = _PIECE.unpack_from(piece)
        body = memoryview(piece)[_PIECE.size :]
        if kind == _KIND_BASE:
            self._apply_base(sync_id, blocks, first, count, body)
        elif kind == _KIND_DELTA:
            self._check_sync(sync_id, blocks)
            if not self.complete:
                raise MapSyncError(f"map delta of sync {sync_id:#x} before its base was complete "
                                   f"({len(self.acked)} of {blocks} blocks)")
            self.apply_delta(_COUNT.pack(count) + body.tobytes())
        else:
            raise MapSyncError(f"map piece of unknown kind {kind}")
        self.pieces += 1

    def apply_delta(self, body: bytes | memoryview) -> None:
        """Changed entries (a ``delta_body``) onto the complete map."""
        lbas, values = decode_delta_body(body, self.block_count)
        acked = self.acked
        for lba, value in zip(lbas, values, strict=True):
            acked[lba] = value

    def _apply_base(self, sync_id: int, blocks: int, first: int, count: int, body: memoryview) -> None:
        if first == 0:
            # A new sync starts over (there is one per connection; this is belt and braces).
            self.sync_id, self.block_count, self.acked, self.pieces = sync_id, blocks, array("Q"), 0
        self._check_sync(sync_id, blocks)
        if first != len(self.acked):
            raise MapSyncError(f"map base piece for LBA {first} of sync {sync_id:#x} out of order "
                               f"(expected LBA {len(self.acked)})")
        if len(body) != 8 * count or first + count > blocks:
            raise MapSyncError(f"map base piece for LBAs {first}+{count} of {blocks} carries {len(body)} bytes")
        self.acked.extend(_from_le(body))

    def _check_sync(self, sync_id: int, blocks: int) -> None:
        if sync_id == 0 or sync_id != self.sync_id:
            raise MapSyncError(f"map piece of sync {sync_id:#x} does not continue sync {self.sync_id:#x}")
        if blocks != self.block_count:
            raise MapSyncError(f"map piece for {blocks} blocks in sync {sync_id:#x} of {self.block_count} blocks")
