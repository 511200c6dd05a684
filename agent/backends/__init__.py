"""The backends that fulfil the agent's controller contract (agent.backend.MigratableController).

- ``emulated`` (the default): agent.emulated.controller.EmulatedController, a model in the agent.
- ``nvme-passthru``: agent.backends.nvme_passthru.NvmePassthruController, TP4159 admin commands to
  a real PF (``/dev/nvmeN``) through the Linux NVMe admin passthrough ioctl.
- ``vfio``: agent.backends.vfio.VfioMigrationDevice, the VFIO migration uAPI on a real VF
  (``/dev/vfio/devices/vfioN``, or a group ``/dev/vfio/N`` plus the VF's PCI address).

``device_problem`` is the check the agent runs at start-up; ``open_hosting`` gives the agent the
controllers of a backend (agent.backends.hosting); ``open_backend`` opens one controller.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from agent.backend import BLOCK_BYTES, MigratableController
from agent.backends.hosting import ControllerHosting, DeviceAccess, HostingError
from agent.backends.ioctl_abi import IoctlFn, kernel_ioctl
from agent.backends.namespace_device import DeviceUnavailableError, NamespaceDevice

EMULATED = "emulated"
NVME_PASSTHRU = "nvme-passthru"
VFIO = "vfio"
BACKEND_KINDS = (EMULATED, NVME_PASSTHRU, VFIO)

# What each real backend's --device is, and what to check when it is missing.
_DEVICE_HINTS = {
    NVME_PASSTHRU: ("the NVMe PF's character device, e.g. /dev/nvme0",
                    "is the NVMe PF bound to the nvme driver (ls /dev/nvme*)? pass --device"),
    VFIO: ("the VF's VFIO device, /dev/vfio/devices/vfioN or the group /dev/vfio/N",
           "is the VF bound to a vfio-pci migration driver (ls /dev/vfio)? pass --device"),
}


def _check_kind(kind: str) -> None:
    if kind not in BACKEND_KINDS:
        raise ValueError(f"backend {kind!r} is unknown; choose one of {', '.join(BACKEND_KINDS)}")


def device_problem(kind: str, device: str | None, access: DeviceAccess | None = None) -> str | None:
    """Why ``device`` cannot serve backend ``kind``, or None when it can (or needs no device)."""
    _check_kind(kind)
    if kind == EMULATED:
        if device:
            return f"--device {device} is for the nvme-passthru and vfio backends; the emulated backend takes none"
        return None
    what, hint = _DEVICE_HINTS[kind]
    if not device:
        return f"backend {kind} needs --device: {what}"
    try:
        is_device = (access or DeviceAccess()).is_device_node(Path(device))
    except FileNotFoundError:
        return f"device {device} does not exist: {hint}"
    except PermissionError:
        return f"device {device} is not accessible: run the agent as root"
    if not is_device:
        return f"device {device} is not a character device; backend {kind} needs {what}"
    return None


DEFAULT_EMULATED_CAPACITY_BYTES = 64 << 30


def open_hosting(kind: str, data_dir: Path, *, capacity_bytes: int | None = None, device: Path | None = None,
                 slots: list[str] | None = None, access: DeviceAccess | None = None) -> ControllerHosting:
    """The controllers an agent hosts on backend ``kind``; HostingError says why it cannot.

    - emulated: namespaces as sparse files in ``data_dir``, at most ``capacity_bytes`` of them;
    - nvme-passthru: VF ``slots`` (``CNTLID:NSID:PATH`` each) of the PF at ``device``, their
      assignment kept in ``data_dir``; the capacity is the slots' namespaces;
    - vfio: not yet (see the message).
    """
    _check_kind(kind)
    if kind == EMULATED:
        if slots:
            raise HostingError("--slot is for the nvme-passthru backend; the emulated backend keeps namespaces as "
                               "files in --data-dir")
        from agent.backends.emulated_hosting import EmulatedHosting

        return EmulatedHosting(data_dir, capacity_bytes or DEFAULT_EMULATED_CAPACITY_BYTES)
    if kind == VFIO:
        raise HostingError("backend vfio can migrate a VF (agent.backends.vfio) but cannot host controllers yet: "
                           "it has no slot inventory; run with --backend nvme-passthru or --backend emulated")
    if capacity_bytes is not None:
        raise HostingError("--capacity is for the emulated backend; the capacity of nvme-passthru is the sum of "
                           "its slots' namespaces: drop --capacity")
    if device is None:
        raise HostingError(f"backend {kind} needs --device: {_DEVICE_HINTS[kind][0]}")
    from agent.backends.passthru_hosting import PassthruHosting, parse_slot

    try:
        parsed = [parse_slot(text) for text in slots or ()]
    except ValueError as exc:
        raise HostingError(str(exc)) from None
    return PassthruHosting(data_dir, device, parsed, access=access)


def open_backend(
    kind: str,
    controller_id: str,
    *,
    namespace_path: Path,
    namespace_bytes: int = 0,
    create: bool = False,
    device: Path | None = None,
    cntlid: int | None = None,
    nsid: int = 1,
    pf_device: Path | None = None,
    pci_address: str | None = None,
    ioctl: IoctlFn = kernel_ioctl,
) -> MigratableController:
    """Open one controller on backend ``kind``.

    - emulated: ``namespace_path`` is the sparse file, ``namespace_bytes`` its size, ``create``
      whether to make it.
    - nvme-passthru: ``device`` is the PF (/dev/nvmeN), ``cntlid`` the migratable controller (the
      VF), ``nsid`` its namespace, ``namespace_path`` the PF's namespace block device.
    - vfio: ``device`` is the VF's cdev or group (then ``pci_address`` too), ``namespace_path`` the
      PF's namespace block device; ``pf_device`` and ``cntlid`` give the PF's changed-LBA log.
    """
    _check_kind(kind)
    if kind == EMULATED:
        from agent.emulated.controller import EmulatedController

        return EmulatedController(controller_id, namespace_path, namespace_bytes, create=create)
    if device is None:
        raise DeviceUnavailableError(f"backend {kind} needs a device: {_DEVICE_HINTS[kind][0]}")
    from agent.backends.nvme_passthru import NvmeAdminChannel, NvmePassthruController
    from agent.backends.vfio import VfioMigrationDevice, open_cdev_device, open_group_device
    from agent.nvme.migration_driver import MigrationDriver

    with contextlib.ExitStack() as undo:  # whatever was opened is closed again if a later step fails
        ctrl: MigratableController
        if kind == NVME_PASSTHRU:
            if cntlid is None:
                raise ValueError("backend nvme-passthru needs cntlid: the controller id of the VF to migrate")
            admin = NvmeAdminChannel.open(device, ioctl=ioctl)
            undo.callback(admin.close)
            namespace = NamespaceDevice(namespace_path, ioctl=ioctl)
            undo.callback(namespace.close)
            ctrl = NvmePassthruController(controller_id, admin, cntlid, nsid, namespace)
        else:
            if device.parent == Path("/dev/vfio") and pci_address is None:
                raise ValueError(f"VFIO group {device} needs pci_address: which VF of the group to open, "
                                 "e.g. 0000:3b:00.1")
            handles = (open_group_device(device, pci_address, ioctl=ioctl) if pci_address is not None
                       else open_cdev_device(device, ioctl=ioctl))
            undo.callback(handles.close)
            namespace = NamespaceDevice(namespace_path, ioctl=ioctl)
            undo.callback(namespace.close)
            lba_log = None
            if pf_device is not None and cntlid is not None:
                pf_admin = NvmeAdminChannel.open(pf_device, ioctl=ioctl)
                undo.callback(pf_admin.close)
                lba_log = MigrationDriver(pf_admin, cntlid, label=controller_id).change_log(
                    nsid, namespace.size_bytes // BLOCK_BYTES, owns_transport=True)
            ctrl = VfioMigrationDevice(controller_id, handles, namespace, lba_log=lba_log, ioctl=ioctl)
        undo.pop_all()
        return ctrl


__all__ = [
    "BACKEND_KINDS",
    "EMULATED",
    "NVME_PASSTHRU",
    "VFIO",
    "DeviceAccess",
    "DeviceUnavailableError",
    "HostingError",
    "device_problem",
    "open_backend",
    "open_hosting",
]
