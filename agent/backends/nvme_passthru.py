"""The ``nvme-passthru`` backend: TP4159 admin commands to a real PF through the Linux passthrough ioctl.

The PF (``/dev/nvmeN``, the *migration controller*) migrates one of its VFs (the *migratable
controller*, named by its CNTLID).  Every admin command is built by the project's one encoder,
``agent.nvme.commands``, exactly as the emulated model decodes it, and is handed to the kernel
as ``struct nvme_passthru_cmd`` (``NVME_IOCTL_ADMIN_CMD``; ``NVME_IOCTL_ADMIN64_CMD`` where the
completion's DW1 is needed).  The kernel owns the command identifier and the data pointer: it
takes ``addr``/``data_len`` (a ctypes buffer here) and builds the PRPs itself, so those SQE
fields are not copied.

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

Known limit on real hardware: the Controller Data Queue is host memory the controller writes to
for as long as the queue exists, but the kernel maps a passthrough buffer for the duration of
one ioctl only.  nvme-cli sets the queue up the same way and says so; a device that keeps
writing after Create returns needs the queue in memory the kernel keeps mapped (the vfio-nvme
driver, or a user-space driver owning the PF).  The model behind the tests' fake PF writes the
queue through the same address, which is what a kernel that pins the buffer would give us.
"""

from __future__ import annotations

import ctypes
import mmap
import os
from dataclasses import dataclass
from pathlib import Path
from threading import RLock

from agent.backends.device_controller import ChangedLbaLog, DeviceBackedController, DeviceCommandError
from agent.backends.ioctl_abi import (
    NVME_IOCTL_ADMIN64_CMD,
    NVME_IOCTL_ADMIN_CMD,
    IoctlFn,
    NvmePassthruCmd,
    NvmePassthruCmd64,
    kernel_ioctl,
)
from agent.backends.namespace_device import NamespaceDevice, open_device_node
from agent.emulated.errors import ControllerError, StateFormatError
from agent.emulated.state_format import HEADER_BYTES, container_length
from agent.nvme import cdq, commands
from agent.nvme.commands import Sqe
from agent.nvme.spec import CDQ_ENTRY_BYTES, LBA_BYTES, LoggingAction, SequenceIndicator, status_name
from agent.vfio_states import DEFAULT_FEATURES, VfioState

DEFAULT_ADMIN_TIMEOUT_MS = 30_000
# Largest piece of controller state per command: within the MDTS of common controllers; pass
# state_piece_bytes for one whose MDTS is smaller.
STATE_PIECE_BYTES = 64 * 1024
# Get Controller State reads the header of the versioned container (agent.emulated.state_format,
# the format CSVI 0 selects) first, to learn how long the whole state is.
STATE_HEADER_BYTES = HEADER_BYTES
# 2 MiB of queue: room for the ranges a busy guest changes between two dirty rounds.  When it does
# fill, nothing is lost (the controller reports "all LBAs changed"), but the next round is a full copy.
DEFAULT_CDQ_ENTRIES = 1 << 16


class NvmeStatusError(DeviceCommandError):
    """A command completed with an error status; ``status`` is ``(SCT << 8) | SC`` as in spec.Status."""

    def __init__(self, what: str, status: int, dnr: bool) -> None:
        self.status = status
        self.dnr = dnr
        name = status_name(status >> 8, status & 0xFF)
        retry = "do not retry (DNR)" if dnr else "it may succeed if retried"
        super().__init__(f"{what} failed with status {name} ({status:#05x}); {retry}")


@dataclass(frozen=True)
class AdminResult:
    """What a successful admin command returns: completion DW0, DW1 (64-bit ioctl only) and data."""

    dw0: int
    dw1: int
    data: bytes


