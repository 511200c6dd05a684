"""The ``vfio`` backend: a VF's migration driven through the Linux VFIO migration uAPI (v2).

``VfioMigrationDevice`` drives a device fd obtained either the classic way (container
``/dev/vfio/vfio`` + group ``/dev/vfio/N`` + ``VFIO_GROUP_GET_DEVICE_FD``, see
:func:`open_group_device`) or through the device cdev ``/dev/vfio/devices/vfioN`` bound to an
iommufd (:func:`open_cdev_device`, Linux 6.6).  On that fd it:

- probes ``VFIO_DEVICE_FEATURE_MIGRATION`` for the optional states (P2P, PRE_COPY);
- changes state with ``VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE``, one arc of
  ``agent.vfio_states.path()`` per ioctl.  The kernel would accept the final target and walk the
  chain itself, but when an arc in the middle fails it leaves the device "somewhere on the path";
  requesting single arcs means we know which arc failed, we own each data_fd the moment its arc
  returns it, and after a failure we read the state back (GET) instead of guessing;
- reads the saving stream from the data_fd (PRE_COPY and STOP_COPY share one stream) and writes
  the resuming stream to the data_fd of RESUMING.  The stream is opaque and must reach the
  destination whole and in order, so ``save_state`` returns everything read in PRE_COPY followed
  by the STOP_COPY remainder, and ``load_state`` writes it unchanged;
- asks ``VFIO_MIG_GET_PRECOPY_INFO`` (on the data_fd) and ``VFIO_DEVICE_FEATURE_MIG_DATA_SIZE``
  for sizes, and runs DMA logging (START / REPORT / STOP) for device-written guest memory.

The VFIO stream carries the controller's state, not the namespace: namespace bytes go through the
PF's namespace block device (``NamespaceDevice``), and the changed LBAs come from the PF's Track
Send log for this VF (a ``ChangedLbaLog``: the host-side migration driver's
``agent.nvme.migration_driver.CdqChangedLbaLog`` over the PF's passthrough channel), because the
VFIO uAPI has no notion of LBAs.
"""

from __future__ import annotations

import ctypes
import errno
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from agent.backends.device_controller import ChangedLbaLog, DeviceBackedController
from agent.backends.ioctl_abi import (
    VFIO_API_VERSION,
    VFIO_CHECK_EXTENSION,
    VFIO_DEVICE_BIND_IOMMUFD,
    VFIO_DEVICE_FEATURE,
    VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT,
    VFIO_DEVICE_FEATURE_DMA_LOGGING_START,
    VFIO_DEVICE_FEATURE_DMA_LOGGING_STOP,
    VFIO_DEVICE_FEATURE_GET,
    VFIO_DEVICE_FEATURE_MIG_DATA_SIZE,
    VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE,
    VFIO_DEVICE_FEATURE_MIGRATION,
    VFIO_DEVICE_FEATURE_PROBE,
    VFIO_DEVICE_FEATURE_SET,
    VFIO_DEVICE_RESET,
    VFIO_GET_API_VERSION,
    VFIO_GROUP_FLAGS_VIABLE,
    VFIO_GROUP_GET_DEVICE_FD,
    VFIO_GROUP_GET_STATUS,
    VFIO_GROUP_SET_CONTAINER,
    VFIO_MIG_GET_PRECOPY_INFO,
    VFIO_MIGRATION_P2P,
    VFIO_MIGRATION_PRE_COPY,
    VFIO_MIGRATION_STOP_COPY,
    VFIO_SET_IOMMU,
    IoctlArg,
    IoctlFn,
    VFIO_TYPE1v2_IOMMU,
    VfioDeviceBindIommufd,
    VfioDeviceFeatureDmaLoggingControl,
    VfioDeviceFeatureDmaLoggingRange,
    VfioDeviceFeatureDmaLoggingReport,
    VfioDeviceFeatureMigDataSize,
    VfioDeviceFeatureMigration,
    VfioDeviceFeatureMigState,
    VfioGroupStatus,
    VfioPrecopyInfo,
    feature_payload,
    feature_request,
    kernel_ioctl,
)
from agent.backends.namespace_device import NamespaceDevice, open_device_node
from agent.controller_errors import DeviceCommandError, WrongStateError
from agent.vfio_states import FEATURE_P2P, FEATURE_PRE_COPY, VfioState

