"""The destination's guest map pieces on disk, as they arrive.

A destination keeps its final state in a file until the controller runs, so that an agent
restarted after the switchover commit can still resume it. With a map sync, that state carries
only the map's last changes; the rest of the map is here: every piece, appended (u32 length, then
the piece) as it was applied, so the journal rebuilds the same ``MapAssembly``. Writing the map
whole into the state file instead cost the paused guest about 2 MiB of page-cache writes per GiB.
Like the state file it is not fsynced: the namespace beside it arrived through the page cache too.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import BinaryIO

from agent.guest.map_sync import MapAssembly, MapSyncError

__all__ = ["MapJournal", "journal_path", "read_journal"]

_LENGTH = struct.Struct("<I")
SUFFIX = ".guestmap"


def journal_path(state_path: Path) -> Path:
    """Where the map journal of the destination whose state file is `state_path` goes."""
    return state_path.with_suffix(SUFFIX)


class MapJournal:
    """Appends pieces to one file; the owner calls ``close``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file: BinaryIO | None = None

    def append(self, piece: bytes) -> None:
        if self._file is None:
            self._file = open(self.path, "wb")
        self._file.write(_LENGTH.pack(len(piece)))
        self._file.write(piece)
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def remove(self) -> None:
        self.close()
        self.path.unlink(missing_ok=True)


def read_journal(path: Path) -> MapAssembly:
    """The map the journal at `path` holds; MapSyncError naming the file if it is damaged."""
    data = memoryview(path.read_bytes())
    assembly = MapAssembly()
    at = 0
    while at < len(data):
        if at + _LENGTH.size > len(data):
            raise MapSyncError(f"guest map journal {path} ends inside a piece's length at byte {at}")
        (length,) = _LENGTH.unpack_from(data, at)
        at += _LENGTH.size
        if at + length > len(data):
            raise MapSyncError(f"guest map journal {path} ends inside a {length}-byte piece at byte {at}")
        try:
            assembly.apply(data[at : at + length])
        except MapSyncError as exc:
            raise MapSyncError(f"guest map journal {path}: {exc}") from None
        at += length
    return assembly
