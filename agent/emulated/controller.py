"""The emulated NVMe migratable controller: the default backend, a façade over the NVMe subsystem model.

It plays both roles of the TP4159 model, and each speaks real NVMe commands to the model
(``agent.emulated.model``, one subsystem per controller):

* the guest driver of a secondary controller (the VF): at power-on it enables the controller and
  creates I/O queue pairs with admin commands; ``write_blocks`` / ``read_blocks`` are Write / Read
  commands on those queues, round robin;
* the host as migration controller, on the primary controller's admin queue: that role is the
  host-side migration driver every backend uses (``agent.nvme.migration_driver``), carried into
  the model by ``ModelAdminTransport``.  Changed-LBA tracking is its User Data Migration Queue
  log; the VFIO arcs are its Suspend, Resume and Get / Set Controller State (in pieces), as the
  vfio-nvme mapping in DESIGN.md lays out.

The migration controller's bulk path to the namespace (``read_raw``, ``write_raw``,
``data_extents``, ``digest``, snapshots) goes straight to the namespace store, as a host copying
a namespace would use its own fast path rather than one 4 KiB command at a time.

Thread safety: the subsystem's re-entrant lock guards everything; façade calls that issue several
commands (a drain of the change log, a state transfer) hold it across them.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING

from agent.backend import BLOCK_BYTES, MigratableController
from agent.controller_errors import (
    ControllerError,
    ControllerGoneError,
    LbaOutOfRangeError,
    NotRunningError,
    StateFormatError,
    WrongStateError,
)
from agent.emulated.model.namespace import NamespaceSnapshot, NamespaceStore
from agent.emulated.model.structures import MAX_TRANSFER_BYTES
from agent.emulated.model.subsystem import PRIMARY_CNTLID, NvmeSubsystemModel
from agent.emulated.model_transport import ModelAdminTransport
from agent.nvme import commands
from agent.nvme.commands import Cqe, cqe_status
from agent.nvme.migration_driver import CdqChangedLbaLog, MigrationDriver
from agent.nvme.spec import Status
from agent.nvme.state_format import ControllerState
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
    "power_on_guest_driver",
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


def power_on_guest_driver(model: NvmeSubsystemModel, cntlid: int) -> list[int]:
    """What a guest's NVMe driver does at power-on: enable, identify, create I/O queue pairs.

    Returns the I/O submission queue ids.  The emulated controller runs it for its guest; a fake
    of a PF whose VFs are in use by VMs runs it for each VF.
    """
    model.enable_controller(cntlid, admin_entries=ADMIN_QUEUE_ENTRIES, asq=_ASQ_BASE, acq=_ACQ_BASE)
    admin = ModelAdminTransport(model, cntlid)
    admin.submit(commands.identify_controller(), "Identify", read_bytes=4096)
    admin.submit(commands.set_number_of_queues(IO_QUEUE_PAIRS, IO_QUEUE_PAIRS), "Set Features (number of queues)")
    for qid in range(1, IO_QUEUE_PAIRS + 1):
        admin.submit(commands.create_io_cq(qid, IO_QUEUE_ENTRIES, _IO_CQ_BASE + qid * _QUEUE_STRIDE, vector=qid),
                     "Create I/O CQ")
        admin.submit(commands.create_io_sq(qid, IO_QUEUE_ENTRIES, _IO_SQ_BASE + qid * _QUEUE_STRIDE, qid),
                     "Create I/O SQ")
    return list(range(1, IO_QUEUE_PAIRS + 1))


class EmulatedController:
    """An NVMe controller model whose namespace lives in a sparse file."""

    migration_features: frozenset[str] = DEFAULT_FEATURES

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
        # The host role: the migration driver on the primary's admin queue, with its change log.
        self._driver = MigrationDriver(ModelAdminTransport(self._model), self._cntlid, label=controller_id,
                                       state_piece_bytes=STATE_PIECE_BYTES)
        self._log: CdqChangedLbaLog = self._driver.change_log(NSID, self.block_count, queue_entries=CDQ_ENTRIES)
        self._guest_admin = ModelAdminTransport(self._model, self._cntlid)
        self._drain_at = 0  # entries waiting that make the guest's write path drain the log
        self._stop_copy_state: bytes | None = None
        self._state_loaded = False
        if resuming:
            # No registers and no queues until Set Controller State brings the source's.
            self._state = VfioState.RESUMING
        else:
            self._state = VfioState.RUNNING
            self._io_sqids = power_on_guest_driver(self._model, self._cntlid)

    @classmethod
    def for_resuming(
        cls, controller_id: str, namespace_path: Path, namespace_bytes: int, *, create: bool = True
    ) -> EmulatedController:
        """A destination controller in RESUMING with reset registers and no queues.

        create=True makes an empty namespace (the usual case); create=False reopens one already
        partly filled by an earlier attempt, which then must still receive every block.
        """
        return cls(controller_id, namespace_path, namespace_bytes, create=create, resuming=True)

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
            return self._log.active

    # Sizes of the host's transfers; set them before a migration (tests use small ones to reach a
    # full change log and multi-piece state transfers).

    @property
    def cdq_entries(self) -> int:
        return self._log.queue_entries

    @cdq_entries.setter
    def cdq_entries(self, value: int) -> None:
        self._log.queue_entries = value

    @property
    def state_piece_bytes(self) -> int:
        return self._driver.state_piece_bytes

    @state_piece_bytes.setter
    def state_piece_bytes(self, value: int) -> None:
        self._driver.state_piece_bytes = value

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

    def _next_cid(self) -> int:
        self._cid = (self._cid + 1) & 0xFFFF
        return self._cid

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
        detail = (self._guest_admin.explain(cqe.status) if cqe.more else "") or "no detail reported"
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
            if self._drain_at and self._log.waiting(self._drain_at):
                # As a driver would on the tail pointer event: hand slots back before the queue fills.
                self._log.drain(refresh=False)

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

    def read_raw_into(self, offset: int, buffer: memoryview) -> None:
        """``read_raw`` into the caller's buffer (the data plane reuses one per chunk)."""
        self._store.read_into(offset, buffer)

    def write_raw(self, offset: int, data: bytes) -> None:
        """Apply migrated namespace bytes; only while RESUMING."""
        with self._lock:
            self._require_state(frozenset({VfioState.RESUMING}), "write_raw")
            self._store.write(offset, data)

    def data_extents(self) -> list[tuple[int, int]]:
        """(offset, length) of allocated data, block-aligned and merged."""
        return self._store.extents()

    def digest(self) -> str:
        """The content digest of the whole namespace at one instant, even while the guest writes."""
        return self._store.digest()

    def begin_snapshot(self) -> NamespaceSnapshot:
        """A copy-on-write view of the namespace as it is now."""
        return self._store.begin_snapshot()

    # ----- migration-controller side: changed LBAs --------------------------------------------

    def start_dirty_tracking(self) -> None:
        """Controller Data Queue create + Track Send start; idempotent (keeps what is logged)."""
        with self._lock:
            self._store.usable_fd()
            if not self._log.active:
                self._start_tracking()

    def _start_tracking(self) -> None:
        self._log.start()
        self._drain_at = self._log.entries // CDQ_DRAIN_FRACTION

    def take_dirty_lbas(self) -> list[int]:
        """The LBAs written since the last call, sorted, from the change log's entries."""
        with self._lock:
            self._store.usable_fd()
            if not self._log.active:
                raise WrongStateError(
                    f"controller {self._id}: dirty tracking is off; call start_dirty_tracking() or "
                    "set_state(PRE_COPY) first"
                )
            return self._log.take()

    def dirty_block_count(self) -> int:
        """LBAs changed and not yet taken; 0 while tracking is off."""
        with self._lock:
            self._store.usable_fd()
            return self._log.pending() if self._log.active else 0

    def stop_dirty_tracking(self) -> None:
        """Track Send stop + Controller Data Queue delete: forget what was not taken."""
        with self._lock:
            self._store.usable_fd()
            self._log.stop()

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
            self._log.stop()
            self._start_tracking()
        elif arc == (VfioState.PRE_COPY, VfioState.RUNNING):
            self._log.stop()  # nothing is being migrated any more: the log would only grow
        elif arc in ((VfioState.RUNNING, VfioState.STOP), (VfioState.PRE_COPY, VfioState.STOP_COPY)):
            self._driver.suspend()
            if nxt == VfioState.STOP_COPY:
                self._stop_copy_state = self._driver.get_state()
        elif arc == (VfioState.STOP, VfioState.STOP_COPY):
            self._stop_copy_state = self._driver.get_state()
        elif arc == (VfioState.STOP_COPY, VfioState.STOP):
            self._stop_copy_state = None  # the saving session ends
        elif arc == (VfioState.STOP, VfioState.RUNNING):
            # Resume after a rollback: nothing is being migrated any more.
            self._driver.resume()
            self._log.stop()
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

    def save_state(self) -> bytes:
        """The versioned container; in STOP_COPY (captured on entry) or STOP (suspended)."""
        with self._lock:
            self._require_state(_SAVE_STATES, "save_state")
            if self._state == VfioState.STOP_COPY and self._stop_copy_state is not None:
                return self._stop_copy_state
            return self._driver.get_state()

    def load_state(self, blob: bytes) -> None:
        """Set Controller State in pieces; the controller validates the whole before applying it."""
        with self._lock:
            self._require_state(frozenset({VfioState.RESUMING}), "load_state")
            self._driver.set_state(blob)
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
            self._log.forget()

    def close(self) -> None:
        """Close the namespace file but keep it (agent shutdown).  Idempotent."""
        with self._lock:
            self._store.close()
            self._log.forget()

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