READ_CHUNK_BYTES = 1 << 20
_SAVING = frozenset({VfioState.PRE_COPY, VfioState.PRE_COPY_P2P, VfioState.STOP_COPY})
_PRE_COPY_STATES = frozenset({VfioState.PRE_COPY, VfioState.PRE_COPY_P2P})


def _call(ioctl: IoctlFn, fd: int, request: int, arg: IoctlArg, what: str) -> int:
    """One ioctl whose failure becomes a DeviceCommandError naming the call and the errno."""
    try:
        return ioctl(fd, request, arg)
    except OSError as exc:
        name = errno.errorcode.get(exc.errno or 0, str(exc.errno))
        raise DeviceCommandError(f"{what} failed: {name} ({os.strerror(exc.errno or 0)})") from exc


@dataclass(frozen=True)
class VfioHandles:
    """The device fd and the fds that keep it usable (container and group, or the iommufd)."""

    device_fd: int
    holder_fds: tuple[int, ...] = ()

    def close(self) -> None:
        for fd in (self.device_fd, *self.holder_fds):
            os.close(fd)


def open_group_device(
    group_path: Path, pci_address: str, *, container_path: Path = Path("/dev/vfio/vfio"), ioctl: IoctlFn = kernel_ioctl
) -> VfioHandles:
    """Container + group + VFIO_GROUP_GET_DEVICE_FD for the VF at ``pci_address`` (e.g. 0000:3b:00.1)."""
    opened: list[int] = []
    try:
        container = open_device_node(container_path, os.O_RDWR, "VFIO container",
                                     "load the vfio module (modprobe vfio-pci)")
        opened.append(container)
        version = _call(ioctl, container, VFIO_GET_API_VERSION, 0, "VFIO_GET_API_VERSION")
        if version != VFIO_API_VERSION:
            raise DeviceCommandError(
                f"VFIO API version {version} at {container_path}, this agent speaks {VFIO_API_VERSION}"
            )
        if _call(ioctl, container, VFIO_CHECK_EXTENSION, VFIO_TYPE1v2_IOMMU, "VFIO_CHECK_EXTENSION") != 1:
            raise DeviceCommandError(f"{container_path} has no type1v2 IOMMU: enable the IOMMU (intel_iommu=on)")
        group = open_device_node(group_path, os.O_RDWR, "VFIO group",
                                 "bind the VF to vfio-pci (driverctl set-override ADDRESS vfio-pci)")
        opened.append(group)
        status = VfioGroupStatus(argsz=ctypes.sizeof(VfioGroupStatus))
        _call(ioctl, group, VFIO_GROUP_GET_STATUS, status, f"VFIO_GROUP_GET_STATUS on {group_path}")
        if not status.flags & VFIO_GROUP_FLAGS_VIABLE:
            raise DeviceCommandError(
                f"VFIO group {group_path} is not viable: bind every device of the group to vfio-pci"
            )
        container_arg = (ctypes.c_int32 * 1)(container)  # the kernel reads an __s32 through the pointer
        _call(ioctl, group, VFIO_GROUP_SET_CONTAINER, container_arg, "VFIO_GROUP_SET_CONTAINER")
        _call(ioctl, container, VFIO_SET_IOMMU, VFIO_TYPE1v2_IOMMU, "VFIO_SET_IOMMU")
        name = ctypes.create_string_buffer(pci_address.encode("ascii"))
        device = _call(ioctl, group, VFIO_GROUP_GET_DEVICE_FD, name,
                       f"VFIO_GROUP_GET_DEVICE_FD for {pci_address!r} in {group_path}")
        return VfioHandles(device, (group, container))
    except BaseException:
        for fd in opened:
            os.close(fd)
        raise


