"""The ``nvme-passthru`` backend: TP4159 admin commands to a real PF through the Linux passthrough ioctl.

The PF (``/dev/nvmeN``, the *migration controller*) migrates one of its VFs (the *migratable
controller*, named by its CNTLID).  The commands are the host-side migration driver's
(``agent.nvme.migration_driver``), the one every backend uses; ``NvmeAdminChannel`` is its
transport here: it hands each command to the kernel as ``struct nvme_passthru_cmd64``
(``NVME_IOCTL_ADMIN64_CMD``, whose result carries completion DW0 and DW1).  The kernel owns the
command identifier and the data pointer: it takes ``addr``/``data_len`` and builds the PRPs
itself, so those SQE fields are not copied.

The VFIO arcs map to commands as the vfio-nvme driver maps them:

    RUNNING -> STOP            Migration Send / Suspend
    STOP -> STOP_COPY          Migration Receive / Get Controller State (kept for save_state)
    PRE_COPY -> STOP_COPY      Suspend, then Get Controller State
    RESUMING -> STOP           Migration Send / Set Controller State: sent by load_state, as the
                               emulated backend does, so a bad state is refused there; the arc
                               only checks that one was loaded
    STOP -> RUNNING            Migration Send / Resume
    RUNNING -> PRE_COPY        Controller Data Queue create + Track Send (start logging)
    PRE_COPY -> RUNNING        Track Send (stop logging) + Controller Data Queue delete

Bulk namespace data does not travel in admin commands: it is read and written through the PF's
namespace block device with pread/pwrite (``NamespaceDevice``).

The Controller Data Queue is created physically contiguous (PC=1), so its memory must be: a
2 MiB huge page (``MAP_HUGETLB``) when the host has one free, else one 4 KiB page (128 entries),
which is contiguous by itself.  ``allocate_queue`` logs which.  A small queue fills sooner; when
it does nothing is lost (the controller reports "all LBAs changed") but the next round copies the
whole namespace: reserve huge pages (``vm.nr_hugepages``) on hosts that migrate busy guests.

Known limit on real hardware: the Controller Data Queue is host memory the controller writes to
for as long as the queue exists, but the kernel maps a passthrough buffer for the duration of
one ioctl only.  nvme-cli sets the queue up the same way and says so; a device that keeps
writing after Create returns needs the queue in memory the kernel keeps mapped (the vfio-nvme
driver, or a user-space driver owning the PF).  The model behind the tests' fake PF writes the
queue through the same address, which is what a kernel that pins the buffer would give us.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import os
from collections.abc import Callable
from pathlib import Path
from threading import RLock

from agent.backends.device_controller import ChangedLbaLog, DeviceBackedController
from agent.backends.ioctl_abi import (
    MAP_HUGE_2MB,
    MAP_HUGETLB,
    NVME_IOCTL_ADMIN64_CMD,
    IoctlFn,
    NvmePassthruCmd64,
    kernel_ioctl,
)
from agent.backends.namespace_device import NamespaceDevice, open_device_node
from agent.controller_errors import DeviceCommandError
from agent.nvme import commands
from agent.nvme.commands import Sqe
from agent.nvme.migration_driver import (
    DEFAULT_STATE_PIECE_BYTES,
    AdminResult,
    MigrationDriver,
    NvmeStatusError,
    QueueMemory,
    read_explanation,
)
from agent.nvme.spec import LBA_BYTES
from agent.vfio_states import DEFAULT_FEATURES, VfioState

log = logging.getLogger(__name__)

DEFAULT_ADMIN_TIMEOUT_MS = 30_000
HUGE_PAGE_BYTES = 2 << 20
PAGE_BYTES = 4096
# mmap(fileno, length, flags=...) as the mmap module has it; a test stands in a mapper that
# behaves as a host with (or without) a free huge page would.
Mapper = Callable[..., mmap.mmap]


class MappedQueue:
    """Queue memory from an anonymous mapping: a huge page or one page, contiguous either way."""

    def __init__(self, mapping: mmap.mmap, size_bytes: int, description: str) -> None:
        self._mapping = mapping
        self._buffer: ctypes.Array[ctypes.c_char] | None = (ctypes.c_char * size_bytes).from_buffer(mapping)
        self._address = ctypes.addressof(self._buffer)
        self.size_bytes = size_bytes
        self.contiguous = True
        self.description = description

    @property
    def address(self) -> int:
        return self._address

    @property
    def view(self) -> memoryview:
        return memoryview(self._mapping)[: self.size_bytes]

    def release(self) -> None:
        if self._buffer is not None:
            self._buffer = None  # the mapping cannot be closed while a ctypes view of it is alive
            self._mapping.close()


def map_queue(preferred_bytes: int, *, mapper: Mapper = mmap.mmap) -> MappedQueue:
    """Physically contiguous queue memory of at most ``preferred_bytes``: a 2 MiB huge page when
    the host has a free one and more than a page is wanted, else one 4 KiB page."""
    if preferred_bytes > PAGE_BYTES:
        try:
            mapping = mapper(-1, HUGE_PAGE_BYTES, flags=mmap.MAP_PRIVATE | MAP_HUGETLB | MAP_HUGE_2MB)
        except OSError as exc:
            log.info("controller data queue: no free 2 MiB huge page (%s); using one 4 KiB page, %d entries "
                     "(reserve huge pages with vm.nr_hugepages for a larger queue)", exc.strerror or exc,
                     PAGE_BYTES // 32)
        else:
            size = min(preferred_bytes, HUGE_PAGE_BYTES)
            log.info("controller data queue: a 2 MiB huge page, %d entries", size // 32)
            return MappedQueue(mapping, size, "2 MiB huge page")
    return MappedQueue(mapper(-1, PAGE_BYTES, flags=mmap.MAP_PRIVATE), min(preferred_bytes, PAGE_BYTES),
                       "one 4 KiB page")


class NvmeAdminChannel:
    """Admin commands to one NVMe controller character device through the passthrough ioctl."""

    def __init__(self, fd: int, name: str, *, ioctl: IoctlFn = kernel_ioctl,
                 timeout_ms: int = DEFAULT_ADMIN_TIMEOUT_MS, mapper: Mapper = mmap.mmap) -> None:
        self.fd: int | None = fd
        self.name = name
        self._ioctl = ioctl
        self._mapper = mapper
        self.timeout_ms = timeout_ms
        self._lock = RLock()

    @classmethod
    def open(cls, path: Path, *, ioctl: IoctlFn = kernel_ioctl) -> NvmeAdminChannel:
        fd = open_device_node(Path(path), os.O_RDWR, "device",
                              "is the NVMe PF bound to the nvme driver (ls /dev/nvme*)? pass --device")
        return cls(fd, str(path), ioctl=ioctl)

    def _ioctl_command(self, sqe: Sqe, what: str, data: bytes | None, read_bytes: int,
                       queue: QueueMemory | None) -> tuple[int, int, bytes]:
        """One ioctl: (status field without the phase bit, result, data read back)."""
        if sqe.fuse or sqe.psdt or sqe.mptr:
            raise ValueError(f"{what}: FUSE, PSDT and MPTR are the kernel's to set; the SQE has flags "
                             f"{sqe.flags:#x} mptr {sqe.mptr:#x}")
        buffer: ctypes.Array[ctypes.c_char] | None = None
        if queue is not None:
            addr, length = queue.address, queue.size_bytes
        else:
            size = len(data) if data is not None else read_bytes
            buffer = ctypes.create_string_buffer(data or b"", size) if size else None
            addr = ctypes.addressof(buffer) if buffer is not None else 0
            length = ctypes.sizeof(buffer) if buffer is not None else 0
        cmd = NvmePassthruCmd64(
            opcode=sqe.opcode, flags=sqe.flags, nsid=sqe.nsid, cdw2=sqe.cdw2, cdw3=sqe.cdw3, addr=addr,
            data_len=length, cdw10=sqe.cdw10, cdw11=sqe.cdw11, cdw12=sqe.cdw12, cdw13=sqe.cdw13, cdw14=sqe.cdw14,
            cdw15=sqe.cdw15, timeout_ms=self.timeout_ms,
        )
        with self._lock:
            if self.fd is None:
                raise DeviceCommandError(f"{what}: the admin channel to {self.name} is closed")
            try:
                status = self._ioctl(self.fd, NVME_IOCTL_ADMIN64_CMD, cmd)
            except OSError as exc:
                raise DeviceCommandError(f"{what} on {self.name}: the kernel refused the ioctl: {exc}") from exc
        out = buffer.raw[:read_bytes] if buffer is not None and read_bytes else b""
        return status, int(cmd.result), out

    def submit(self, sqe: Sqe, what: str, *, data: bytes | None = None, read_bytes: int = 0,
               queue: QueueMemory | None = None) -> AdminResult:
        """Run one admin command; ``queue`` is handed to the kernel as the command's buffer."""
        with self._lock:  # the explanation must be about this command, not a later one
            status, result, out = self._ioctl_command(sqe, what, data, read_bytes, queue)
            if status:
                # A positive return is the completion's Status field (phase bit dropped): SC 7:0,
                # SCT 10:8, CRD 12:11, More 13, DNR 14.
                code = (status >> 8 & 0x7) << 8 | status & 0xFF
                raise NvmeStatusError(what, self.name, code, bool(status >> 14 & 1),
                                      self._explain(code) if status >> 13 & 1 else "")
        return AdminResult(result & 0xFFFF_FFFF, result >> 32, out)

    def _explain(self, status: int) -> str:
        def read_log(lid: int, length: int) -> bytes:
            failed, _, page = self._ioctl_command(commands.get_log_page(lid, length), "Get Log Page", None, length,
                                                  None)
            if failed:
                raise DeviceCommandError(f"Get Log Page {lid:#04x} on {self.name} failed")
            return page

        return read_explanation(read_log, status)

    def allocate_queue(self, preferred_bytes: int) -> MappedQueue:
        return map_queue(preferred_bytes, mapper=self._mapper)

    def close(self) -> None:
        with self._lock:
            if self.fd is not None:
                os.close(self.fd)
                self.fd = None


