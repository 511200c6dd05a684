"""The emulated NVMe migratable controller: a namespace in a sparse file plus controller state.

It plays both roles the TP4159 model has: the *migratable controller* a guest drives
(``write_blocks`` / ``read_blocks``) and the *migration controller* the host uses to move it
(raw namespace access, changed-LBA tracking, the VFIO state machine, Get/Set Controller State).
The vfio-nvme mapping of VFIO arcs to NVMe actions is implemented in ``set_state``.

Thread safety: one lock guards the file descriptor, the state, the dirty set and the queues.
A guest thread and the agent's asyncio loop (through ``asyncio.to_thread``) call in at the same
time; doing the pwrite and the dirty marking under the same lock is what guarantees that
``take_dirty_lbas`` never misses an acknowledged write.
"""

from __future__ import annotations

import errno
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from threading import Lock
from types import TracebackType
from typing import TYPE_CHECKING

from agent.backend import BLOCK_BYTES, MigratableController
from agent.emulated.errors import (
    ControllerError,
    ControllerGoneError,
    LbaOutOfRangeError,
    NotRunningError,
    StateFormatError,
    WrongStateError,
)
from agent.emulated.state_format import (
    ControllerRegisters,
    ControllerState,
    QueueState,
    decode_state,
    encode_state,
)
from agent.vfio_states import DEFAULT_FEATURES, VfioState, path

__all__ = [
    "BLOCK_BYTES",
    "ControllerError",
    "ControllerGoneError",
    "EmulatedController",
    "LbaOutOfRangeError",
    "NamespaceSnapshot",
    "NotRunningError",
    "StateFormatError",
    "WrongStateError",
]

CHUNK_BYTES = 1 << 20
IO_QUEUE_PAIRS = 4
IO_QUEUE_ENTRIES = 256
ADMIN_QUEUE_ENTRIES = 32

# Register values of an enabled controller: CC.EN=1, IOSQES=6 (64-byte SQEs), IOCQES=4 (16-byte
# CQEs); CSTS.RDY=1; AQA holds the zero-based admin queue sizes.
_CC_ENABLED = 0x0046_0001
_CSTS_READY = 0x1
_AQA = (ADMIN_QUEUE_ENTRIES - 1) | ((ADMIN_QUEUE_ENTRIES - 1) << 16)
# Guest-physical addresses the guest driver "allocated" for its queues; arbitrary but fixed.
_ASQ_BASE = 0x1_0000_0000
_ACQ_BASE = 0x1_0001_0000
_IO_SQ_BASE = 0x1_0010_0000
_IO_CQ_BASE = 0x1_0020_0000
_QUEUE_STRIDE = 0x1_0000

# Queue attribute bits (our own encoding, see state_format): bit 0 physically contiguous;
# for completion queues bit 1 interrupts enabled and bit 2 the current phase tag; bits 31:16
# hold the bound CQ id (submission queues) or the interrupt vector (completion queues).
ATTR_PC = 1 << 0
ATTR_IEN = 1 << 1
ATTR_PHASE = 1 << 2

_GUEST_IO_STATES = frozenset({VfioState.RUNNING, VfioState.PRE_COPY})
_SAVE_STATES = frozenset({VfioState.STOP, VfioState.STOP_COPY})


@dataclass
class _Queue:
    """Mutable queue registers while the controller runs; frozen into QueueState on save."""

    qid: int
    base_address: int
    size: int
    head: int = 0
    tail: int = 0
    attributes: int = 0

    def frozen(self) -> QueueState:
        return QueueState(self.qid, self.base_address, self.size, self.head, self.tail, self.attributes)

    @classmethod
    def thawed(cls, q: QueueState) -> _Queue:
        return cls(q.qid, q.base_address, q.size, q.head, q.tail, q.attributes)


def _enabled_queues() -> tuple[list[_Queue], list[_Queue]]:
    """The queues a guest driver sets up at boot: admin pair plus IO_QUEUE_PAIRS I/O pairs."""
    sqs = [_Queue(0, _ASQ_BASE, ADMIN_QUEUE_ENTRIES, attributes=ATTR_PC)]
    cqs = [_Queue(0, _ACQ_BASE, ADMIN_QUEUE_ENTRIES, attributes=ATTR_PC | ATTR_IEN | ATTR_PHASE)]
    for qid in range(1, IO_QUEUE_PAIRS + 1):
        sqs.append(_Queue(qid, _IO_SQ_BASE + qid * _QUEUE_STRIDE, IO_QUEUE_ENTRIES,
                          attributes=ATTR_PC | (qid << 16)))
        cqs.append(_Queue(qid, _IO_CQ_BASE + qid * _QUEUE_STRIDE, IO_QUEUE_ENTRIES,
                          attributes=ATTR_PC | ATTR_IEN | ATTR_PHASE | (qid << 16)))
    return sqs, cqs