def open_cdev_device(cdev_path: Path, *, iommu_path: Path = Path("/dev/iommu"), ioctl: IoctlFn = kernel_ioctl
                     ) -> VfioHandles:
    """The device cdev bound to a new iommufd (VFIO_DEVICE_BIND_IOMMUFD), which migration ioctls need."""
    device = open_device_node(cdev_path, os.O_RDWR, "VFIO device cdev",
                              "bind the VF to vfio-pci on a kernel with CONFIG_VFIO_DEVICE_CDEV, or use the group")
    try:
        iommufd = open_device_node(iommu_path, os.O_RDWR, "iommufd", "load the iommufd module")
    except BaseException:
        os.close(device)
        raise
    try:
        bind = VfioDeviceBindIommufd(argsz=ctypes.sizeof(VfioDeviceBindIommufd), flags=0, iommufd=iommufd)
        _call(ioctl, device, VFIO_DEVICE_BIND_IOMMUFD, bind, f"VFIO_DEVICE_BIND_IOMMUFD of {cdev_path}")
    except BaseException:
        os.close(device)
        os.close(iommufd)
        raise
    return VfioHandles(device, (iommufd,))


@dataclass(frozen=True)
class PrecopyInfo:
    """VFIO_MIG_GET_PRECOPY_INFO: bytes of initial and of re-dirtied device state not yet read."""

    initial_bytes: int
    dirty_bytes: int


