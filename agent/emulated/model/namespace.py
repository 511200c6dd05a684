"""A namespace's storage: a sparse file of 4096-byte blocks, with copy-on-write snapshots.

Both paths to the data meet here: the controller model's I/O commands (Read, Write, Write Zeroes,
Dataset Management) and the migration controller's direct access used for bulk copies
(``read``/``write``, allocated extents, digests).  Every call takes the subsystem lock, which is
re-entrant, so a command and a snapshot see each other's changes whole.

A snapshot is a copy-on-write view: before any change to a block, its old contents are saved in
each open snapshot.  It costs at most the blocks overwritten while it is open, so close it as soon
as its digest is taken.  Deallocating a large range while a snapshot is open saves that whole range
in memory.
"""

from __future__ import annotations

import ctypes
import errno
import os
from pathlib import Path
from threading import RLock
from types import TracebackType

from agent.controller_errors import ControllerGoneError, LbaOutOfRangeError
from agent.namespace_digest import ContentDigest, chunks, merge_extents
from agent.nvme.spec import LBA_BYTES
from agent.sparse_extents import data_extents

CHUNK_BYTES = 1 << 20
_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_libc = ctypes.CDLL(None, use_errno=True)
_fallocate = _libc.fallocate
_fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
_fallocate.restype = ctypes.c_int


def _punch_hole(fd: int, offset: int, length: int) -> bool:
    """Deallocate a byte range (it reads as zeros after); False if the file system cannot."""
    if _fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EOPNOTSUPP, errno.ENOSYS):
        return False
    raise OSError(err, f"fallocate(PUNCH_HOLE) at {offset} for {length} bytes failed: {os.strerror(err)}")