class NvmePassthruController(DeviceBackedController):
    """A VF migrated by its PF with TP4159 admin commands; see the module docstring for the arcs.

    ``state`` is where the VF is when it is opened: RUNNING, or STOP for a VF left suspended (a
    released slot, or one a migration suspended before the agent restarted).  ``owns_admin``: the
    controller closes the PF's channel with itself (not when several VFs share it).
    """

    def __init__(self, controller_id: str, admin: NvmeAdminChannel, cntlid: int, nsid: int,
                 namespace: NamespaceDevice, *, state: VfioState = VfioState.RUNNING,
                 lba_log: ChangedLbaLog | None = None, state_piece_bytes: int = DEFAULT_STATE_PIECE_BYTES,
                 owns_admin: bool = True) -> None:
        self._driver = MigrationDriver(admin, cntlid, label=controller_id, state_piece_bytes=state_piece_bytes)
        self._admin = admin
        self._owns_admin = owns_admin
        self._cntlid = cntlid
        self._captured: bytes | None = None  # Get Controller State of this STOP_COPY
        self._loaded = False  # Set Controller State done in this RESUMING session
        changes = lba_log if lba_log is not None else self._driver.change_log(nsid, namespace.size_bytes // LBA_BYTES)
        # A PF migrates with Suspend/Resume: there is no peer-to-peer quiesce to offer.
        super().__init__(controller_id, namespace, changes, state, DEFAULT_FEATURES)

    @classmethod
    def for_resuming(cls, controller_id: str, admin: NvmeAdminChannel, cntlid: int, nsid: int,
                     namespace: NamespaceDevice, *, state: VfioState = VfioState.RUNNING,
                     state_piece_bytes: int = DEFAULT_STATE_PIECE_BYTES, owns_admin: bool = True
                     ) -> NvmePassthruController:
        """A destination VF: suspended (Set Controller State needs that), then RESUMING.  A VF
        that is suspended already (``state`` STOP) is not suspended again."""
        ctrl = cls(controller_id, admin, cntlid, nsid, namespace, state=state, state_piece_bytes=state_piece_bytes,
                   owns_admin=owns_admin)
        ctrl.set_state(VfioState.RESUMING)
        return ctrl

    @property
    def cntlid(self) -> int:
        return self._cntlid

    def _device_arc(self, cur: VfioState, nxt: VfioState) -> None:
        S = VfioState
        if nxt is S.STOP_COPY:
            if cur is S.PRE_COPY:
                self._driver.suspend()
            self._captured = self._driver.get_state()
        elif (cur, nxt) == (S.RUNNING, S.STOP):
            self._driver.suspend()
        elif (cur, nxt) == (S.STOP, S.RUNNING):
            self._driver.resume()
        elif (cur, nxt) == (S.STOP, S.RESUMING):
            self._loaded = False
        elif (cur, nxt) == (S.RESUMING, S.STOP) and not self._loaded:
            raise self._no_state_loaded()
        if cur is S.STOP_COPY:
            self._captured = None
        # RUNNING <-> PRE_COPY have no command of their own: the changed-LBA log (Track Send into a
        # Controller Data Queue) starts and stops with them in DeviceBackedController._log_arc.

    def save_state(self) -> bytes:
        """The controller state: captured by STOP -> STOP_COPY, or read now while in STOP."""
        with self._lock:
            self._require_state(frozenset({VfioState.STOP, VfioState.STOP_COPY}), "save_state")
            if self._state is VfioState.STOP_COPY and self._captured is not None:
                return self._captured
            return self._driver.get_state()

    def load_state(self, blob: bytes) -> None:
        """Set Controller State, in pieces; the controller checks the whole before applying any of it."""
        with self._lock:
            self._require_state(frozenset({VfioState.RESUMING}), "load_state")
            self._driver.set_state(blob)
            self._loaded = True

    def _close_device(self) -> None:
        if self._owns_admin:
            self._admin.close()