class VfioMigrationDevice(DeviceBackedController):
    """A VF migrated through the VFIO uAPI; see the module docstring for the call sequence."""

    def __init__(
        self, controller_id: str, handles: VfioHandles, namespace: NamespaceDevice, *,
        lba_log: ChangedLbaLog | None = None, ioctl: IoctlFn = kernel_ioctl,
    ) -> None:
        self._handles = handles
        self._fd = handles.device_fd
        self._ioctl = ioctl
        self._data_fd: int | None = None
        self._precopy = bytearray()  # saving-stream bytes read before STOP_COPY
        self._saved: bytes | None = None  # the whole saving stream once read to its end
        self._resume_written = False
        flags = self._migration_flags()
        features = frozenset(
            name for bit, name in ((VFIO_MIGRATION_P2P, FEATURE_P2P), (VFIO_MIGRATION_PRE_COPY, FEATURE_PRE_COPY))
            if flags & bit
        )
        super().__init__(controller_id, namespace, lba_log, self.device_state(), features)

    # ----- feature ioctls ---------------------------------------------------------------------

    def _feature(self, feature: int, flags: int, payload: ctypes.Structure | None, what: str
                 ) -> ctypes.Array[ctypes.c_char]:
        buf = feature_request(feature, flags, payload)
        _call(self._ioctl, self._fd, VFIO_DEVICE_FEATURE, buf, what)
        return buf

    def _migration_flags(self) -> int:
        buf = self._feature(VFIO_DEVICE_FEATURE_MIGRATION, VFIO_DEVICE_FEATURE_GET, VfioDeviceFeatureMigration(),
                            "VFIO_DEVICE_FEATURE_MIGRATION (does the driver support migration? use a "
                            "migration-capable variant driver)")
        flags = feature_payload(buf, VfioDeviceFeatureMigration).flags
        if not flags & VFIO_MIGRATION_STOP_COPY:
            raise DeviceCommandError(f"device migration flags {flags:#x} lack STOP_COPY, which the uAPI requires")
        return int(flags)

    def device_state(self) -> VfioState:
        """The state the device reports now (GET), which is the truth after a failed arc."""
        buf = self._feature(VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE, VFIO_DEVICE_FEATURE_GET,
                            VfioDeviceFeatureMigState(), "VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE GET")
        return VfioState(feature_payload(buf, VfioDeviceFeatureMigState).device_state)

    def stop_copy_bytes(self) -> int:
        """VFIO_DEVICE_FEATURE_MIG_DATA_SIZE: the driver's estimate of the STOP_COPY stream length."""
        with self._lock:
            self._usable()
            buf = self._feature(VFIO_DEVICE_FEATURE_MIG_DATA_SIZE, VFIO_DEVICE_FEATURE_GET,
                                VfioDeviceFeatureMigDataSize(), "VFIO_DEVICE_FEATURE_MIG_DATA_SIZE")
            return int(feature_payload(buf, VfioDeviceFeatureMigDataSize).stop_copy_length)

    # ----- state arcs -------------------------------------------------------------------------

    def _device_arc(self, cur: VfioState, nxt: VfioState) -> None:
        if cur is VfioState.RESUMING and not self._resume_written:
            # The driver would refuse an empty stream too, but only with EINVAL; say what is missing.
            raise self._no_state_loaded()
        request = VfioDeviceFeatureMigState(device_state=int(nxt), data_fd=-1)
        try:
            buf = self._feature(VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE, VFIO_DEVICE_FEATURE_SET, request,
                                f"VFIO state arc {cur.name} -> {nxt.name}")
        except DeviceCommandError as exc:
            now = self.device_state()
            self._state = now
            if now not in _SAVING and now is not VfioState.RESUMING:
                self._end_session()  # the kernel ended the session with the arc that failed
            hint = ("reset it with reset() (VFIO_DEVICE_RESET)" if now is VfioState.ERROR
                    else "retry, or move it back with set_state()")
            raise DeviceCommandError(f"controller {self._id}: {exc}; the device is now in {now.name}: {hint}") from exc
        data_fd = feature_payload(buf, VfioDeviceFeatureMigState).data_fd
        if (nxt in _SAVING and cur not in _SAVING) or nxt is VfioState.RESUMING:
            # These arcs start a session: the kernel handed us a new stream.
            self._end_session()
            if data_fd < 0:
                raise DeviceCommandError(f"VFIO arc {cur.name} -> {nxt.name} returned no data_fd")
            self._data_fd = data_fd
        elif data_fd >= 0:
            os.close(data_fd)  # arcs inside the saving group keep the stream; never leak an fd
        if (cur in _SAVING and nxt not in _SAVING) or cur is VfioState.RESUMING:
            self._end_session()

    def _session_fd(self) -> int:
        if self._data_fd is None:
            raise WrongStateError(
                f"controller {self._id} was already in {self._state.name} when it was opened, so its data_fd "
                "belongs to whoever moved it there: reset() it and walk the states again"
            )
        return self._data_fd

    def _end_session(self) -> None:
        if self._data_fd is not None:
            os.close(self._data_fd)
            self._data_fd = None
        self._precopy.clear()
        self._saved = None
        self._resume_written = False

    def reset(self) -> None:
        """VFIO_DEVICE_RESET: the way out of ERROR (or of an unwanted RESUMING); ends in RUNNING."""
        with self._lock:
            self._usable()
            _call(self._ioctl, self._fd, VFIO_DEVICE_RESET, 0, "VFIO_DEVICE_RESET")
            self._end_session()
            self._state = self.device_state()

    # ----- the migration stream ---------------------------------------------------------------

    def precopy_info(self) -> PrecopyInfo:
        """VFIO_MIG_GET_PRECOPY_INFO on the saving data_fd; only in PRE_COPY states."""
        with self._lock:
            self._require_state(_PRE_COPY_STATES, "VFIO_MIG_GET_PRECOPY_INFO")
            info = VfioPrecopyInfo(argsz=ctypes.sizeof(VfioPrecopyInfo))
            _call(self._ioctl, self._session_fd(), VFIO_MIG_GET_PRECOPY_INFO, info, "VFIO_MIG_GET_PRECOPY_INFO")
            return PrecopyInfo(int(info.initial_bytes), int(info.dirty_bytes))

    def read_precopy(self) -> int:
        """Read the pre-copy data available now and keep it for save_state; returns the bytes read."""
        with self._lock:
            info = self.precopy_info()
            fd = self._session_fd()
            wanted = info.initial_bytes + info.dirty_bytes
            got = 0
            while got < wanted:
                try:
                    chunk = os.read(fd, min(READ_CHUNK_BYTES, wanted - got))
                except OSError as exc:
                    if exc.errno == errno.ENOMSG:  # the temporary end of a pre-copy stream
                        break
                    raise
                if not chunk:
                    break
                self._precopy += chunk
                got += len(chunk)
            return got

    def save_state(self) -> bytes:
        """The whole saving stream (pre-copy part, then STOP_COPY to end of stream); in STOP_COPY.

        Reading the stream consumes it, so the result is kept: a retried call returns the same bytes.
        """
        with self._lock:
            self._require_state(frozenset({VfioState.STOP_COPY}), "save_state (reading the VFIO stream)")
            if self._saved is None:
                fd = self._session_fd()
                parts = [bytes(self._precopy)]
                while chunk := os.read(fd, READ_CHUNK_BYTES):
                    parts.append(chunk)
                self._saved = b"".join(parts)
            return self._saved

    def load_state(self, blob: bytes) -> None:
        """Write the saving stream of the source to the RESUMING data_fd.

        The driver checks it when RESUMING -> STOP runs, so a bad stream fails set_state(STOP).
        """
        with self._lock:
            self._require_state(frozenset({VfioState.RESUMING}), "load_state")
            if self._resume_written:
                raise WrongStateError(
                    f"controller {self._id}: this RESUMING session already took a stream; a device "
                    "cannot take a second one: reset() it and start RESUMING again"
                )
            fd = self._session_fd()
            view = memoryview(blob)
            while view:
                view = view[os.write(fd, view):]
            self._resume_written = True

    # ----- DMA logging (device-written guest memory) ------------------------------------------

    def dma_logging_supported(self) -> bool:
        """VFIO_DEVICE_FEATURE_PROBE of DMA_LOGGING_START."""
        with self._lock:
            self._usable()
            try:
                self._feature(VFIO_DEVICE_FEATURE_DMA_LOGGING_START,
                              VFIO_DEVICE_FEATURE_PROBE | VFIO_DEVICE_FEATURE_SET, None, "probe DMA logging")
            except DeviceCommandError:
                return False
            return True

    def start_dma_logging(self, ranges: Sequence[tuple[int, int]], page_size: int) -> int:
        """Log device DMA writes into the (iova, length) ``ranges``; returns the page size chosen."""
        _check_page_size(page_size)
        if not ranges:
            raise ValueError("DMA logging needs at least one (iova, length) range")
        with self._lock:
            self._usable()
            array = (VfioDeviceFeatureDmaLoggingRange * len(ranges))(
                *(VfioDeviceFeatureDmaLoggingRange(iova=iova, length=length) for iova, length in ranges)
            )
            control = VfioDeviceFeatureDmaLoggingControl(
                page_size=page_size, num_ranges=len(ranges), ranges=ctypes.addressof(array)
            )
            buf = self._feature(VFIO_DEVICE_FEATURE_DMA_LOGGING_START, VFIO_DEVICE_FEATURE_SET, control,
                                "VFIO_DEVICE_FEATURE_DMA_LOGGING_START")
            return int(feature_payload(buf, VfioDeviceFeatureDmaLoggingControl).page_size)

    def dma_logging_report(self, iova: int, length: int, page_size: int) -> list[int]:
        """IOVAs of the pages the device wrote in [iova, iova + length) since the last report."""
        _check_page_size(page_size)
        if length <= 0 or iova % page_size or length % page_size:
            raise ValueError(f"DMA report range iova={iova:#x} length={length:#x} must be whole {page_size}-byte pages")
        pages = length // page_size
        with self._lock:
            self._usable()
            bitmap = (ctypes.c_uint64 * -(-pages // 64))()
            report = VfioDeviceFeatureDmaLoggingReport(iova=iova, length=length, page_size=page_size,
                                                       bitmap=ctypes.addressof(bitmap))
            self._feature(VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT, VFIO_DEVICE_FEATURE_GET, report,
                          "VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT")
            return [iova + i * page_size for i in range(pages) if bitmap[i // 64] >> (i % 64) & 1]

    def stop_dma_logging(self) -> None:
        with self._lock:
            self._usable()
            self._feature(VFIO_DEVICE_FEATURE_DMA_LOGGING_STOP, VFIO_DEVICE_FEATURE_SET, None,
                          "VFIO_DEVICE_FEATURE_DMA_LOGGING_STOP")

    # ----- lifetime ---------------------------------------------------------------------------

    def _close_device(self) -> None:
        self._end_session()
        self._handles.close()


def _check_page_size(page_size: int) -> None:
    if page_size < 4096 or page_size & (page_size - 1):
        raise ValueError(f"page_size={page_size} must be a power of two of at least 4096")