class NamespaceSnapshot:
    """Copy-on-write view of a namespace: later writes first save the blocks' old contents.

    The saved blocks live in memory, so a snapshot costs at most the blocks overwritten while it
    is open; close it as soon as its digest is taken.
    """

    def __init__(self, controller: EmulatedController) -> None:
        self._controller = controller
        self.saved: dict[int, bytes] = {}
        self.closed = False

    def digest(self) -> str:
        """sha256 hex of the namespace as it was when the snapshot was taken."""
        return self._controller._snapshot_digest(self)

    def close(self) -> None:
        self._controller._drop_snapshot(self)

    def __enter__(self) -> NamespaceSnapshot:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class EmulatedController:
    """An NVMe controller model whose namespace lives in a sparse file."""

    migration_features: frozenset[str] = DEFAULT_FEATURES

    def __init__(
        self, controller_id: str, namespace_path: Path, namespace_bytes: int, *, create: bool
    ) -> None:
        if not isinstance(controller_id, str) or not 0 < len(controller_id.encode("utf-8")) <= 255:
            raise ValueError(
                f"controller_id={controller_id!r} must be a non-empty string of at most 255 UTF-8 bytes"
            )
        if (
            not isinstance(namespace_bytes, int)
            or namespace_bytes <= 0
            or namespace_bytes % BLOCK_BYTES
        ):
            raise ValueError(
                f"namespace_bytes={namespace_bytes!r} must be a positive multiple of {BLOCK_BYTES}"
            )
        self._id = controller_id
        self._path = Path(namespace_path)
        self._bytes = namespace_bytes
        self._lock = Lock()
        if create:
            try:
                fd = os.open(self._path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            except FileExistsError:
                raise FileExistsError(
                    f"namespace file {self._path} already exists; pass create=False to open it, "
                    "or remove it first"
                ) from None
            try:
                os.ftruncate(fd, namespace_bytes)
            except BaseException:
                os.close(fd)
                self._path.unlink(missing_ok=True)
                raise
        else:
            try:
                fd = os.open(self._path, os.O_RDWR | os.O_CLOEXEC)
            except FileNotFoundError:
                raise FileNotFoundError(
                    f"namespace file {self._path} does not exist; pass create=True to make it"
                ) from None
            size = os.fstat(fd).st_size
            if size != namespace_bytes:
                os.close(fd)
                raise ValueError(
                    f"namespace file {self._path} is {size} bytes but namespace_bytes={namespace_bytes}; "
                    "pass the size it was created with"
                )
        self._fd: int | None = fd
        self._gone: str | None = None
        self._state = VfioState.RUNNING
        self._registers = ControllerRegisters(_CC_ENABLED, _CSTS_READY, _AQA, _ASQ_BASE, _ACQ_BASE)
        self._sqs, self._cqs = _enabled_queues()
        self._io_count = 0
        self._dirty: set[int] | None = None
        self._state_loaded = False
        self._snapshots: list[NamespaceSnapshot] = []

    @classmethod
    def for_resuming(
        cls, controller_id: str, namespace_path: Path, namespace_bytes: int, *, create: bool = True
    ) -> EmulatedController:
        """A destination controller in RESUMING with reset registers and no queues.

        create=True makes an empty namespace (the usual case); create=False reopens one already
        partly filled by an earlier attempt, which then must still receive every block.
        """
        ctrl = cls(controller_id, namespace_path, namespace_bytes, create=create)
        with ctrl._lock:
            # Power-on values until Set Controller State arrives; no queues exist yet.
            ctrl._registers = ControllerRegisters()
            ctrl._sqs, ctrl._cqs = [], []
            ctrl._state = VfioState.RESUMING
        return ctrl

    # ----- identity ---------------------------------------------------------------------------
    # Identity stays readable after release/close so that logs and error paths can name it.

    @property
    def controller_id(self) -> str:
        return self._id

    @property
    def namespace_bytes(self) -> int:
        return self._bytes

    @property
    def block_count(self) -> int:
        return self._bytes // BLOCK_BYTES

    @property
    def namespace_path(self) -> Path:
        return self._path

    @property
    def vfio_state(self) -> VfioState:
        with self._lock:
            self._usable_fd()
            return self._state

    @property
    def dirty_tracking(self) -> bool:
        with self._lock:
            self._usable_fd()
            return self._dirty is not None

    # ----- checks (call with the lock held) ---------------------------------------------------

    def _usable_fd(self) -> int:
        if self._fd is None:
            raise ControllerGoneError(f"controller {self._id} was {self._gone}; it cannot be used any more")
        return self._fd

    def _check_lbas(self, lba: int, count: int) -> None:
        if not isinstance(lba, int) or lba < 0 or lba + count > self.block_count:
            raise LbaOutOfRangeError(
                f"controller {self._id}: lba {lba}..{lba + count - 1} is outside the namespace "
                f"(lba 0..{self.block_count - 1})"
            )

    def _check_bytes(self, offset: int, length: int) -> None:
        if not isinstance(offset, int) or not isinstance(length, int) or offset < 0 or length < 0 \
                or offset + length > self._bytes:
            raise LbaOutOfRangeError(
                f"controller {self._id}: byte range offset={offset} length={length} is outside the "
                f"{self._bytes}-byte namespace"
            )

    def _guest_io_allowed(self, what: str) -> int:
        fd = self._usable_fd()
        if self._state not in _GUEST_IO_STATES:
            raise NotRunningError(
                f"controller {self._id}: guest {what} refused in state {self._state.name}; "
                "guest I/O runs only in RUNNING or PRE_COPY"
            )
        return fd

    def _require_state(self, allowed: frozenset[VfioState], what: str) -> int:
        fd = self._usable_fd()
        if self._state not in allowed:
            names = " or ".join(s.name for s in sorted(allowed))
            raise WrongStateError(
                f"controller {self._id}: {what} needs state {names}, but it is {self._state.name}"
            )
        return fd

    # ----- guest side -------------------------------------------------------------------------

    def write_blocks(self, lba: int, data: bytes) -> None:
        """Guest Write command: ``data`` (a multiple of BLOCK_BYTES) at ``lba``."""
        if not data or len(data) % BLOCK_BYTES:
            raise ValueError(
                f"write of {len(data)} bytes: length must be a positive multiple of {BLOCK_BYTES}"
            )
        count = len(data) // BLOCK_BYTES
        with self._lock:
            fd = self._guest_io_allowed("write")
            self._check_lbas(lba, count)
            self._write_locked(fd, lba * BLOCK_BYTES, data)
            if self._dirty is not None:
                self._dirty.update(range(lba, lba + count))
            self._advance_queues()

    def read_blocks(self, lba: int, count: int) -> bytes:
        """Guest Read command: ``count`` blocks from ``lba``."""
        if not isinstance(count, int) or count <= 0:
            raise ValueError(f"read of count={count!r} blocks: count must be a positive integer")
        with self._lock:
            fd = self._guest_io_allowed("read")
            self._check_lbas(lba, count)
            data = os.pread(fd, count * BLOCK_BYTES, lba * BLOCK_BYTES)
            self._advance_queues()
            return data

    def _advance_queues(self) -> None:
        """One command through an I/O queue pair: submitted, fetched, completed, reaped."""
        if len(self._sqs) <= 1 or len(self._cqs) <= 1:
            return
        pair = 1 + self._io_count % (min(len(self._sqs), len(self._cqs)) - 1)
        self._io_count += 1
        sq, cq = self._sqs[pair], self._cqs[pair]
        sq.tail = (sq.tail + 1) % sq.size
        sq.head = sq.tail
        cq.tail = (cq.tail + 1) % cq.size
        if cq.tail == 0:
            # The controller inverts the phase tag each time it wraps the completion queue.
            cq.attributes ^= ATTR_PHASE
        cq.head = cq.tail

    def _write_locked(self, fd: int, offset: int, data: bytes) -> None:
        live = [s for s in self._snapshots if not s.closed]
        if live:
            first = offset // BLOCK_BYTES
            count = len(data) // BLOCK_BYTES
            old: bytes | None = None
            for snap in live:
                for i in range(count):
                    if first + i not in snap.saved:
                        if old is None:
                            old = os.pread(fd, len(data), offset)
                        snap.saved[first + i] = old[i * BLOCK_BYTES : (i + 1) * BLOCK_BYTES]
        written = os.pwrite(fd, data, offset)
        if written != len(data):
            raise OSError(
                errno.EIO, f"short write to {self._path}: {written} of {len(data)} bytes at {offset}"
            )

    # ----- migration-controller side ----------------------------------------------------------

    def read_raw(self, offset: int, length: int) -> bytes:
        """Namespace bytes, in any state; holes read as zeros."""
        with self._lock:
            fd = self._usable_fd()
            self._check_bytes(offset, length)
            return os.pread(fd, length, offset)

    def write_raw(self, offset: int, data: bytes) -> None:
        """Apply migrated namespace bytes; only while RESUMING."""
        with self._lock:
            fd = self._require_state(frozenset({VfioState.RESUMING}), "write_raw")
            self._check_bytes(offset, len(data))
            if offset % BLOCK_BYTES == 0 and len(data) % BLOCK_BYTES == 0:
                self._write_locked(fd, offset, data)
            else:
                # Copy-on-write works on whole blocks: widen an unaligned piece to the blocks it
                # touches so an open snapshot still preserves their old contents.
                start = offset // BLOCK_BYTES * BLOCK_BYTES
                end = -(-(offset + len(data)) // BLOCK_BYTES) * BLOCK_BYTES
                block = bytearray(os.pread(fd, end - start, start))
                block[offset - start : offset - start + len(data)] = data
                self._write_locked(fd, start, bytes(block))

    def data_extents(self) -> list[tuple[int, int]]:
        """(offset, length) of allocated data from SEEK_DATA/SEEK_HOLE, block-aligned and merged."""
        with self._lock:
            fd = self._usable_fd()
            merged: list[list[int]] = []
            pos = 0
            while pos < self._bytes:
                try:
                    start = os.lseek(fd, pos, os.SEEK_DATA)
                except OSError as exc:
                    if exc.errno == errno.ENXIO:
                        break  # no data after pos
                    if exc.errno == errno.EINVAL:
                        # The file system cannot report holes: everything counts as data.
                        return [(0, self._bytes)]
                    raise
                if start >= self._bytes:
                    break
                stop = min(os.lseek(fd, start, os.SEEK_HOLE), self._bytes)
                lo = start // BLOCK_BYTES * BLOCK_BYTES
                hi = min(-(-stop // BLOCK_BYTES) * BLOCK_BYTES, self._bytes)
                if merged and lo <= merged[-1][1]:
                    merged[-1][1] = max(merged[-1][1], hi)
                else:
                    merged.append([lo, hi])
                pos = stop
            return [(lo, hi - lo) for lo, hi in merged]

    def start_dirty_tracking(self) -> None:
        """Track Send, LACT=start: log every LBA the guest writes from now on (idempotent)."""
        with self._lock:
            self._usable_fd()
            if self._dirty is None:
                self._dirty = set()

    def take_dirty_lbas(self) -> list[int]:
        """The LBAs written since the last call, sorted; the set is cleared."""
        with self._lock:
            self._usable_fd()
            if self._dirty is None:
                raise WrongStateError(
                    f"controller {self._id}: dirty tracking is off; call start_dirty_tracking() or "
                    "set_state(PRE_COPY) first"
                )
            taken = sorted(self._dirty)
            self._dirty.clear()
            return taken

    def dirty_block_count(self) -> int:
        """LBAs changed and not yet taken; 0 while tracking is off."""
        with self._lock:
            self._usable_fd()
            return 0 if self._dirty is None else len(self._dirty)

    def stop_dirty_tracking(self) -> None:
        """Track Send, LACT=stop: stop logging and forget what was not taken."""
        with self._lock:
            self._usable_fd()
            self._dirty = None

    def set_state(self, target: VfioState) -> None:
        """Walk ``vfio_states.path`` to ``target``, running the vfio-nvme action of each arc.

        If an arc's action fails, the controller stays in the last state it reached.
        """
        with self._lock:
            self._usable_fd()
            for step in path(self._state, VfioState(target), self.migration_features):
                self._run_arc(self._state, step)
                self._state = step

    def _run_arc(self, cur: VfioState, nxt: VfioState) -> None:
        arc = (cur, nxt)
        if arc == (VfioState.RUNNING, VfioState.PRE_COPY):
            # Track Send start: a fresh log, so that stale entries from an earlier attempt are
            # not mistaken for changes of this one.
            self._dirty = set()
        elif arc in ((VfioState.PRE_COPY, VfioState.RUNNING), (VfioState.STOP, VfioState.RUNNING)):
            # Track Send stop (PRE_COPY->RUNNING), or Resume after a rollback: nothing is being
            # migrated any more, so the log would only grow.
            self._dirty = None
        elif arc == (VfioState.STOP, VfioState.RESUMING):
            # A new resuming session needs its own Set Controller State before it may end.
            self._state_loaded = False
        elif arc == (VfioState.RESUMING, VfioState.STOP) and not self._state_loaded:
            raise StateFormatError(
                f"controller {self._id}: no controller state loaded; call load_state() with the "
                "source's save_state() before leaving RESUMING"
            )
        # RUNNING->STOP and PRE_COPY->STOP_COPY are Suspend: guest I/O is refused from the
        # state alone.  STOP->STOP_COPY and STOP_COPY->STOP need no action here: the state is
        # captured when save_state() is called.

    def current_state(self) -> ControllerState:
        """The controller state as it is now (for inspection; save_state() is the migration path)."""
        with self._lock:
            self._usable_fd()
            return self._state_locked()

    def _state_locked(self) -> ControllerState:
        return ControllerState(
            controller_id=self._id,
            namespace_bytes=self._bytes,
            registers=self._registers,
            submission_queues=tuple(q.frozen() for q in self._sqs),
            completion_queues=tuple(q.frozen() for q in self._cqs),
        )

    def save_state(self) -> bytes:
        """Get Controller State: the versioned container; in STOP_COPY or STOP (suspended)."""
        with self._lock:
            self._require_state(_SAVE_STATES, "save_state")
            return encode_state(self._state_locked())

    def load_state(self, blob: bytes) -> None:
        """Set Controller State: validate ``blob`` and apply it; only in RESUMING."""
        with self._lock:
            self._require_state(frozenset({VfioState.RESUMING}), "load_state")
            state = decode_state(blob)
            if state.controller_id != self._id:
                raise StateFormatError(
                    f"controller state is for controller {state.controller_id!r}, not {self._id!r}"
                )
            if state.namespace_bytes != self._bytes:
                raise StateFormatError(
                    f"controller state has namespace_bytes={state.namespace_bytes}, but controller "
                    f"{self._id} has {self._bytes}; create the destination with the source's size"
                )
            self._registers = state.registers
            self._sqs = [_Queue.thawed(q) for q in state.submission_queues]
            self._cqs = [_Queue.thawed(q) for q in state.completion_queues]
            self._io_count = 0
            self._state_loaded = True

    def digest(self) -> str:
        """sha256 hex of the whole namespace at one instant, even while the guest writes."""
        with self.begin_snapshot() as snap:
            return snap.digest()

    def begin_snapshot(self) -> NamespaceSnapshot:
        """A copy-on-write view of the namespace as it is now."""
        with self._lock:
            self._usable_fd()
            snap = NamespaceSnapshot(self)
            self._snapshots.append(snap)
            return snap

    def _snapshot_digest(self, snap: NamespaceSnapshot) -> str:
        h = hashlib.sha256()
        for offset in range(0, self._bytes, CHUNK_BYTES):
            length = min(CHUNK_BYTES, self._bytes - offset)
            # The lock is held per chunk only, so the guest is not stalled for a whole pass;
            # the file read and the saved-block overlay are consistent within the chunk.
            with self._lock:
                fd = self._usable_fd()
                if snap.closed:
                    raise ValueError("snapshot is closed; take a new one with begin_snapshot()")
                chunk = os.pread(fd, length, offset)
                first = offset // BLOCK_BYTES
                overlay = [
                    (lba, snap.saved[lba])
                    for lba in range(first, first + length // BLOCK_BYTES)
                    if lba in snap.saved
                ]
            if overlay:
                patched = bytearray(chunk)
                for lba, old in overlay:
                    at = (lba - first) * BLOCK_BYTES
                    patched[at : at + BLOCK_BYTES] = old
                chunk = bytes(patched)
            h.update(chunk)
        return h.hexdigest()

    def _drop_snapshot(self, snap: NamespaceSnapshot) -> None:
        with self._lock:
            snap.closed = True
            snap.saved.clear()
            if snap in self._snapshots:
                self._snapshots.remove(snap)

    # ----- lifetime ---------------------------------------------------------------------------

    def release(self) -> None:
        """Sanitize: delete the namespace file.  Idempotent, so a retried release is harmless."""
        with self._lock:
            self._shut("released")
            self._path.unlink(missing_ok=True)

    def close(self) -> None:
        """Close the namespace file but keep it (agent shutdown).  Idempotent."""
        with self._lock:
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
        self._dirty = None

    def __enter__(self) -> EmulatedController:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"EmulatedController({self._id!r}, {str(self._path)!r}, {self._bytes})"


if TYPE_CHECKING:

    def _conforms(c: EmulatedController) -> MigratableController:
        # mypy checks here that the emulated controller fulfils the backend contract.
        return c
