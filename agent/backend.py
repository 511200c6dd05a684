"""The backend contract: what the agent needs from a migratable NVMe controller.

Three backends fulfil it: ``emulated`` (agent.emulated.controller.EmulatedController, used by
every test), ``nvme-passthru`` (admin commands to a real PF) and ``vfio`` (the VFIO migration
uAPI on a real VF).  How an agent gets controllers of a backend (creates them, finds them again
after a restart, makes migration destinations) is agent.backends.hosting.

The contract is the VFIO migration state machine (agent.vfio_states) plus
the migration controller's view of the namespace: raw reads and writes, the allocated extents
for the first copy, and changed-LBA tracking for the dirty rounds.

LBAs are BLOCK_BYTES (4 KiB) blocks; byte offsets are into the namespace.  Every method may
block on I/O, so asyncio callers run them with ``asyncio.to_thread``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, runtime_checkable

from agent.vfio_states import VfioState

BLOCK_BYTES = 4096


@runtime_checkable
class Snapshot(Protocol):
    """A point-in-time view of a namespace that stays fixed while the guest keeps writing."""

    def digest(self) -> str:
        """The content digest (agent.namespace_digest) of the namespace as it was when the snapshot was taken."""
        ...

    def close(self) -> None:
        """Drop the view and the old block contents it preserved."""
        ...


@runtime_checkable
class MigratableController(Protocol):
    """A controller the migration controller (the host) can move between hosts."""

    @property
    def controller_id(self) -> str: ...

    @property
    def namespace_bytes(self) -> int: ...

    @property
    def vfio_state(self) -> VfioState: ...

    def read_raw(self, offset: int, length: int) -> bytes:
        """Read namespace bytes in any state (for copying and verification)."""
        ...

    def read_raw_into(self, offset: int, buffer: memoryview) -> None:
        """``read_raw`` of ``len(buffer)`` bytes into ``buffer`` (the data plane's reused buffers)."""
        ...

    def write_raw(self, offset: int, data: bytes) -> None:
        """Apply migrated namespace bytes; only in RESUMING."""
        ...

    def data_extents(self) -> list[tuple[int, int]]:
        """Sorted, merged (offset, length) ranges holding data, aligned to BLOCK_BYTES."""
        ...

    def start_dirty_tracking(self) -> None:
        """Start logging changed LBAs (Track Send, LACT=start)."""
        ...

    def take_dirty_lbas(self) -> list[int]:
        """The LBAs changed since the last call, sorted; clears the set."""
        ...

    def dirty_block_count(self) -> int:
        """How many LBAs are changed and not yet taken."""
        ...

    def stop_dirty_tracking(self) -> None:
        """Stop logging changed LBAs and drop the ones not yet taken."""
        ...

    def set_state(self, target: VfioState) -> None:
        """Walk the VFIO state machine to ``target``, running each arc's device action."""
        ...

    def save_state(self) -> bytes:
        """The controller state container (Get Controller State); in STOP or STOP_COPY."""
        ...

    def load_state(self, blob: bytes) -> None:
        """Validate and apply a controller state container; only in RESUMING."""
        ...

    def digest(self) -> str:
        """The content digest (agent.namespace_digest) of the whole namespace, consistent at one point in time."""
        ...

    def begin_snapshot(self) -> Snapshot:
        """A copy-on-write view of the namespace as it is now."""
        ...

    def release(self) -> None:
        """Sanitize (destroy the namespace data); the controller is unusable afterwards."""
        ...

    def close(self) -> None:
        """Release host resources but keep the namespace data."""
        ...


@runtime_checkable
class GuestDrivenController(MigratableController, Protocol):
    """A controller that also plays its guest's driver: the emulated backend's built-in guest.

    The guest workload, its verifier and the NBD export use this role; a real VF's guest is the
    VM it is passed to, which the agent cannot drive.
    """

    @property
    def block_count(self) -> int: ...

    @property
    def namespace_path(self) -> Path:
        """The file behind the namespace (the NBD export flushes it)."""
        ...

    def write_blocks(self, lba: int, data: bytes) -> None:
        """Guest Write command(s); NotRunningError while the controller is suspended."""
        ...

    def read_blocks(self, lba: int, count: int) -> bytes:
        """Guest Read command(s); NotRunningError while the controller is suspended."""
        ...