class NvmeAdminChannel:
    """Admin commands to one NVMe controller character device through the passthrough ioctl."""

    def __init__(self, fd: int, name: str, *, ioctl: IoctlFn = kernel_ioctl,
                 timeout_ms: int = DEFAULT_ADMIN_TIMEOUT_MS) -> None:
        self.fd: int | None = fd
        self.name = name
        self._ioctl = ioctl
        self.timeout_ms = timeout_ms
        self._lock = RLock()

    @classmethod
    def open(cls, path: Path, *, ioctl: IoctlFn = kernel_ioctl) -> NvmeAdminChannel:
        fd = open_device_node(Path(path), os.O_RDWR, "device",
                              "is the NVMe PF bound to the nvme driver (ls /dev/nvme*)? pass --device")
        return cls(fd, str(path), ioctl=ioctl)

    def submit(self, sqe: Sqe, what: str, *, data: bytes | None = None, read_bytes: int = 0,
               buffer: ctypes.Array[ctypes.c_char] | None = None, wide: bool = False) -> AdminResult:
        """Run one admin command.

        ``data`` goes to the controller, ``read_bytes`` come back; ``buffer`` passes memory the
        caller keeps (a queue).  ``wide`` uses the 64-bit ioctl, whose result carries DW1.
        """
        if sqe.fuse or sqe.psdt or sqe.mptr:
            raise ValueError(f"{what}: FUSE, PSDT and MPTR are the kernel's to set; the SQE has flags "
                             f"{sqe.flags:#x} mptr {sqe.mptr:#x}")
        if buffer is None:
            size = len(data) if data is not None else read_bytes
            buffer = ctypes.create_string_buffer(data or b"", size) if size else None
        cmd = (NvmePassthruCmd64 if wide else NvmePassthruCmd)(
            opcode=sqe.opcode, flags=sqe.flags, nsid=sqe.nsid, cdw2=sqe.cdw2, cdw3=sqe.cdw3,
            addr=ctypes.addressof(buffer) if buffer is not None else 0,
            data_len=ctypes.sizeof(buffer) if buffer is not None else 0,
            cdw10=sqe.cdw10, cdw11=sqe.cdw11, cdw12=sqe.cdw12, cdw13=sqe.cdw13, cdw14=sqe.cdw14, cdw15=sqe.cdw15,
            timeout_ms=self.timeout_ms,
        )
        with self._lock:
            if self.fd is None:
                raise DeviceCommandError(f"{what}: the admin channel to {self.name} is closed")
            try:
                status = self._ioctl(self.fd, NVME_IOCTL_ADMIN64_CMD if wide else NVME_IOCTL_ADMIN_CMD, cmd)
            except OSError as exc:
                raise DeviceCommandError(f"{what} on {self.name}: the kernel refused the ioctl: {exc}") from exc
        if status:
            # A positive return is the completion's Status field (phase bit dropped): SC 7:0,
            # SCT 10:8, CRD 12:11, More 13, DNR 14.
            raise NvmeStatusError(f"{what} on {self.name}", (status >> 8 & 0x7) << 8 | status & 0xFF,
                                  bool(status >> 14 & 1))
        out = buffer.raw[:read_bytes] if buffer is not None and read_bytes else b""
        return AdminResult(cmd.result & 0xFFFF_FFFF, cmd.result >> 32 if wide else 0, out)

    def close(self) -> None:
        with self._lock:
            if self.fd is not None:
                os.close(self.fd)
                self.fd = None


