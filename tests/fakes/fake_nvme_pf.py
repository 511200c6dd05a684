"""A FAKE of an NVMe PF behind the Linux admin passthrough ioctl, for testing agent.backends.nvme_passthru.

It stands in for what cannot run here (a TP4159 PF bound to the nvme driver): an ioctl function
with the kernel's signature that decodes ``struct nvme_passthru_cmd`` (and the 64-bit variant)
from raw bytes with ``struct`` (not with our ctypes classes, so that a packing mistake on our
side shows), rebuilds the 64-byte SQE the kernel would put on the admin queue, and routes it to
the primary controller of the emulated NVMe subsystem model (``NvmeSubsystemModel.submit_admin``).
Like the kernel, it copies ``data_len`` bytes at ``addr`` to the controller for host-to-controller
opcodes and back for controller-to-host ones, and returns the completion's status field (phase
bit dropped) with DW0 (DW0 and DW1 for the 64-bit ioctl) in ``result``.

The Controller Data Queue is host memory the controller writes on its own.  The model keeps it
in its own host memory, so the fake gives the model a region of the queue's size in place of the
caller's buffer and, after every command, copies the region into the caller's buffer: what a
device's DMA would have put there by the time the host looks.
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

from agent.backends import ioctl_abi as abi
from agent.emulated.model.subsystem import PRIMARY_CNTLID, NvmeSubsystemModel
from agent.nvme.commands import Sqe
from agent.nvme.spec import AdminOpcode, CdqSelect
from tests.fakes import same_file

# struct nvme_passthru_cmd as linux/nvme_ioctl.h lays it out: 72 bytes; the 64-bit variant has
# rsvd2 and a u64 result instead of the u32 result.
_CMD = struct.Struct("<BBHIIIQQIIIIIIIIII")
_CMD64 = struct.Struct("<BBHIIIQQIIIIIIIIIIQ")
_RESULT_AT, _RESULT64_AT = 68, 72


@dataclass
class FakeNvmePf:
    """The PF of one emulated subsystem; pass ``ioctl`` to the backend and ``fd`` as the device
    (or ``node``, a path that opens the same file, where the backend opens the device itself).

    The backend owns ``fd`` (it closes it, as it would close /dev/nvmeN); ``close`` drops the fake's
    queue regions only.
    """""

    model: NvmeSubsystemModel
    sent: list[Sqe] = field(default_factory=list)  # every SQE handed to the controller, for assertions
    data_lengths: list[int] = field(default_factory=list)  # the data_len of each, in the same order
    # caller's queue address -> (the model's region address, length), while the queue exists
    _queues: dict[int, tuple[int, int]] = field(default_factory=dict)
    _queue_ids: dict[int, int] = field(default_factory=dict)  # CDQID -> caller's queue address

    def __post_init__(self) -> None:
        self.fd = os.memfd_create("fake-nvme-pf")
        self.node = Path(f"/proc/self/fd/{self.fd}")
        self._cid = 0

    def close(self) -> None:
        for addr in list(self._queues):
            self._forget(addr)
        self._queue_ids.clear()

    def ioctl(self, fd: int, request: int, arg: abi.IoctlArg) -> int:
        if not same_file(fd, self.fd) or request not in (abi.NVME_IOCTL_ADMIN_CMD, abi.NVME_IOCTL_ADMIN64_CMD):
            raise OSError(errno.ENOTTY, f"fake nvme PF: request {request:#x} on fd {fd}")
        if isinstance(arg, int):
            raise OSError(errno.EFAULT, "fake nvme PF: the passthru command must be a buffer")
        view = memoryview(arg).cast("B")
        wide = request == abi.NVME_IOCTL_ADMIN64_CMD
        layout = _CMD64 if wide else _CMD
        if len(view) != layout.size:
            raise OSError(errno.EINVAL, f"fake nvme PF: {len(view)}-byte command, the ioctl takes {layout.size}")
        (opcode, flags, rsvd1, nsid, cdw2, cdw3, metadata, addr, metadata_len, data_len,
         cdw10, cdw11, cdw12, cdw13, cdw14, cdw15, _timeout_ms, *_) = layout.unpack(view)
        if rsvd1 or metadata or metadata_len:
            raise OSError(errno.EINVAL, "fake nvme PF: reserved or metadata fields set")
        prp1 = addr
        creates_queue = opcode == AdminOpcode.CONTROLLER_DATA_QUEUE and cdw10 & 0xFF == CdqSelect.CREATE
        deletes_queue = opcode == AdminOpcode.CONTROLLER_DATA_QUEUE and cdw10 & 0xFF == CdqSelect.DELETE
        if creates_queue:
            prp1 = self._queue_region(addr, data_len)
        self._cid = (self._cid + 1) & 0xFFFF
        sqe = Sqe(opcode, self._cid, nsid, flags, cdw2, cdw3, 0, prp1, 0, cdw10, cdw11, cdw12, cdw13, cdw14, cdw15)
        self.sent.append(sqe)
        self.data_lengths.append(data_len)
        to_controller = opcode & 0x3 in (1, 3)
        data = ctypes.string_at(addr, data_len) if to_controller and data_len else None
        cqe, out = self.model.submit_admin(PRIMARY_CNTLID, sqe.encode(), data)
        if opcode & 0x3 in (2, 3) and data_len:
            ctypes.memmove(addr, out[:data_len], min(len(out), data_len))
        dw0, dw1 = struct.unpack_from("<II", cqe)
        (status_field,) = struct.unpack_from("<H", cqe, 14)
        if creates_queue and addr in self._queues:
            if status_field >> 1:
                self._forget(addr)
            else:
                self._queue_ids[dw0 & 0xFFFF] = addr
        self._mirror_queues()
        if deletes_queue and not status_field >> 1:
            # After Delete the caller may free its buffer: the "device" must not write there again.
            self._forget(self._queue_ids.pop(cdw11 & 0xFFFF))
        if wide:
            struct.pack_into("<Q", view, _RESULT64_AT, dw0 | dw1 << 32)
        else:
            struct.pack_into("<I", view, _RESULT_AT, dw0)
        return status_field >> 1

    def _queue_region(self, addr: int, length: int) -> int:
        """A model host-memory region standing in for the caller's queue buffer at ``addr``."""
        if addr % 4096:
            return addr  # let the controller refuse an unaligned queue itself
        region = self.model.host_memory.allocate(length)
        self._queues[addr] = (region, length)
        return region

    def _forget(self, addr: int) -> None:
        region, _ = self._queues.pop(addr)
        self.model.host_memory.free(region)

    def _mirror_queues(self) -> None:
        for addr, (region, length) in self._queues.items():
            ctypes.memmove(addr, bytes(self.model.host_memory.view(region, length)), length)
