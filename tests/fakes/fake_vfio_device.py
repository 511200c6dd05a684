"""A FAKE of the kernel side of the VFIO migration uAPI, for testing agent.backends.vfio.

It stands in for what cannot run here (a VF bound to a migration-capable vfio-pci variant
driver): an ioctl function with the kernel's signature that decodes the raw bytes it is handed
with ``struct`` (not with our ctypes classes, so that a packing mistake on our side shows), keeps
the device state with the pure ``agent.vfio_states`` table, and hands out data_fds.

The device behind it is the emulated controller: a saving stream is ``STREAM_MAGIC`` (sent as the
pre-copy "initial bytes") followed by the controller's state container, and the RESUMING -> STOP
arc loads what was written.  Streams are memfds: the backend gets its own open file description
(own offset), so it reads and writes them like a kernel data_fd, without pipe-buffer deadlocks.
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

from agent.backends import ioctl_abi as abi
from agent.controller_errors import ControllerError
from agent.emulated.controller import EmulatedController
from agent.nvme.state_format import encode_state
from agent.vfio_states import FEATURE_P2P, FEATURE_PRE_COPY, VfioState, path
from tests.fakes import same_file

STREAM_MAGIC = b"FAKEVF01"
# The model's own state for a VFIO state.  P2P quiescing has no counterpart in the model, and the
# VF runs normally in PRE_COPY: changed-LBA logging is the PF's business (a Track Send log), so the
# model's own PRE_COPY (which would open a second log for the same controller) is not used.
_MODEL_STATE = {VfioState.RUNNING_P2P: VfioState.RUNNING, VfioState.PRE_COPY: VfioState.RUNNING,
                VfioState.PRE_COPY_P2P: VfioState.RUNNING}
_SAVING = {VfioState.PRE_COPY, VfioState.PRE_COPY_P2P, VfioState.STOP_COPY}
# Request number -> name, for the call log that tests assert on.
_NAMES = {getattr(abi, n): n for n in (
    "VFIO_GET_API_VERSION", "VFIO_CHECK_EXTENSION", "VFIO_SET_IOMMU", "VFIO_GROUP_GET_STATUS",
    "VFIO_GROUP_SET_CONTAINER", "VFIO_GROUP_GET_DEVICE_FD", "VFIO_DEVICE_RESET", "VFIO_DEVICE_FEATURE",
    "VFIO_DEVICE_BIND_IOMMUFD", "VFIO_MIG_GET_PRECOPY_INFO")}


def _fail(err: int, why: str) -> OSError:
    return OSError(err, f"{os.strerror(err)} (fake vfio: {why})")


@dataclass
class _Stream:
    """A migration data stream: our memfd and the fd the backend was handed."""

    ours: int
    theirs: int
    written: int = 0

    def unread(self) -> int:
        return self.written - os.lseek(self.theirs, 0, os.SEEK_CUR)


@dataclass
class FakeVfioDevice:
    """One fake VF; pass ``ioctl`` to the backend and ``device_fd`` (or ``node``) as its device."""

    controller: EmulatedController
    p2p: bool = False
    pre_copy: bool = True
    dma_logging: bool = True
    # (from, to) -> the state the device is left in when that arc is requested: a failing driver.
    fail_arcs: dict[tuple[VfioState, VfioState], VfioState] = field(default_factory=dict)
    calls: list[str] = field(default_factory=list)
    pci_address: str = "0000:3b:00.1"

    def __post_init__(self) -> None:
        self.device_fd = os.memfd_create("fake-vfio-device")
        self.node = Path(f"/proc/self/fd/{self.device_fd}")  # opens the same "device" anew
        # A destination model waits in RESUMING; its device starts in STOP, so that the backend's
        # own STOP -> RESUMING arc opens the resuming stream, as on a freshly reset VF.
        model_state = self.controller.vfio_state
        self.state: VfioState = VfioState.STOP if model_state is VfioState.RESUMING else model_state
        self.features = frozenset({FEATURE_P2P} if self.p2p else set()) | (
            {FEATURE_PRE_COPY} if self.pre_copy else set())
        self.stream: _Stream | None = None
        self.dma_page_size = 0
        self.dma_ranges: list[tuple[int, int]] | None = None
        self.dma_written: set[int] = set()  # byte addresses the "device" wrote since the last report

    # ----- what tests use to act as the device ------------------------------------------------

    def device_wrote(self, iova: int) -> None:
        """The device DMA-wrote guest memory at ``iova`` (logged only inside the logged ranges)."""
        if self.dma_ranges is not None and any(lo <= iova < lo + n for lo, n in self.dma_ranges):
            self.dma_written.add(iova)

    # ----- the ioctl surface ------------------------------------------------------------------

    def ioctl(self, fd: int, request: int, arg: abi.IoctlArg) -> int:
        name = _NAMES.get(request, hex(request))
        self.calls.append(name)
        if self.stream is not None and fd == self.stream.theirs:
            if request != abi.VFIO_MIG_GET_PRECOPY_INFO:
                raise _fail(errno.ENOTTY, f"{name} on a data_fd")
            return self._precopy_info(_bytes(arg))
        if same_file(fd, self.device_fd):
            if request == abi.VFIO_DEVICE_FEATURE:
                return self._feature(_bytes(arg))
            if request == abi.VFIO_DEVICE_RESET:
                self._end_stream()
                self._model_to(VfioState.RUNNING, reset=True)
                self.state = VfioState.RUNNING
                return 0
            if request == abi.VFIO_DEVICE_BIND_IOMMUFD:
                argsz, flags, iommufd, _ = struct.unpack_from("<IIiI", _bytes(arg))
                if argsz != 16 or flags or iommufd < 0:
                    raise _fail(errno.EINVAL, f"bind argsz={argsz} flags={flags} iommufd={iommufd}")
                return 0
            raise _fail(errno.ENOTTY, f"{name} on the device fd")
        return self._container_or_group(request, arg)

    def _container_or_group(self, request: int, arg: abi.IoctlArg) -> int:
        if request == abi.VFIO_GET_API_VERSION:
            return 0
        if request == abi.VFIO_CHECK_EXTENSION:
            return 1 if arg == abi.VFIO_TYPE1v2_IOMMU else 0
        if request == abi.VFIO_SET_IOMMU:
            if arg != abi.VFIO_TYPE1v2_IOMMU:
                raise _fail(errno.EINVAL, f"IOMMU type {arg!r}")
            return 0
        if request == abi.VFIO_GROUP_GET_STATUS:
            view = _bytes(arg)
            struct.pack_into("<I", view, 4, abi.VFIO_GROUP_FLAGS_VIABLE)
            return 0
        if request == abi.VFIO_GROUP_SET_CONTAINER:
            (container,) = struct.unpack_from("<i", _bytes(arg))
            os.fstat(container)  # a closed or bogus fd fails like the kernel's EBADF
            return 0
        if request == abi.VFIO_GROUP_GET_DEVICE_FD:
            wanted = bytes(_bytes(arg)).split(b"\0", 1)[0].decode()
            if wanted != self.pci_address:
                raise _fail(errno.ENODEV, f"no device {wanted!r} in this group")
            return self.device_fd
        raise _fail(errno.ENOTTY, hex(request))

    def _feature(self, view: memoryview) -> int:
        argsz, flags = struct.unpack_from("<II", view)
        if argsz != len(view):
            raise _fail(errno.EINVAL, f"argsz {argsz} but the buffer is {len(view)} bytes")
        feature, op = flags & 0xFFFF, flags & ~0xFFFF
        get, set_, probe = abi.VFIO_DEVICE_FEATURE_GET, abi.VFIO_DEVICE_FEATURE_SET, abi.VFIO_DEVICE_FEATURE_PROBE
        if feature in (abi.VFIO_DEVICE_FEATURE_DMA_LOGGING_START, abi.VFIO_DEVICE_FEATURE_DMA_LOGGING_STOP,
                       abi.VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT) and not self.dma_logging:
            raise _fail(errno.ENOTTY, "no DMA logging")
        if op & probe:
            return 0
        payload = view[8:]
        if feature == abi.VFIO_DEVICE_FEATURE_MIGRATION and op == get:
            flags_out = abi.VFIO_MIGRATION_STOP_COPY | (abi.VFIO_MIGRATION_P2P if self.p2p else 0) | (
                abi.VFIO_MIGRATION_PRE_COPY if self.pre_copy else 0)
            struct.pack_into("<Q", payload, 0, flags_out)
        elif feature == abi.VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE and op == get:
            struct.pack_into("<Ii", payload, 0, int(self.state), -1)
        elif feature == abi.VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE and op == set_:
            target, _ = struct.unpack_from("<Ii", payload)
            struct.pack_into("<i", payload, 4, self._set_state(VfioState(target)))
        elif feature == abi.VFIO_DEVICE_FEATURE_MIG_DATA_SIZE and op == get:
            length = len(STREAM_MAGIC) + len(encode_state(self.controller.current_state()))
            struct.pack_into("<Q", payload, 0, length)
        elif feature == abi.VFIO_DEVICE_FEATURE_DMA_LOGGING_START and op == set_:
            self._dma_start(payload)
        elif feature == abi.VFIO_DEVICE_FEATURE_DMA_LOGGING_STOP and op == set_:
            self.dma_ranges = None
            self.dma_written.clear()
        elif feature == abi.VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT and op == get:
            self._dma_report(payload)
        else:
            raise _fail(errno.ENOTTY, f"feature {feature} with flags {op:#x}")
        return 0

    # ----- migration state and streams --------------------------------------------------------

    def _set_state(self, target: VfioState) -> int:
        new_fd = -1
        # The kernel takes any target and walks the arcs itself; so does the fake.
        for step in path(self.state, target, self.features):
            arc = (self.state, step)
            if arc in self.fail_arcs:
                self.state = self.fail_arcs[arc]
                if self.state not in _SAVING and self.state is not VfioState.RESUMING:
                    self._end_stream()
                raise _fail(errno.EIO, f"the driver failed arc {arc[0].name} -> {arc[1].name}")
            if step is VfioState.RESUMING:
                new_fd = self._new_stream(b"")
            elif step in _SAVING and arc[0] not in _SAVING:
                new_fd = self._new_stream(STREAM_MAGIC)
            if step is VfioState.STOP and arc[0] is VfioState.RESUMING:
                self._load_stream()
            else:
                self._model_to(step)
            if step is VfioState.STOP_COPY and self.stream is not None:
                self._append(encode_state(self.controller.current_state()))
            if (arc[0] in _SAVING and step not in _SAVING) or arc[0] is VfioState.RESUMING:
                self._end_stream()
            self.state = step
        return new_fd

    def _model_to(self, step: VfioState, *, reset: bool = False) -> None:
        want = _MODEL_STATE.get(step, step)
        if reset and self.controller.vfio_state is VfioState.RESUMING:
            return  # the model has no reset; a fresh RESUMING controller is as good as reset here
        if self.controller.vfio_state is not want:
            self.controller.set_state(want)

    def _new_stream(self, first: bytes) -> int:
        self._end_stream()
        ours = os.memfd_create("fake-vfio-stream")
        theirs = os.open(f"/proc/self/fd/{ours}", os.O_RDWR | os.O_CLOEXEC)
        self.stream = _Stream(ours, theirs)
        self._append(first)
        return theirs

    def _append(self, data: bytes) -> None:
        assert self.stream is not None
        os.pwrite(self.stream.ours, data, self.stream.written)
        self.stream.written += len(data)

    def _end_stream(self) -> None:
        # The backend owns (and closes) its fd; the fake drops its side only.
        if self.stream is not None:
            os.close(self.stream.ours)
            self.stream = None

    def _load_stream(self) -> None:
        assert self.stream is not None
        data = os.pread(self.stream.ours, os.fstat(self.stream.ours).st_size, 0)
        if not data.startswith(STREAM_MAGIC):
            raise _fail(errno.EINVAL, f"resuming stream starts with {data[:8]!r}, not {STREAM_MAGIC!r}")
        try:
            self.controller.load_state(data[len(STREAM_MAGIC):])
        except ControllerError as exc:
            raise _fail(errno.EINVAL, f"the controller refused the state: {exc}") from exc
        self.controller.set_state(VfioState.STOP)

    def _precopy_info(self, view: memoryview) -> int:
        if self.state not in (VfioState.PRE_COPY, VfioState.PRE_COPY_P2P) or self.stream is None:
            raise _fail(errno.EINVAL, f"precopy info in {self.state.name}")
        argsz, _ = struct.unpack_from("<II", view)
        if argsz < 24:
            raise _fail(errno.EINVAL, f"precopy info argsz {argsz}")
        struct.pack_into("<QQ", view, 8, self.stream.unread(), 0)
        return 0

    # ----- DMA logging ------------------------------------------------------------------------

    def _dma_start(self, payload: memoryview) -> None:
        if self.dma_ranges is not None:
            raise _fail(errno.EBUSY, "DMA logging already started")
        page_size, count, _, ranges_ptr = struct.unpack_from("<QIIQ", payload)
        raw = ctypes.string_at(ranges_ptr, 16 * count)  # copy_from_user of the ranges array
        self.dma_ranges = [struct.unpack_from("<QQ", raw, 16 * i) for i in range(count)]
        self.dma_page_size = page_size

    def _dma_report(self, payload: memoryview) -> None:
        if self.dma_ranges is None:
            raise _fail(errno.EINVAL, "DMA logging is not started")
        iova, length, page_size, bitmap_ptr = struct.unpack_from("<QQQQ", payload)
        hits = sorted(a for a in self.dma_written if iova <= a < iova + length)
        for address in hits:
            page = (address - iova) // page_size
            word = ctypes.c_uint64.from_address(bitmap_ptr + 8 * (page // 64))
            word.value |= 1 << (page % 64)  # the kernel only sets bits, never clears them
            self.dma_written.discard(address)


def _bytes(arg: abi.IoctlArg) -> memoryview:
    if isinstance(arg, int):
        raise _fail(errno.EFAULT, f"expected a buffer, got the integer {arg}")
    return memoryview(arg).cast("B")