class CdqChangedLbaLog:
    """Changed LBAs of one migratable controller, from a User Data Migration Controller Data Queue.

    ``start`` creates the queue in a buffer we keep (Controller Data Queue create, the buffer's
    address as the queue base) and starts logging into it (Track Send, LACT=start).  Reading
    follows agent.nvme.cdq: ask for the pointers first (Get Features FID 21h, which makes the
    controller post the range it is still coalescing), consume the entries by phase tag, then
    hand the slots back (Set Features FID 21h).  An "all LBAs changed" entry (the queue filled up
    and logging stopped) reports every LBA and turns logging back on.  ``stop`` stops logging and
    deletes the queue.
    """

    def __init__(self, admin: NvmeAdminChannel, cntlid: int, nsid: int, *, namespace_blocks: int,
                 queue_entries: int = DEFAULT_CDQ_ENTRIES, owns_admin: bool = False) -> None:
        self._admin = admin
        self._owns_admin = owns_admin
        self._cntlid = cntlid
        self._nsid = nsid
        self._entries = queue_entries
        self._namespace_blocks = namespace_blocks
        self._queue: mmap.mmap | None = None
        self._reader: cdq.CdqReader | None = None
        self._cdqid = 0
        self._changed: set[int] = set()  # consumed from the queue, not yet taken

    @property
    def active(self) -> bool:
        return self._queue is not None

    def start(self) -> None:
        size = self._entries * CDQ_ENTRY_BYTES
        # Page aligned and zeroed, as a queue base must be: anonymous mmap memory is both.
        queue = mmap.mmap(-1, size)
        memory = (ctypes.c_char * size).from_buffer(queue)
        try:
            created = self._admin.submit(commands.cdq_create(self._cntlid, size // 4, ctypes.addressof(memory)),
                                         f"Controller Data Queue create for CNTLID {self._cntlid}", buffer=memory)
        finally:
            del memory  # the mmap cannot be closed while a ctypes view of it is alive
        self._queue, self._cdqid = queue, created.dw0 & 0xFFFF
        self._reader = cdq.CdqReader(memoryview(queue), self._entries)
        self._changed.clear()
        try:
            self._track(LoggingAction.START)
        except ControllerError:
            self._delete_queue()
            raise

    def _track(self, action: LoggingAction) -> None:
        self._admin.submit(commands.track_send(self._cdqid, action),
                           f"Track Send {action.name.lower()} (CDQID {self._cdqid}, CNTLID {self._cntlid})")

    def _drain(self) -> None:
        """Consume what the controller posted into ``_changed`` and give the slots back."""
        assert self._reader is not None
        self._admin.submit(commands.get_cdq_pointers(self._cdqid), f"Get Features CDQ pointers (CDQID {self._cdqid})",
                           wide=True)
        overflowed = consumed = False
        for nsid, slba, nlb, attributes in self._reader.take():
            consumed = True
            _, change, _ = cdq.describe(attributes)
            if change is cdq.LbaChange.ALL_CHANGED:
                overflowed = True
                self._changed.update(range(self._namespace_blocks))
            elif change is cdq.LbaChange.RANGE_VALID and nsid == self._nsid:
                self._changed.update(range(slba, slba + nlb + 1))
        if consumed:
            self._admin.submit(commands.set_cdq_head(self._cdqid, self._reader.head),
                               f"Set Features CDQ head (CDQID {self._cdqid})")
        if overflowed:
            # The controller stopped logging when the queue filled; every LBA is reported above,
            # so turning logging back on now loses nothing.
            self._track(LoggingAction.START)

    def take(self) -> list[int]:
        self._drain()
        taken = sorted(self._changed)
        self._changed.clear()
        return taken

    def pending(self) -> int:
        self._drain()
        return len(self._changed)

    def stop(self) -> None:
        if self._queue is None:
            return
        try:
            self._track(LoggingAction.STOP)
        finally:
            self._delete_queue()

    def close(self) -> None:
        if self._owns_admin:
            self._admin.close()

    def _delete_queue(self) -> None:
        cdqid, queue = self._cdqid, self._queue
        try:
            # The controller may write the queue until Delete completes: free the memory only after.
            self._admin.submit(commands.cdq_delete(cdqid), f"Controller Data Queue delete (CDQID {cdqid})")
        finally:
            self._queue, self._reader = None, None
            self._changed.clear()
            if queue is not None:
                queue.close()


class NvmePassthruController(DeviceBackedController):
    """A VF migrated by its PF with TP4159 admin commands; see the module docstring for the arcs."""

    def __init__(self, controller_id: str, admin: NvmeAdminChannel, cntlid: int, nsid: int,
                 namespace: NamespaceDevice, *, state: VfioState = VfioState.RUNNING,
                 lba_log: ChangedLbaLog | None = None, state_piece_bytes: int = STATE_PIECE_BYTES) -> None:
        if not 0 <= cntlid <= 0xFFFF:
            raise ValueError(f"cntlid={cntlid} is not a controller id (0..65535)")
        if state_piece_bytes <= 0 or state_piece_bytes % 4:
            raise ValueError(f"state_piece_bytes={state_piece_bytes} must be a positive multiple of 4")
        self._piece_bytes = state_piece_bytes
        self._admin = admin
        self._cntlid = cntlid
        self._captured: bytes | None = None  # Get Controller State of this STOP_COPY
        self._loaded = False  # Set Controller State done in this RESUMING session
        log = lba_log if lba_log is not None else CdqChangedLbaLog(
            admin, cntlid, nsid, namespace_blocks=namespace.size_bytes // LBA_BYTES)
        # A PF migrates with Suspend/Resume: there is no peer-to-peer quiesce to offer.
        super().__init__(controller_id, namespace, log, state, DEFAULT_FEATURES)

    @classmethod
    def for_resuming(cls, controller_id: str, admin: NvmeAdminChannel, cntlid: int, nsid: int,
                     namespace: NamespaceDevice, *, state_piece_bytes: int = STATE_PIECE_BYTES
                     ) -> NvmePassthruController:
        """A destination VF: suspended (Set Controller State needs that), then RESUMING."""
        ctrl = cls(controller_id, admin, cntlid, nsid, namespace, state_piece_bytes=state_piece_bytes)
        ctrl.set_state(VfioState.RESUMING)
        return ctrl

    def _what(self, command: str) -> str:
        return f"{command} for CNTLID {self._cntlid} (controller {self._id})"

    def _device_arc(self, cur: VfioState, nxt: VfioState) -> None:
        S = VfioState
        if nxt is S.STOP_COPY:
            if cur is S.PRE_COPY:
                self._suspend()
            self._captured = self._get_controller_state()
        elif (cur, nxt) == (S.RUNNING, S.STOP):
            self._suspend()
        elif (cur, nxt) == (S.STOP, S.RUNNING):
            self._admin.submit(commands.migration_resume(self._cntlid), self._what("Resume"))
        elif (cur, nxt) == (S.STOP, S.RESUMING):
            self._loaded = False
        elif (cur, nxt) == (S.RESUMING, S.STOP) and not self._loaded:
            raise self._no_state_loaded()
        if cur is S.STOP_COPY:
            self._captured = None
        # RUNNING <-> PRE_COPY have no command of their own: the changed-LBA log (Track Send into a
        # Controller Data Queue) starts and stops with them in DeviceBackedController._log_arc.

    def _suspend(self) -> None:
        self._admin.submit(commands.migration_suspend(self._cntlid), self._what("Suspend"))

    def _get_controller_state(self) -> bytes:
        """Migration Receive / Get Controller State: the header first, for the size, then the rest."""
        what = self._what("Get Controller State")
        head = self._admin.submit(commands.get_controller_state(self._cntlid, 0, STATE_HEADER_BYTES), what,
                                  read_bytes=STATE_HEADER_BYTES)
        if not head.dw0 & 1:
            raise DeviceCommandError(f"{what}: completion CSUP=0, the controller is not suspended; "
                                     "suspend it (set_state(STOP)) first")
        total = container_length(head.data)
        parts = [head.data]
        offset = STATE_HEADER_BYTES
        while offset < total:
            length = min(self._piece_bytes, total - offset)
            piece = self._admin.submit(commands.get_controller_state(self._cntlid, offset, _dword_ceil(length)),
                                       what, read_bytes=_dword_ceil(length))
            parts.append(piece.data[:length])
            offset += length
        return b"".join(parts)

    def _set_controller_state(self, blob: bytes) -> None:
        """Migration Send / Set Controller State in pieces (SEQIND first/middle/last, or entire)."""
        padded = blob + bytes(_dword_ceil(len(blob)) - len(blob))
        pieces = range(0, len(padded), self._piece_bytes)
        for i, offset in enumerate(pieces):
            chunk = padded[offset:offset + self._piece_bytes]
            first, last = i == 0, i == len(pieces) - 1
            sequence = (SequenceIndicator.ENTIRE if first and last else SequenceIndicator.FIRST if first
                        else SequenceIndicator.LAST if last else SequenceIndicator.MIDDLE)
            self._admin.submit(commands.set_controller_state(self._cntlid, offset, len(chunk), sequence),
                               self._what(f"Set Controller State ({sequence.name.lower()} piece)"), data=chunk)

    def save_state(self) -> bytes:
        """The controller state: captured by STOP -> STOP_COPY, or read now while in STOP."""
        with self._lock:
            self._require_state(frozenset({VfioState.STOP, VfioState.STOP_COPY}), "save_state")
            if self._state is VfioState.STOP_COPY and self._captured is not None:
                return self._captured
            return self._get_controller_state()

    def load_state(self, blob: bytes) -> None:
        """Set Controller State, in pieces; the controller checks the whole before applying any of it."""
        with self._lock:
            self._require_state(frozenset({VfioState.RESUMING}), "load_state")
            if not blob:
                raise StateFormatError(f"controller {self._id}: an empty controller state cannot be loaded")
            self._set_controller_state(blob)
            self._loaded = True

    def _close_device(self) -> None:
        self._admin.close()


def _dword_ceil(length: int) -> int:
    return -(-length // 4) * 4
