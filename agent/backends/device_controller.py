"""What the two real-device backends share: the contract around a device that migrates itself.

The admin commands themselves are the host-side migration driver's
(``agent.nvme.migration_driver``), the one every backend uses.

``DeviceBackedController`` implements the parts of ``MigratableController`` that do not depend on
how the device is reached: the VFIO state walk (one arc at a time, so a failed arc leaves a known
state), namespace access through the PF's namespace block device, changed-LBA tracking through a
``ChangedLbaLog``, digests and lifetime.  The subclasses supply the device action of each arc and
the controller state transfer: ``NvmePassthruController`` with admin commands to the PF,
``VfioMigrationDevice`` with the VFIO migration uAPI.

A real device cannot keep a copy-on-write view of its namespace while the guest writes, so the
digest and snapshots are only offered while the controller is suspended (STOP, STOP_COPY or
RESUMING), when the media cannot change; a snapshot then computes its digest at once.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from threading import RLock
from types import TracebackType
from typing import Protocol, Self

from agent.backends.namespace_device import NamespaceDevice
from agent.controller_errors import ControllerGoneError, WrongStateError
from agent.vfio_states import VfioState, path

# States in which the guest cannot touch the namespace, so that its bytes stand still.
SUSPENDED_STATES = frozenset({VfioState.STOP, VfioState.STOP_COPY, VfioState.RESUMING})


class ChangedLbaLog(Protocol):
    """The LBAs the guest changed, as a migration controller logs them (Track Send into a CDQ);
    ``agent.nvme.migration_driver.CdqChangedLbaLog`` is the one implementation."""

    @property
    def active(self) -> bool: ...

    def start(self) -> None:
        """Begin an empty log."""
        ...

    def take(self) -> list[int]:
        """Sorted changed LBAs since the last take; clears them."""
        ...

    def pending(self) -> int:
        """How many changed LBAs are logged and not taken."""
        ...

    def stop(self) -> None:
        """Stop logging and drop what was not taken."""
        ...

    def close(self) -> None:
        """Release what the log holds open (its channel to the PF, when it owns one)."""
        ...


class FrozenSnapshot:
    """The digest of a namespace taken while it could not change."""

    def __init__(self, digest_hex: str) -> None:
        self._digest: str | None = digest_hex

    def digest(self) -> str:
        if self._digest is None:
            raise ValueError("snapshot is closed; take a new one with begin_snapshot()")
        return self._digest

    def close(self) -> None:
        self._digest = None


class DeviceBackedController(ABC):
    """The backend contract over a real device; subclasses add the device's arc actions."""

    def __init__(
        self, controller_id: str, namespace: NamespaceDevice, lba_log: ChangedLbaLog | None,
        state: VfioState, features: frozenset[str],
    ) -> None:
        self._id = controller_id
        self._namespace = namespace
        self._lba_log = lba_log
        self._state = state
        self.migration_features = features
        self._gone: str | None = None
        # Re-entrant: set_state holds it while the subclass's arc action calls back in.
        self._lock = RLock()

    # ----- identity -------------------------------------------------------------------------

    @property
    def controller_id(self) -> str:
        return self._id

    @property
    def namespace_bytes(self) -> int:
        return self._namespace.size_bytes

    @property
    def vfio_state(self) -> VfioState:
        with self._lock:
            self._usable()
            return self._state

    def _usable(self) -> None:
        if self._gone is not None:
            raise ControllerGoneError(f"controller {self._id} was {self._gone}; it cannot be used any more")

    def _require_state(self, allowed: frozenset[VfioState], what: str) -> None:
        self._usable()
        if self._state not in allowed:
            names = " or ".join(s.name for s in sorted(allowed))
            raise WrongStateError(f"controller {self._id}: {what} needs state {names}, but it is {self._state.name}")

    # ----- namespace --------------------------------------------------------------------------

    def read_raw(self, offset: int, length: int) -> bytes:
        with self._lock:
            self._usable()
            return self._namespace.read(offset, length)

    def read_raw_into(self, offset: int, buffer: memoryview) -> None:
        buffer[:] = self.read_raw(offset, len(buffer))  # the device reads through its own aligned buffer

    def write_raw(self, offset: int, data: bytes) -> None:
        with self._lock:
            self._require_state(frozenset({VfioState.RESUMING}), "write_raw")
            self._namespace.write(offset, data)

    def data_extents(self) -> list[tuple[int, int]]:
        with self._lock:
            self._usable()
            return self._namespace.data_extents()

    def digest(self) -> str:
        with self._lock:
            self._require_state(SUSPENDED_STATES, "a consistent digest of a real device")
            return self._namespace.digest()

    def begin_snapshot(self) -> FrozenSnapshot:
        """The namespace digest now; only while suspended, as a real device has no copy-on-write."""
        return FrozenSnapshot(self.digest())

    # ----- changed LBAs -----------------------------------------------------------------------

    def _no_state_loaded(self) -> WrongStateError:
        return WrongStateError(
            f"controller {self._id}: no controller state loaded; call load_state() with the "
            "source's save_state() before leaving RESUMING"
        )

    def _log(self) -> ChangedLbaLog:
        self._usable()
        if self._lba_log is None:
            raise WrongStateError(
                f"controller {self._id} has no changed-LBA log: open it with the PF that migrates it "
                "(its Track Send log) to track changed LBAs"
            )
        return self._lba_log

    def start_dirty_tracking(self) -> None:
        with self._lock:
            log = self._log()
            if not log.active:
                log.start()

    def take_dirty_lbas(self) -> list[int]:
        with self._lock:
            log = self._log()
            if not log.active:
                raise WrongStateError(
                    f"controller {self._id}: dirty tracking is off; call start_dirty_tracking() or "
                    "set_state(PRE_COPY) first"
                )
            return log.take()

    def dirty_block_count(self) -> int:
        with self._lock:
            self._usable()
            log = self._lba_log
            return log.pending() if log is not None and log.active else 0

    def stop_dirty_tracking(self) -> None:
        with self._lock:
            self._usable()
            if self._lba_log is not None and self._lba_log.active:
                self._lba_log.stop()

    # ----- the state machine ------------------------------------------------------------------

    def set_state(self, target: VfioState) -> None:
        """Walk ``vfio_states.path`` one arc at a time; a failed arc leaves the state it reached."""
        with self._lock:
            self._usable()
            for step in path(self._state, VfioState(target), self.migration_features):
                self._device_arc(self._state, step)
                self._state = step
                self._log_arc(step)

    def _log_arc(self, reached: VfioState) -> None:
        """Changed-LBA logging follows PRE_COPY: a fresh log on entry, none once running again."""
        log = self._lba_log
        if log is None:
            return
        if reached is VfioState.PRE_COPY:
            # A fresh log, so that stale entries of an earlier attempt are not taken for changes.
            if log.active:
                log.stop()
            log.start()
        elif reached is VfioState.RUNNING and log.active:
            # Back to running (rollback or done): nothing is migrated, the log would only grow.
            log.stop()

    @abstractmethod
    def _device_arc(self, cur: VfioState, nxt: VfioState) -> None:
        """Run the device's action for one arc; raise to leave the state at ``cur``."""

    @abstractmethod
    def save_state(self) -> bytes: ...

    @abstractmethod
    def load_state(self, blob: bytes) -> None: ...

    # ----- lifetime ---------------------------------------------------------------------------

    def release(self) -> None:
        """Sanitize: zero the namespace, then close.  Idempotent."""
        with self._lock:
            if self._gone is None:
                self._namespace.erase()
                self._shut("released")
            else:
                self._gone = "released"

    def close(self) -> None:
        """Close the device handles and keep the namespace data.  Idempotent."""
        with self._lock:
            if self._gone is None:
                self._shut("closed")

    def _shut(self, how: str) -> None:
        if self._lba_log is not None:
            try:
                if self._lba_log.active:
                    self._lba_log.stop()
            finally:
                self._lba_log.close()
        self._close_device()
        self._namespace.close()
        self._gone = how

    @abstractmethod
    def _close_device(self) -> None:
        """Close what the subclass opened (device and session file descriptors)."""

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

