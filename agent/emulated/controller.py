"""The emulated NVMe migratable controller: the default backend, a façade over the NVMe subsystem model.

It plays both roles of the TP4159 model, and each speaks real NVMe commands to the model
(``agent.emulated.model``, one subsystem per controller):

* the guest driver of a secondary controller (the VF): at power-on it enables the controller and
  creates I/O queue pairs with admin commands; ``write_blocks`` / ``read_blocks`` are Write / Read
  commands on those queues, round robin;
* the host as migration controller, on the primary controller's admin queue: changed-LBA tracking
  is a User Data Migration Queue (Controller Data Queue create + Track Send), read by phase tag and
  handed back with Set Features (FID 21h); the VFIO arcs are Suspend, Resume and Get / Set
  Controller State (in pieces) as the vfio-nvme mapping in DESIGN.md lays out.

The migration controller's bulk path to the namespace (``read_raw``, ``write_raw``,
``data_extents``, ``digest``, snapshots) goes straight to the namespace store, as a host copying
a namespace would use its own fast path rather than one 4 KiB command at a time.

Thread safety: the subsystem's re-entrant lock guards everything; façade calls that issue several
commands (a drain of the change log, a state transfer) hold it across them.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
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
from agent.emulated.model.namespace import NamespaceSnapshot, NamespaceStore
from agent.emulated.model.structures import MAX_TRANSFER_BYTES, parse_error_detail
from agent.emulated.model.subsystem import PRIMARY_CNTLID, NvmeSubsystemModel
from agent.emulated.state_format import ControllerState, container_length
from agent.nvme import cdq, commands
from agent.nvme.cdq import CdqReader, EntrySequence, LbaChange
from agent.nvme.commands import Cqe, Sqe, cqe_status
from agent.nvme.spec import CDQ_ENTRY_BYTES, LoggingAction, LogPageId, SequenceIndicator, Status
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

NSID = 1
IO_QUEUE_PAIRS = 4
IO_QUEUE_ENTRIES = 256
ADMIN_QUEUE_ENTRIES = 32
# Guest-physical addresses the guest driver "allocated" for its queues and buffers; arbitrary but
# fixed, since they travel in the controller state.
_ASQ_BASE = 0x1_0000_0000
_ACQ_BASE = 0x1_0001_0000
_IO_SQ_BASE = 0x1_0010_0000
_IO_CQ_BASE = 0x1_0020_0000
_QUEUE_STRIDE = 0x1_0000
_GUEST_BUFFER = 0x2_0000_0000
# The change log: 65536 entries (2 MiB of host memory).  The host drains it once a sixteenth of it
# is waiting (4096 entries, a few milliseconds of work), as a driver would on the tail pointer
# event, so a guest does not fill it between two dirty rounds.
CDQ_ENTRIES = 1 << 16
CDQ_DRAIN_FRACTION = 16
STATE_PIECE_BYTES = 4096

_GUEST_IO_STATES = frozenset({VfioState.RUNNING, VfioState.PRE_COPY})
_SAVE_STATES = frozenset({VfioState.STOP, VfioState.STOP_COPY})


@dataclass
class _ChangeTracking:
    """The host's side of one user data migration queue, and the LBAs drained from it not yet taken."""

    cdqid: int
    address: int
    reader: CdqReader
    drain_at: int  # entries waiting that make the guest's write path drain the log (0: never)
    dirty: set[int] = field(default_factory=set)
    all_changed: bool = False


