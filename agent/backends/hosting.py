"""How an agent hosts controllers on its backend: the one interface agent/host.py uses.

A ``ControllerHosting`` owns the host's resources of one backend kind (namespace files, or VF
slots of a PF) and the metadata in the agent's data dir that says which controller uses which,
so that a restarted agent finds its controllers again:

- ``create``: a new controller, RUNNING, with an empty namespace;
- ``hosted_ids`` / ``reopen`` / ``discard``: after a restart, the controllers this agent ran,
  opened again (``reopen``) or, when another node owns them now, sanitized and forgotten
  (``discard``, which never needs them open);
- ``create_destination``: a migration destination in RESUMING for a job; ``pending_destinations``
  / ``reload_destination``: after a restart, the destinations prepared and not yet running;
  ``adopt_destination``: a destination about to run is recorded as a hosted controller (before
  it claims the controller in etcd and runs it), ``unadopt_destination`` undoes that when the
  claim fails;
- ``release``: a controller or destination that was sanitized (its ``release()``) gives its
  resources back;
- ``capacity_problem`` / ``capacity_bytes`` / ``allocated_bytes``: what fits, as etcd is told;
- ``capabilities``: what the backend offers beyond the controller contract.

Every method may block on I/O (files, device commands): asyncio callers use ``asyncio.to_thread``.
``open_hosting`` builds the hosting of a backend kind from the agent's flags.
"""

from __future__ import annotations

import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from agent.backend import GuestDrivenController, MigratableController
from agent.backends.ioctl_abi import IoctlFn, kernel_ioctl


class HostingError(Exception):
    """The hosting cannot do what was asked (no free slot, unusable data dir); the message says why."""


@dataclass(frozen=True)
class HostingCapabilities:
    """What a backend offers beyond the controller contract."""

    guest_workload: bool  # a built-in guest (the guest-driver role): workloads and Verify
    nbd_export: bool  # NBD export of a controller's namespace through its guest I/O path
    sparse_extents: bool  # data_extents reports holes, so a first copy moves only data
    # Namespaces are files in the agent's data dir, so its free space bounds what fits here.
    namespaces_in_data_dir: bool = False


class ControllerHosting(Protocol):
    """The controllers an agent hosts on one backend kind; see the module docstring."""

    @property
    def kind(self) -> str: ...

    @property
    def capabilities(self) -> HostingCapabilities: ...

    @property
    def capacity_bytes(self) -> int: ...

    def allocated_bytes(self) -> int:
        """Namespace bytes in use by controllers and by destinations not yet running."""
        ...

    def capacity_problem(self, controller_id: str, namespace_bytes: int) -> str | None:
        """Why a controller of ``namespace_bytes`` does not fit now, or None."""
        ...

    def create(self, controller_id: str, namespace_bytes: int) -> MigratableController: ...

    def hosted_ids(self) -> list[str]:
        """The controllers the metadata says this agent runs (for recovery after a restart)."""
        ...

    def reopen(self, controller_id: str) -> MigratableController: ...

    def discard(self, controller_id: str, job_id: str = "") -> None:
        """Sanitize and forget a controller (or the destination of ``job_id``) that is not open."""
        ...

    def create_destination(self, controller_id: str, job_id: str, namespace_bytes: int) -> MigratableController:
        """An empty controller in RESUMING for job ``job_id``."""
        ...

    def pending_destinations(self) -> list[tuple[str, str]]:
        """(controller id, job id) of destinations prepared here and not yet running."""
        ...

    def reload_destination(self, controller_id: str, job_id: str) -> MigratableController:
        """A pending destination opened again in RESUMING, with the data that had arrived."""
        ...

    def adopt_destination(self, controller_id: str, job_id: str) -> None:
        """The destination of ``job_id`` is about to run: record it as a controller of this agent.
        When the record cannot be written (a full disk) it stays a pending destination."""
        ...

    def unadopt_destination(self, controller_id: str, job_id: str) -> None:
        """Undo ``adopt_destination``: the controller may not run here after all, and stays the
        pending (loaded, resumable) destination of ``job_id``."""
        ...

    def release(self, controller_id: str, job_id: str = "") -> None:
        """The controller (or the destination of ``job_id``) was released: give its resources back."""
        ...

    def health_log(self) -> bytes | None:
        """The backend's SMART / Health Information log page (LID 02h, 512 bytes), or None when
        it has none to read."""
        ...

    def guest(self, controller: MigratableController) -> GuestDrivenController | None:
        """The controller's guest-driver role, when the backend has one."""
        ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class DeviceAccess:
    """How the agent reaches device nodes: the kernel's ioctl, and which nodes are devices.

    Production uses the kernel; a fake of NVMe hardware injects its own (tests/fakes), so that
    no production code path imports a device model.
    """

    ioctl: IoctlFn = kernel_ioctl

    def is_device_node(self, path: Path) -> bool:
        """Whether ``path`` (which exists) is a character device, as an NVMe PF's node is."""
        return stat.S_ISCHR(path.stat().st_mode)