class NamespaceSnapshot:
    """Copy-on-write view of a namespace as it was when ``NamespaceStore.begin_snapshot`` ran."""

    def __init__(self, store: NamespaceStore) -> None:
        self._store = store
        self.saved: dict[int, bytes] = {}
        self.closed = False

    def digest(self) -> str:
        """The content digest (agent.namespace_digest) of the namespace when the snapshot was taken."""
        return self._store._snapshot_digest(self)

    def close(self) -> None:
        self._store._drop_snapshot(self)

    def __enter__(self) -> NamespaceSnapshot:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class NamespaceStore:
    """The blocks of one namespace in a sparse file; ``label`` names the owner in error messages."""

    def __init__(self, path: Path, size_bytes: int, *, create: bool, lock: RLock, label: str) -> None:
        if not isinstance(size_bytes, int) or size_bytes <= 0 or size_bytes % LBA_BYTES:
            raise ValueError(f"namespace_bytes={size_bytes!r} must be a positive multiple of {LBA_BYTES}")
        self.path = Path(path)
        self.size_bytes = size_bytes
        self.block_count = size_bytes // LBA_BYTES
        self.lock = lock
        self.label = label
        self._gone = ""
        self._snapshots: list[NamespaceSnapshot] = []
        if create:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            except FileExistsError:
                raise FileExistsError(
                    f"namespace file {self.path} already exists; pass create=False to open it, or remove it first"
                ) from None
            try:
                os.ftruncate(fd, size_bytes)
            except BaseException:
                os.close(fd)
                self.path.unlink(missing_ok=True)
                raise
        else:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC)
            except FileNotFoundError:
                raise FileNotFoundError(f"namespace file {self.path} does not exist; pass create=True to make it") \
                    from None
            size = os.fstat(fd).st_size
            if size != size_bytes:
                os.close(fd)
                raise ValueError(f"namespace file {self.path} is {size} bytes but namespace_bytes={size_bytes}; "
                                 "pass the size it was created with")
        self._fd: int | None = fd

    # ----- access -------------------------------------------------------------------------------

    def usable_fd(self) -> int:
        if self._fd is None:
            raise ControllerGoneError(f"{self.label} was {self._gone}; it cannot be used any more")
        return self._fd

    def check_bytes(self, offset: int, length: int) -> None:
        if not isinstance(offset, int) or not isinstance(length, int) or offset < 0 or length < 0 \
                or offset + length > self.size_bytes:
            raise LbaOutOfRangeError(f"{self.label}: byte range offset={offset} length={length} is outside the "
                                     f"{self.size_bytes}-byte namespace")

    def read(self, offset: int, length: int) -> bytes:
        """Bytes in any alignment; holes read as zeros."""
        with self.lock:
            fd = self.usable_fd()
            self.check_bytes(offset, length)
            return os.pread(fd, length, offset)

    def read_into(self, offset: int, buffer: memoryview) -> None:
        """Fills ``buffer`` with the bytes at ``offset`` (no copy through a bytes object)."""
        with self.lock:
            fd = self.usable_fd()
            self.check_bytes(offset, len(buffer))
            done = 0
            while done < len(buffer):
                n = os.preadv(fd, [buffer[done:]], offset + done)
                if n == 0:
                    raise OSError(errno.EIO, f"{self.path} ends at {offset + done}, inside a read of "
                                             f"{len(buffer)} bytes at {offset}")
                done += n

    def write(self, offset: int, data: bytes) -> None:
        """Bytes in any alignment; an unaligned piece is widened to whole blocks for the snapshots."""
        with self.lock:
            fd = self.usable_fd()
            self.check_bytes(offset, len(data))
            if offset % LBA_BYTES or len(data) % LBA_BYTES:
                start = offset // LBA_BYTES * LBA_BYTES
                end = -(-(offset + len(data)) // LBA_BYTES) * LBA_BYTES
                block = bytearray(os.pread(fd, end - start, start))
                block[offset - start : offset - start + len(data)] = data
                offset, data = start, bytes(block)
            self._preserve(fd, offset // LBA_BYTES, len(data) // LBA_BYTES)
            written = os.pwrite(fd, data, offset)
            if written != len(data):
                raise OSError(errno.EIO, f"short write to {self.path}: {written} of {len(data)} bytes at {offset}")

    def zero(self, first_lba: int, blocks: int, *, deallocate: bool) -> None:
        """Blocks that read as zeros after: punched out if ``deallocate`` (and the file system can)."""
        with self.lock:
            fd = self.usable_fd()
            offset, length = first_lba * LBA_BYTES, blocks * LBA_BYTES
            self.check_bytes(offset, length)
            self._preserve(fd, first_lba, blocks)
            if deallocate and _punch_hole(fd, offset, length):
                return
            zeros = bytes(min(length, CHUNK_BYTES))
            for at in range(offset, offset + length, CHUNK_BYTES):
                n = min(CHUNK_BYTES, offset + length - at)
                os.pwrite(fd, zeros[:n], at)

    def flush(self) -> None:
        """Make written blocks durable (the volatile write cache is the page cache)."""
        with self.lock:
            os.fdatasync(self.usable_fd())

    def allocated_bytes(self) -> int:
        with self.lock:
            return os.fstat(self.usable_fd()).st_blocks * 512

    def extents(self) -> list[tuple[int, int]]:
        """(offset, length) of allocated data from SEEK_DATA/SEEK_HOLE, block-aligned and merged."""
        with self.lock:
            return data_extents(self.usable_fd(), self.size_bytes, LBA_BYTES)

    # ----- snapshots ----------------------------------------------------------------------------

    def _preserve(self, fd: int, first: int, count: int) -> None:
        """Save the old contents of blocks about to change in every open snapshot that lacks them."""
        if not self._snapshots:
            return
        old: bytes | None = None
        for snap in self._snapshots:
            for i in range(count):
                if first + i not in snap.saved:
                    if old is None:
                        old = os.pread(fd, count * LBA_BYTES, first * LBA_BYTES)
                    snap.saved[first + i] = old[i * LBA_BYTES : (i + 1) * LBA_BYTES]

    def begin_snapshot(self) -> NamespaceSnapshot:
        with self.lock:
            self.usable_fd()
            snap = NamespaceSnapshot(self)
            self._snapshots.append(snap)
            return snap

    def digest(self) -> str:
        """The content digest of the namespace at one instant, even while it is being written."""
        with self.begin_snapshot() as snap:
            return snap.digest()

    def _snapshot_digest(self, snap: NamespaceSnapshot) -> str:
        """The content digest (agent.namespace_digest) of the namespace as the snapshot saw it: only
        what may hold data is read, the allocated extents now and the blocks saved since."""
        with self.lock:
            self.usable_fd()
            if snap.closed:
                raise ValueError("snapshot is closed; take a new one with begin_snapshot()")
            ranges = self.extents()
            ranges += [(lba * LBA_BYTES, LBA_BYTES) for lba in snap.saved]
        digest = ContentDigest()
        for offset, length in chunks(merge_extents(ranges), CHUNK_BYTES):
            # The lock is held per chunk only, so writers are not stalled for a whole pass; the file
            # read and the saved-block overlay are consistent within the chunk.
            with self.lock:
                fd = self.usable_fd()
                if snap.closed:
                    raise ValueError("snapshot is closed; take a new one with begin_snapshot()")
                chunk = os.pread(fd, length, offset)
                first = offset // LBA_BYTES
                overlay = [(lba, snap.saved[lba]) for lba in range(first, first + length // LBA_BYTES)
                           if lba in snap.saved]
            if overlay:
                patched = bytearray(chunk)
                for lba, old in overlay:
                    at = (lba - first) * LBA_BYTES
                    patched[at : at + LBA_BYTES] = old
                chunk = bytes(patched)
            digest.update(offset, chunk)
        return digest.hexdigest()

    def _drop_snapshot(self, snap: NamespaceSnapshot) -> None:
        with self.lock:
            snap.closed = True
            snap.saved.clear()
            if snap in self._snapshots:
                self._snapshots.remove(snap)

    # ----- lifetime -----------------------------------------------------------------------------

    def release(self) -> None:
        """Sanitize: delete the file.  Idempotent."""
        with self.lock:
            self._shut("released")
            self.path.unlink(missing_ok=True)

    def close(self) -> None:
        """Close the file but keep it.  Idempotent."""
        with self.lock:
            self._shut("closed")

    def _shut(self, how: str) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
            self._gone = how
        elif how == "released":
            self._gone = how
        for snap in self._snapshots:
            snap.closed = True
            snap.saved.clear()
        self._snapshots.clear()