class EmulatedController:
    """An NVMe controller model whose namespace lives in a sparse file."""

    migration_features: frozenset[str] = DEFAULT_FEATURES
    # Sizes of the host's transfers; an instance may change them before it migrates (tests use
    # small ones to reach a full change log and multi-piece state transfers).
    cdq_entries: int = CDQ_ENTRIES
    state_piece_bytes: int = STATE_PIECE_BYTES

    def __init__(
        self, controller_id: str, namespace_path: Path, namespace_bytes: int, *, create: bool,
        resuming: bool = False,
    ) -> None:
        """Open (or with ``create``, make) the namespace and power the controller on, RUNNING.

        ``resuming`` makes a migration destination instead; ``for_resuming`` is the usual way.
        """
        if not isinstance(controller_id, str) or not 0 < len(controller_id.encode("utf-8")) <= 255:
            raise ValueError(
                f"controller_id={controller_id!r} must be a non-empty string of at most 255 UTF-8 bytes"
            )
        self._id = controller_id
        self._path = Path(namespace_path)
        self._bytes = namespace_bytes
        serial = "NVMIG" + hashlib.sha256(controller_id.encode("utf-8")).hexdigest()[:15].upper()
        self._model = NvmeSubsystemModel(serial)
        self._lock = self._model.lock
        self._store = NamespaceStore(self._path, namespace_bytes, create=create, lock=self._lock,
                                     label=f"controller {controller_id}")
        self._cntlid = self._model.add_secondary(controller_id, suspended=resuming)
        self._model.attach_namespace(NSID, self._store, (PRIMARY_CNTLID, self._cntlid))
        self._cid = 0
        self._io_sqids: list[int] = []
        self._io_count = 0
        self._tracking: _ChangeTracking | None = None
        self._stop_copy_state: bytes | None = None
        self._state_loaded = False
        if resuming:
            # No registers and no queues until Set Controller State brings the source's.
            self._state = VfioState.RESUMING
        else:
            self._state = VfioState.RUNNING
            self._boot()

    @classmethod
    def for_resuming(
        cls, controller_id: str, namespace_path: Path, namespace_bytes: int, *, create: bool = True
    ) -> EmulatedController:
        """A destination controller in RESUMING with reset registers and no queues.

        create=True makes an empty namespace (the usual case); create=False reopens one already
        partly filled by an earlier attempt, which then must still receive every block.
        """
        return cls(controller_id, namespace_path, namespace_bytes, create=create, resuming=True)

    def _boot(self) -> None:
        """What the guest's NVMe driver does at power-on: enable, identify, create I/O queue pairs."""
        self._model.enable_controller(self._cntlid, admin_entries=ADMIN_QUEUE_ENTRIES, asq=_ASQ_BASE,
                                      acq=_ACQ_BASE)
        guest = self._cntlid
        self._command(guest, commands.identify_controller(cid=self._next_cid()), "Identify")
        self._command(guest, commands.set_number_of_queues(IO_QUEUE_PAIRS, IO_QUEUE_PAIRS, cid=self._next_cid()),
                      "Set Features (number of queues)")
        for qid in range(1, IO_QUEUE_PAIRS + 1):
            self._command(guest, commands.create_io_cq(qid, IO_QUEUE_ENTRIES, _IO_CQ_BASE + qid * _QUEUE_STRIDE,
                                                       vector=qid, cid=self._next_cid()), "Create I/O CQ")
            self._command(guest, commands.create_io_sq(qid, IO_QUEUE_ENTRIES, _IO_SQ_BASE + qid * _QUEUE_STRIDE,
                                                       qid, cid=self._next_cid()), "Create I/O SQ")
        self._io_sqids = list(range(1, IO_QUEUE_PAIRS + 1))

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
    def model(self) -> NvmeSubsystemModel:
        """The subsystem underneath (raw commands, health, inspection)."""
        return self._model

    @property
    def cntlid(self) -> int:
        """The secondary controller the guest drives."""
        return self._cntlid

    @property
    def vfio_state(self) -> VfioState:
        with self._lock:
            self._store.usable_fd()
            return self._state

    @property
    def dirty_tracking(self) -> bool:
        with self._lock:
            self._store.usable_fd()
            return self._tracking is not None

    # ----- commands ---------------------------------------------------------------------------

    def _next_cid(self) -> int:
        self._cid = (self._cid + 1) & 0xFFFF
        return self._cid

    def _command(self, cntlid: int, sqe: Sqe, what: str, data: bytes | None = None,
                 error: type[ControllerError] = ControllerError) -> tuple[Cqe, bytes]:
        """One admin command; a failure raises ``error`` with the controller's detail text."""
        raw, out = self._model.submit_admin(cntlid, sqe.encode(), data)
        cqe = Cqe.decode(raw)
        if not cqe.ok:
            raise error(f"controller {self._id}: {what} failed with {cqe.status_name}: "
                        f"{self._error_detail(cntlid, cqe)}")
        return cqe, out

    def _error_detail(self, cntlid: int, cqe: Cqe) -> str:
        """The failed command's explanation from the error detail log page, when the More bit says so."""
        if not cqe.more:
            return "no detail reported"
        raw, page = self._model.submit_admin(
            cntlid, commands.get_log_page(LogPageId.ERROR_DETAIL, 4096, cid=self._next_cid()).encode())
        return parse_error_detail(page)[1] if not cqe_status(raw) else "the error detail log could not be read"

    def _host(self, sqe: Sqe, what: str, data: bytes | None = None,
              error: type[ControllerError] = ControllerError) -> tuple[Cqe, bytes]:
        """A migration controller command about our secondary, on the primary's admin queue."""
        return self._command(PRIMARY_CNTLID, sqe, what, data, error)

    # ----- checks (call with the lock held) ---------------------------------------------------

    def _check_lbas(self, lba: int, count: int) -> None:
        # The driver checks against NSZE before it splits a request into commands, so a request
        # that ends outside the namespace changes nothing.
        if not isinstance(lba, int) or lba < 0 or lba + count > self.block_count:
            raise LbaOutOfRangeError(
                f"controller {self._id}: lba {lba}..{lba + count - 1} is outside the namespace "
                f"(lba 0..{self.block_count - 1})"
            )

    def _require_state(self, allowed: frozenset[VfioState], what: str) -> None:
        self._store.usable_fd()
        if self._state not in allowed:
            names = " or ".join(s.name for s in sorted(allowed))
            raise WrongStateError(
                f"controller {self._id}: {what} needs state {names}, but it is {self._state.name}"
            )

    # ----- guest side -------------------------------------------------------------------------

    def _next_sqid(self, what: str) -> int:
        if not self._io_sqids:
            if self._state not in _GUEST_IO_STATES:
                raise NotRunningError(f"controller {self._id}: guest {what} refused in state {self._state.name}; "
                                      "guest I/O runs only in RUNNING or PRE_COPY")
            raise ControllerError(f"controller {self._id}: guest {what} impossible: the controller has no I/O "
                                  "submission queues")
        sqid = self._io_sqids[self._io_count % len(self._io_sqids)]
        self._io_count += 1
        return sqid

    def _io_failure(self, raw: bytes, what: str) -> ControllerError:
        cqe = Cqe.decode(raw)
        if cqe.status == Status.NAMESPACE_NOT_READY and not cqe.dnr:
            return NotRunningError(f"controller {self._id}: guest {what} refused in state {self._state.name}; "
                                   "guest I/O runs only in RUNNING or PRE_COPY")
        detail = self._error_detail(self._cntlid, cqe)
        if cqe.status == Status.LBA_OUT_OF_RANGE:
            return LbaOutOfRangeError(f"controller {self._id}: {detail}")
        return ControllerError(f"controller {self._id}: guest {what} failed with {cqe.status_name}: {detail}")

    def write_blocks(self, lba: int, data: bytes) -> None:
        """Guest Write command(s): ``data`` (a multiple of BLOCK_BYTES) at ``lba``."""
        if not data or len(data) % BLOCK_BYTES:
            raise ValueError(
                f"write of {len(data)} bytes: length must be a positive multiple of {BLOCK_BYTES}"
            )
        with self._lock:
            self._store.usable_fd()
            self._check_lbas(lba, len(data) // BLOCK_BYTES)
            for at in range(0, len(data), MAX_TRANSFER_BYTES):
                piece = data if len(data) <= MAX_TRANSFER_BYTES else data[at : at + MAX_TRANSFER_BYTES]
                sqe = commands.write(NSID, lba + at // BLOCK_BYTES, len(piece) // BLOCK_BYTES,
                                     cid=self._next_cid(), prp1=_GUEST_BUFFER)
                raw, _ = self._model.submit_io(self._cntlid, self._next_sqid("write"), sqe.encode(), piece)
                if cqe_status(raw):
                    raise self._io_failure(raw, "write")
            tracking = self._tracking
            if tracking is not None and tracking.reader.has_at_least(tracking.drain_at):
                self._drain(tracking, flush=False)

    def read_blocks(self, lba: int, count: int) -> bytes:
        """Guest Read command(s): ``count`` blocks from ``lba``."""
        if not isinstance(count, int) or count <= 0:
            raise ValueError(f"read of count={count!r} blocks: count must be a positive integer")
        per_command = MAX_TRANSFER_BYTES // BLOCK_BYTES
        with self._lock:
            self._store.usable_fd()
            self._check_lbas(lba, count)
            pieces = []
            for first in range(lba, lba + count, per_command):
                sqe = commands.read(NSID, first, min(per_command, lba + count - first), cid=self._next_cid(),
                                    prp1=_GUEST_BUFFER)
                raw, out = self._model.submit_io(self._cntlid, self._next_sqid("read"), sqe.encode())
                if cqe_status(raw):
                    raise self._io_failure(raw, "read")
                pieces.append(out)
            return pieces[0] if len(pieces) == 1 else b"".join(pieces)

    # ----- migration-controller side: the namespace ---------------------------------------------

    def read_raw(self, offset: int, length: int) -> bytes:
        """Namespace bytes, in any state; holes read as zeros."""
        return self._store.read(offset, length)

    def write_raw(self, offset: int, data: bytes) -> None:
        """Apply migrated namespace bytes; only while RESUMING."""
        with self._lock:
            self._require_state(frozenset({VfioState.RESUMING}), "write_raw")
            self._store.write(offset, data)

    def data_extents(self) -> list[tuple[int, int]]:
        """(offset, length) of allocated data, block-aligned and merged."""
        return self._store.extents()

    def digest(self) -> str:
        """sha256 hex of the whole namespace at one instant, even while the guest writes."""
        return self._store.digest()

    def begin_snapshot(self) -> NamespaceSnapshot:
        """A copy-on-write view of the namespace as it is now."""
        return self._store.begin_snapshot()

    # ----- migration-controller side: changed LBAs --------------------------------------------

    def start_dirty_tracking(self) -> None:
        """Controller Data Queue create + Track Send start; idempotent (keeps what is logged)."""
        with self._lock:
            self._store.usable_fd()
            if self._tracking is None:
                self._start_tracking()

    def _start_tracking(self) -> None:
        entries = self.cdq_entries
        size_bytes = entries * CDQ_ENTRY_BYTES
        address = self._model.host_memory.allocate(size_bytes)
        try:
            cqe, _ = self._host(commands.cdq_create(self._cntlid, size_bytes // 4, address, cid=self._next_cid()),
                                "Controller Data Queue create")
        except ControllerError:
            self._model.host_memory.free(address)
            raise
        reader = CdqReader(self._model.host_memory.view(address, size_bytes), entries)
        self._tracking = _ChangeTracking(cqe.dw0 & 0xFFFF, address, reader, entries // CDQ_DRAIN_FRACTION)
        self._log_changes(self._tracking)

    def _log_changes(self, tracking: _ChangeTracking) -> None:
        """Track Send start.  A suspended controller refuses it, and may: it runs no guest I/O, and
        the Resume that ends the suspension ends this tracking too."""
        raw, _ = self._model.submit_admin(
            PRIMARY_CNTLID, commands.track_send(tracking.cdqid, LoggingAction.START, cid=self._next_cid()).encode())
        if cqe_status(raw) not in (Status.SUCCESS, Status.CONTROLLER_SUSPENDED):
            cqe = Cqe.decode(raw)
            raise ControllerError(f"controller {self._id}: Track Send start failed with {cqe.status_name}: "
                                  f"{self._error_detail(PRIMARY_CNTLID, cqe)}")

    def _drain(self, tracking: _ChangeTracking, *, flush: bool) -> None:
        """Move the posted entries into ``tracking.dirty`` and hand their slots back.

        ``flush`` first asks for the pointers (Get Features 21h), which makes the controller post
        the range it was still extending.  An entry reporting a full queue means logging stopped
        with "all LBAs changed": it is turned back on before the lock is released, so every later
        change is logged again while the whole namespace counts as changed until taken.
        """
        if flush:
            self._host(commands.get_cdq_pointers(tracking.cdqid, cid=self._next_cid()), "Get Features (CDQ)")
        head = tracking.reader.head
        restart = False
        dirty = tracking.dirty
        for _, slba, nlb, attributes in tracking.reader.take():
            change = cdq.change_of(attributes)
            if change == LbaChange.RANGE_VALID:
                dirty.update(range(slba, slba + nlb + 1))
            elif change == LbaChange.ALL_CHANGED:
                tracking.all_changed = True
            if cdq.sequence_of(attributes) == EntrySequence.LAST_QUEUE_FULL:
                restart = True
        if tracking.reader.head != head:
            self._host(commands.set_cdq_head(tracking.cdqid, tracking.reader.head, cid=self._next_cid()),
                       "Set Features (CDQ head)")
        if restart:
            self._log_changes(tracking)

    def take_dirty_lbas(self) -> list[int]:
        """The LBAs written since the last call, sorted, from the change log's entries."""
        with self._lock:
            self._store.usable_fd()
            tracking = self._tracking
            if tracking is None:
                raise WrongStateError(
                    f"controller {self._id}: dirty tracking is off; call start_dirty_tracking() or "
                    "set_state(PRE_COPY) first"
                )
            self._drain(tracking, flush=True)
            taken = list(range(self.block_count)) if tracking.all_changed else sorted(tracking.dirty)
            tracking.dirty = set()
            tracking.all_changed = False
            return taken

    def dirty_block_count(self) -> int:
        """LBAs changed and not yet taken; 0 while tracking is off."""
        with self._lock:
            self._store.usable_fd()
            tracking = self._tracking
            if tracking is None:
                return 0
            self._drain(tracking, flush=True)
            return self.block_count if tracking.all_changed else len(tracking.dirty)

    def stop_dirty_tracking(self) -> None:
        """Track Send stop + Controller Data Queue delete: forget what was not taken."""
        with self._lock:
            self._store.usable_fd()
            self._end_tracking()

    def _end_tracking(self) -> None:
        tracking = self._tracking
        if tracking is None:
            return
        self._tracking = None
        self._host(commands.track_send(tracking.cdqid, LoggingAction.STOP, cid=self._next_cid()), "Track Send stop")
        self._host(commands.cdq_delete(tracking.cdqid, cid=self._next_cid()), "Controller Data Queue delete")
        self._model.host_memory.free(tracking.address)

    # ----- migration-controller side: the VFIO state machine ----------------------------------

    def set_state(self, target: VfioState) -> None:
        """Walk ``vfio_states.path`` to ``target``, running the vfio-nvme action of each arc.

        If an arc's action fails, the controller stays in the last state it reached.
        """
        with self._lock:
            self._store.usable_fd()
            for step in path(self._state, VfioState(target), self.migration_features):
                self._run_arc(self._state, step)
                self._state = step

    def _run_arc(self, cur: VfioState, nxt: VfioState) -> None:
        arc = (cur, nxt)
        if arc == (VfioState.RUNNING, VfioState.PRE_COPY):
            # A fresh log, so that stale entries from an earlier attempt are not mistaken for
            # changes of this one.
            self._end_tracking()
            self._start_tracking()
        elif arc == (VfioState.PRE_COPY, VfioState.RUNNING):
            self._end_tracking()  # nothing is being migrated any more: the log would only grow
        elif arc in ((VfioState.RUNNING, VfioState.STOP), (VfioState.PRE_COPY, VfioState.STOP_COPY)):
            self._host(commands.migration_suspend(self._cntlid, cid=self._next_cid()), "Suspend")
            if nxt == VfioState.STOP_COPY:
                self._stop_copy_state = self._get_state()
        elif arc == (VfioState.STOP, VfioState.STOP_COPY):
            self._stop_copy_state = self._get_state()
        elif arc == (VfioState.STOP_COPY, VfioState.STOP):
            self._stop_copy_state = None  # the saving session ends
        elif arc == (VfioState.STOP, VfioState.RUNNING):
            # Resume after a rollback: nothing is being migrated any more.
            self._host(commands.migration_resume(self._cntlid, cid=self._next_cid()), "Resume")
            self._end_tracking()
        elif arc == (VfioState.STOP, VfioState.RESUMING):
            # A new resuming session needs its own Set Controller State before it may end.
            self._state_loaded = False
        elif arc == (VfioState.RESUMING, VfioState.STOP) and not self._state_loaded:
            raise StateFormatError(
                f"controller {self._id}: no controller state loaded; call load_state() with the "
                "source's save_state() before leaving RESUMING"
            )

    def current_state(self) -> ControllerState:
        """The controller state as it is now (for inspection; save_state() is the migration path)."""
        with self._lock:
            self._store.usable_fd()
            return self._model.controller_state(self._cntlid)

    def _get_state(self) -> bytes:
        """Get Controller State in pieces: the first says how long the container is."""
        def piece(offset: int, length: int) -> tuple[Cqe, bytes]:
            return self._host(commands.get_controller_state(self._cntlid, offset, length, cid=self._next_cid()),
                              "Get Controller State")

        cqe, first = piece(0, self.state_piece_bytes)
        if not cqe.dw0 & 1:
            raise WrongStateError(f"controller {self._id}: Get Controller State reports CSUP=0; the controller "
                                  "is not suspended, so its state is not stable")
        total = container_length(first)
        blob = bytearray(first[:total])
        while len(blob) < total:
            remaining = total - len(blob)
            _, more = piece(len(blob), min(self.state_piece_bytes, remaining + -remaining % 4))
            blob += more[:remaining]
        return bytes(blob)

    def save_state(self) -> bytes:
        """The versioned container; in STOP_COPY (captured on entry) or STOP (suspended)."""
        with self._lock:
            self._require_state(_SAVE_STATES, "save_state")
            if self._state == VfioState.STOP_COPY and self._stop_copy_state is not None:
                return self._stop_copy_state
            return self._get_state()

    def load_state(self, blob: bytes) -> None:
        """Set Controller State in pieces; the controller validates the whole before applying it."""
        with self._lock:
            self._require_state(frozenset({VfioState.RESUMING}), "load_state")
            stream = bytes(blob) + bytes(-len(blob) % 4 or (4 if not blob else 0))
            size = self.state_piece_bytes
            offsets = range(0, len(stream), size)
            for n, offset in enumerate(offsets):
                if len(offsets) == 1:
                    sequence = SequenceIndicator.ENTIRE
                elif n == 0:
                    sequence = SequenceIndicator.FIRST
                elif n == len(offsets) - 1:
                    sequence = SequenceIndicator.LAST
                else:
                    sequence = SequenceIndicator.MIDDLE
                chunk = stream[offset : offset + size]
                self._host(commands.set_controller_state(self._cntlid, offset, len(chunk), sequence,
                                                         cid=self._next_cid()),
                           "Set Controller State", chunk, StateFormatError)
            # The guest driver's view of its queues is in guest memory, which migrates with the
            # guest; here it is the loaded state's I/O submission queues.
            loaded = self._model.controller_state(self._cntlid)
            self._io_sqids = [q.qid for q in loaded.submission_queues if q.qid]
            self._io_count = 0
            self._state_loaded = True

    # ----- lifetime ---------------------------------------------------------------------------

    def release(self) -> None:
        """Sanitize: delete the namespace file.  Idempotent, so a retried release is harmless."""
        with self._lock:
            self._store.release()
            self._tracking = None

    def close(self) -> None:
        """Close the namespace file but keep it (agent shutdown).  Idempotent."""
        with self._lock:
            self._store.close()
            self._tracking = None

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
