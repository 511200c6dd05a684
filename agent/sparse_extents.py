"""Where a namespace file holds data: SEEK_DATA/SEEK_HOLE ranges, block-aligned and merged.

The emulated namespace (a sparse file) and the real-device namespace (a block device, or a
sparse file in tests) both answer "which ranges must precopy send" with this.
"""

from __future__ import annotations

import errno
import os


def data_extents(fd: int, size_bytes: int, block_bytes: int) -> list[tuple[int, int]]:
    """(offset, length) of the ranges that may hold data, widened to whole blocks and merged.
    A file system that cannot report holes (EINVAL) makes the whole namespace one range."""
    merged: list[list[int]] = []
    pos = 0
    while pos < size_bytes:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:
                break  # no data after pos
            if exc.errno == errno.EINVAL:
                return [(0, size_bytes)]
            raise
        if start >= size_bytes:
            break
        stop = min(os.lseek(fd, start, os.SEEK_HOLE), size_bytes)
        lo = start // block_bytes * block_bytes
        hi = min(-(-stop // block_bytes) * block_bytes, size_bytes)
        if merged and lo <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], hi)
        else:
            merged.append([lo, hi])
        pos = stop
    return [(lo, hi - lo) for lo, hi in merged]
