"""A namespace as the host reaches it: the namespace block device of the PF (``/dev/nvmeNnM``).

The real-device backends move namespace data through this device with pread/pwrite, not through
admin commands: TP4159 migrates controller state, and the bulk user data of a namespace is read
and written as blocks.  This needs the namespace attached to the migration controller (the PF) as
well as to the migratable controller (the VF), which is how a shared namespace is set up.

The guest writes through the VF straight to the media, past the host's page cache, so a block
device is opened with O_DIRECT: a cached read could return blocks the guest has overwritten since.
O_DIRECT needs aligned buffers, offsets and lengths, so every transfer here is widened to whole
blocks and goes through page-aligned (mmap) buffers.  Tests stand a regular file in for the block
device; it takes the same aligned path without O_DIRECT.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import stat
from pathlib import Path

from agent.backend import BLOCK_BYTES
from agent.backends.ioctl_abi import BLKZEROOUT, BlkRange, IoctlFn, kernel_ioctl
from agent.controller_errors import ControllerGoneError, LbaOutOfRangeError
from agent.namespace_digest import digest_extents
from agent.sparse_extents import data_extents

CHUNK_BYTES = 1 << 20


class DeviceUnavailableError(FileNotFoundError):
    """A device node a backend needs does not exist or cannot be opened."""


def open_device_node(path: Path, flags: int, what: str, hint: str) -> int:
    """``os.open`` with an error that names the node, what it should be and what to do."""
    try:
        return os.open(path, flags | os.O_CLOEXEC)
    except FileNotFoundError:
        raise DeviceUnavailableError(f"{what} {path} does not exist: {hint}") from None
    except PermissionError:
        raise DeviceUnavailableError(
            f"{what} {path} is not accessible to this process: run the agent as root or give it the device"
        ) from None


class NamespaceDevice:
    """Block-granular reads and writes of one namespace, plus its digest and its erasure."""

    def __init__(self, path: Path, *, ioctl: IoctlFn = kernel_ioctl) -> None:
        self.path = Path(path)
        self._ioctl = ioctl
        self._fd: int | None = open_device_node(
            self.path, os.O_RDWR, "namespace device",
            "attach the namespace to the PF (nvme attach-ns) so that the host sees it, or pass the right one",
        )
        self.is_block_device = stat.S_ISBLK(os.fstat(self._fd).st_mode)
        if self.is_block_device:
            fcntl.fcntl(self._fd, fcntl.F_SETFL, fcntl.fcntl(self._fd, fcntl.F_GETFL) | os.O_DIRECT)
        size = os.lseek(self._fd, 0, os.SEEK_END)
        if size <= 0 or size % BLOCK_BYTES:
            os.close(self._fd)
            self._fd = None
            raise ValueError(
                f"namespace device {self.path} is {size} bytes, not a positive multiple of {BLOCK_BYTES}; "
                "format the namespace with 4 KiB LBAs"
            )
        self.size_bytes = size

    def _usable_fd(self) -> int:
        if self._fd is None:
            raise ControllerGoneError(f"namespace device {self.path} is closed")
        return self._fd

    def check_range(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.size_bytes:
            raise LbaOutOfRangeError(
                f"byte range offset={offset} length={length} is outside the {self.size_bytes}-byte "
                f"namespace on {self.path}"
            )

    def read(self, offset: int, length: int) -> bytes:
        """``length`` bytes at ``offset``; any alignment (widened to blocks underneath)."""
        self.check_range(offset, length)
        if length == 0:
            return b""
        start, end = _widen(offset, length)
        with _aligned(end - start) as buf:
            self._transfer(buf, start, write=False)
            return bytes(buf[offset - start : offset - start + length])

    def write(self, offset: int, data: bytes) -> None:
        """Write ``data`` at ``offset``; a partial block is read, patched and written back."""
        self.check_range(offset, len(data))
        if not data:
            return
        start, end = _widen(offset, len(data))
        with _aligned(end - start) as buf:
            if (start, end) != (offset, offset + len(data)):
                self._transfer(buf, start, write=False)
            buf[offset - start : offset - start + len(data)] = data
            self._transfer(buf, start, write=True)

    def _transfer(self, buf: mmap.mmap, offset: int, *, write: bool) -> None:
        fd = self._usable_fd()
        view = memoryview(buf)
        done = 0
        while done < len(buf):
            part = view[done:]
            n = os.pwritev(fd, [part], offset + done) if write else os.preadv(fd, [part], offset + done)
            if n <= 0:
                raise OSError(errno.EIO, f"{'write to' if write else 'read from'} {self.path} stopped at "
                                         f"byte {offset + done} of a {len(buf)}-byte transfer")
            done += n

    def data_extents(self) -> list[tuple[int, int]]:
        """Block-aligned, merged (offset, length) ranges that may hold data.

        A block device has no holes to report (the kernel answers SEEK_DATA with "all data"), so on
        real hardware this is the whole namespace; a sparse file in tests reports its extents.
        """
        return data_extents(self._usable_fd(), self.size_bytes, BLOCK_BYTES)

    def digest(self) -> str:
        """The content digest (agent.namespace_digest) of the namespace as it is on the media now,
        over its data extents (the whole of a block device, which reports no holes)."""
        return digest_extents(self.data_extents(), self.read)

    def erase(self) -> None:
        """Zero the whole namespace: BLKZEROOUT on a block device, truncation on a file."""
        fd = self._usable_fd()
        if self.is_block_device:
            # The kernel turns this into Write Zeroes (or deallocation that reads back zeroes).
            self._ioctl(fd, BLKZEROOUT, BlkRange(start=0, length=self.size_bytes))
        else:
            os.ftruncate(fd, 0)
            os.ftruncate(fd, self.size_bytes)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _widen(offset: int, length: int) -> tuple[int, int]:
    """The block-aligned [start, end) that covers [offset, offset + length)."""
    start = offset // BLOCK_BYTES * BLOCK_BYTES
    end = -(-(offset + length) // BLOCK_BYTES) * BLOCK_BYTES
    return start, end


def _aligned(length: int) -> mmap.mmap:
    """A page-aligned anonymous buffer, as O_DIRECT requires."""
    return mmap.mmap(-1, length)
