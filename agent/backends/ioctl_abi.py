"""The Linux ioctl ABI the real-device backends speak, transcribed into ctypes.

Four kernel headers are transcribed here, and nothing else:

- ``linux/nvme_ioctl.h``: ``struct nvme_passthru_cmd`` (and the 64-bit-result variant) and the
  admin passthrough ioctl numbers, for the ``nvme-passthru`` backend;
- ``linux/vfio.h``: the container/group/device ioctls, ``VFIO_DEVICE_FEATURE`` with the migration
  features (device state, data size, DMA logging) and ``VFIO_MIG_GET_PRECOPY_INFO``, for the
  ``vfio`` backend;
- ``linux/fs.h``: ``BLKZEROOUT``, with which a namespace block device is sanitized;
- ``linux/mman.h``: the ``mmap(2)`` flags of a 2 MiB huge page, the physically contiguous memory
  a Controller Data Queue of more than one page needs (Python's ``mmap`` module lacks them).

Every number and every struct layout here is checked against the system headers by
``tests/test_ioctl_abi.py``, which compiles a C program that prints them.  Some items are newer
than the headers of Debian 12 (linux-libc-dev 6.1): the PRE_COPY states and flag, the precopy
info ioctl and the stop-copy data size (Linux 6.2), and the iommufd bind of a VFIO cdev (Linux
6.6).  They are transcribed from the upstream header, listed in ``NEWER_THAN_LINUX_6_1``, and
checked by the compiler wherever the headers have them.

The ioctl request encoding below is the generic one (x86, arm64, riscv, s390); powerpc, mips and
sparc lay the direction bits out differently, which the ABI test would catch there.
"""

from __future__ import annotations

import ctypes
import fcntl
from collections.abc import Callable
from typing import Any, Final, TypeVar

from agent.vfio_states import VfioState

# ----- <asm-generic/ioctl.h> ---------------------------------------------------------------------

_IOC_NRBITS: Final = 8
_IOC_TYPEBITS: Final = 8
_IOC_SIZEBITS: Final = 14
_IOC_NRSHIFT: Final = 0
_IOC_TYPESHIFT: Final = _IOC_NRSHIFT + _IOC_NRBITS
_IOC_SIZESHIFT: Final = _IOC_TYPESHIFT + _IOC_TYPEBITS
_IOC_DIRSHIFT: Final = _IOC_SIZESHIFT + _IOC_SIZEBITS

IOC_NONE: Final = 0
IOC_WRITE: Final = 1
IOC_READ: Final = 2


def _IOC(direction: int, ioc_type: int | str, nr: int, size: int) -> int:
    """``_IOC(dir, type, nr, size)``; ``ioc_type`` may be the one-character string of the C macro."""
    type_number = ord(ioc_type) if isinstance(ioc_type, str) else ioc_type
    fields = (
        ("direction", direction, 2),
        ("type", type_number, _IOC_TYPEBITS),
        ("nr", nr, _IOC_NRBITS),
        ("size", size, _IOC_SIZEBITS),
    )
    for name, value, bits in fields:
        if not 0 <= value < (1 << bits):
            raise ValueError(f"ioctl {name}={value} does not fit the {bits}-bit field of an ioctl number")
    return (
        (direction << _IOC_DIRSHIFT)
        | (type_number << _IOC_TYPESHIFT)
        | (nr << _IOC_NRSHIFT)
        | (size << _IOC_SIZESHIFT)
    )


def _IO(ioc_type: int | str, nr: int) -> int:
    return _IOC(IOC_NONE, ioc_type, nr, 0)


def _IOR(ioc_type: int | str, nr: int, c_type: type[ctypes._CData]) -> int:
    return _IOC(IOC_READ, ioc_type, nr, ctypes.sizeof(c_type))


def _IOW(ioc_type: int | str, nr: int, c_type: type[ctypes._CData]) -> int:
    return _IOC(IOC_WRITE, ioc_type, nr, ctypes.sizeof(c_type))


def _IOWR(ioc_type: int | str, nr: int, c_type: type[ctypes._CData]) -> int:
    return _IOC(IOC_READ | IOC_WRITE, ioc_type, nr, ctypes.sizeof(c_type))


# ctypes' 64-bit integers are 8-byte aligned on every 64-bit Linux ABI, which is what the kernel's
# __aligned_u64 guarantees on 32-bit ones as well; the ABI test checks the resulting offsets.
_u8, _u16, _u32, _s32, _u64 = ctypes.c_uint8, ctypes.c_uint16, ctypes.c_uint32, ctypes.c_int32, ctypes.c_uint64

# ----- <linux/nvme_ioctl.h> ----------------------------------------------------------------------


# The fields both passthrough structs share, up to timeout_ms.
_PASSTHRU_COMMON = (
    ("opcode", _u8),
    ("flags", _u8),
    ("rsvd1", _u16),
    ("nsid", _u32),
    ("cdw2", _u32),
    ("cdw3", _u32),
    ("metadata", _u64),
    ("addr", _u64),
    ("metadata_len", _u32),
    ("data_len", _u32),
    ("cdw10", _u32),
    ("cdw11", _u32),
    ("cdw12", _u32),
    ("cdw13", _u32),
    ("cdw14", _u32),
    ("cdw15", _u32),
    ("timeout_ms", _u32),
)


class NvmePassthruCmd(ctypes.Structure):
    """``struct nvme_passthru_cmd`` (alias ``nvme_admin_cmd``): one admin or I/O command."""

    _fields_ = (*_PASSTHRU_COMMON, ("result", _u32))


class NvmePassthruCmd64(ctypes.Structure):
    """``struct nvme_passthru_cmd64``: as above with a 64-bit result (completion DW0 and DW1).

    The C struct overlays ``data_len`` with ``vec_cnt`` (vectored I/O); we never send vectored
    commands, so only ``data_len`` is named.
    """

    _fields_ = (*_PASSTHRU_COMMON, ("rsvd2", _u32), ("result", _u64))


NVME_IOCTL_ID: Final = _IO("N", 0x40)
NVME_IOCTL_ADMIN_CMD: Final = _IOWR("N", 0x41, NvmePassthruCmd)
NVME_IOCTL_ADMIN64_CMD: Final = _IOWR("N", 0x47, NvmePassthruCmd64)

# ----- <linux/fs.h> ------------------------------------------------------------------------------

# Zero a byte range of a block device; the argument is u64[2] = {start, length}.
BLKZEROOUT: Final = _IO(0x12, 127)


class BlkRange(ctypes.Structure):
    """The ``uint64_t range[2]`` argument of BLKZEROOUT and BLKDISCARD (not a named C struct)."""

    _fields_ = (("start", _u64), ("length", _u64))


# ----- <linux/mman.h> (asm-generic/mman-common.h, asm-generic/hugetlb_encode.h) -----------------

MAP_HUGETLB: Final = 0x40000
MAP_HUGE_SHIFT: Final = 26
MAP_HUGE_2MB: Final = 21 << MAP_HUGE_SHIFT  # log2(2 MiB) in the page-size bits

# ----- <linux/vfio.h> ----------------------------------------------------------------------------

VFIO_API_VERSION: Final = 0
VFIO_TYPE1v2_IOMMU: Final = 3
VFIO_TYPE: Final = ord(";")
VFIO_BASE: Final = 100

# Container (/dev/vfio/vfio) and group (/dev/vfio/N) ioctls.  The header spells most of these as
# _IO even where the comment says _IOW/_IOR: the argument size is not encoded.
VFIO_GET_API_VERSION: Final = _IO(VFIO_TYPE, VFIO_BASE + 0)
VFIO_CHECK_EXTENSION: Final = _IO(VFIO_TYPE, VFIO_BASE + 1)
VFIO_SET_IOMMU: Final = _IO(VFIO_TYPE, VFIO_BASE + 2)
VFIO_GROUP_GET_STATUS: Final = _IO(VFIO_TYPE, VFIO_BASE + 3)
VFIO_GROUP_SET_CONTAINER: Final = _IO(VFIO_TYPE, VFIO_BASE + 4)
VFIO_GROUP_GET_DEVICE_FD: Final = _IO(VFIO_TYPE, VFIO_BASE + 6)
VFIO_DEVICE_RESET: Final = _IO(VFIO_TYPE, VFIO_BASE + 11)
VFIO_DEVICE_FEATURE: Final = _IO(VFIO_TYPE, VFIO_BASE + 17)
# Device cdev (/dev/vfio/devices/vfioN) binding to an iommufd (Linux 6.6).
VFIO_DEVICE_BIND_IOMMUFD: Final = _IO(VFIO_TYPE, VFIO_BASE + 18)
# On the migration data_fd (Linux 6.2).
VFIO_MIG_GET_PRECOPY_INFO: Final = _IO(VFIO_TYPE, VFIO_BASE + 21)

VFIO_GROUP_FLAGS_VIABLE: Final = 1 << 0
VFIO_GROUP_FLAGS_CONTAINER_SET: Final = 1 << 1


class VfioGroupStatus(ctypes.Structure):
    """``struct vfio_group_status``."""

    _fields_ = (("argsz", _u32), ("flags", _u32))


class VfioDeviceBindIommufd(ctypes.Structure):
    """``struct vfio_device_bind_iommufd`` as of Linux 6.6 (later kernels append fields behind flags)."""

    _fields_ = (("argsz", _u32), ("flags", _u32), ("iommufd", _s32), ("out_devid", _u32))


class VfioDeviceFeature(ctypes.Structure):
    """``struct vfio_device_feature`` without its flexible ``data[]``: the feature payload follows."""

    _fields_ = (("argsz", _u32), ("flags", _u32))


VFIO_DEVICE_FEATURE_MASK: Final = 0xFFFF
VFIO_DEVICE_FEATURE_GET: Final = 1 << 16
VFIO_DEVICE_FEATURE_SET: Final = 1 << 17
VFIO_DEVICE_FEATURE_PROBE: Final = 1 << 18

VFIO_DEVICE_FEATURE_MIGRATION: Final = 1
VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE: Final = 2
VFIO_DEVICE_FEATURE_DMA_LOGGING_START: Final = 6
VFIO_DEVICE_FEATURE_DMA_LOGGING_STOP: Final = 7
VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT: Final = 8
VFIO_DEVICE_FEATURE_MIG_DATA_SIZE: Final = 9

VFIO_MIGRATION_STOP_COPY: Final = 1 << 0
VFIO_MIGRATION_P2P: Final = 1 << 1
VFIO_MIGRATION_PRE_COPY: Final = 1 << 2


class VfioDeviceFeatureMigration(ctypes.Structure):
    """``struct vfio_device_feature_migration``."""

    _fields_ = (("flags", _u64),)


class VfioDeviceFeatureMigState(ctypes.Structure):
    """``struct vfio_device_feature_mig_state``."""

    _fields_ = (("device_state", _u32), ("data_fd", _s32))


class VfioPrecopyInfo(ctypes.Structure):
    """``struct vfio_precopy_info`` (Linux 6.2), the argument of VFIO_MIG_GET_PRECOPY_INFO."""

    _fields_ = (("argsz", _u32), ("flags", _u32), ("initial_bytes", _u64), ("dirty_bytes", _u64))


class VfioDeviceFeatureMigDataSize(ctypes.Structure):
    """``struct vfio_device_feature_mig_data_size`` (Linux 6.2)."""

    _fields_ = (("stop_copy_length", _u64),)


class VfioDeviceFeatureDmaLoggingControl(ctypes.Structure):
    """``struct vfio_device_feature_dma_logging_control``; ``ranges`` is a user pointer."""

    _fields_ = (("page_size", _u64), ("num_ranges", _u32), ("__reserved", _u32), ("ranges", _u64))


class VfioDeviceFeatureDmaLoggingRange(ctypes.Structure):
    """``struct vfio_device_feature_dma_logging_range``."""

    _fields_ = (("iova", _u64), ("length", _u64))


class VfioDeviceFeatureDmaLoggingReport(ctypes.Structure):
    """``struct vfio_device_feature_dma_logging_report``; ``bitmap`` is a user pointer to u64s."""

    _fields_ = (("iova", _u64), ("length", _u64), ("page_size", _u64), ("bitmap", _u64))


# enum vfio_device_mig_state: the same numbers as agent.vfio_states, by construction.
VFIO_DEVICE_STATE_ERROR: Final = int(VfioState.ERROR)
VFIO_DEVICE_STATE_STOP: Final = int(VfioState.STOP)
VFIO_DEVICE_STATE_RUNNING: Final = int(VfioState.RUNNING)
VFIO_DEVICE_STATE_STOP_COPY: Final = int(VfioState.STOP_COPY)
VFIO_DEVICE_STATE_RESUMING: Final = int(VfioState.RESUMING)
VFIO_DEVICE_STATE_RUNNING_P2P: Final = int(VfioState.RUNNING_P2P)
VFIO_DEVICE_STATE_PRE_COPY: Final = int(VfioState.PRE_COPY)
VFIO_DEVICE_STATE_PRE_COPY_P2P: Final = int(VfioState.PRE_COPY_P2P)

# What the ABI test may find missing from older headers, with the kernel release that added it.
NEWER_THAN_LINUX_6_1: Final[dict[str, str]] = {
    "VFIO_MIGRATION_PRE_COPY": "6.2",
    "VFIO_DEVICE_STATE_PRE_COPY": "6.2",
    "VFIO_DEVICE_STATE_PRE_COPY_P2P": "6.2",
    "VFIO_MIG_GET_PRECOPY_INFO": "6.2",
    "struct vfio_precopy_info": "6.2",
    "VFIO_DEVICE_FEATURE_MIG_DATA_SIZE": "6.2",
    "struct vfio_device_feature_mig_data_size": "6.2",
    "VFIO_DEVICE_BIND_IOMMUFD": "6.6",
    "struct vfio_device_bind_iommufd": "6.6",
}

# ----- calling ioctl(2) ---------------------------------------------------------------------------

# What an ioctl takes: an integer argument, or a writable buffer (a ctypes object or a bytearray)
# whose address the kernel gets and whose contents it may change.
IoctlArg = int | bytearray | ctypes.Structure | ctypes.Array[Any]
# (fd, request, arg) -> the ioctl's non-negative return value; failures raise OSError with errno.
# The backends take one of these so that tests can put a fake device behind the same code.
IoctlFn = Callable[[int, int, IoctlArg], int]


def kernel_ioctl(fd: int, request: int, arg: IoctlArg) -> int:
    """The real ioctl(2): buffers are passed in place, so the kernel's writes land in ``arg``."""
    if isinstance(arg, int):
        return fcntl.ioctl(fd, request, arg)
    return fcntl.ioctl(fd, request, arg, True)


# ----- helpers that build what the backends pass to ioctl(2) --------------------------------------

_Payload = TypeVar("_Payload", bound=ctypes.Structure)


def feature_request(
    feature: int, flags: int, payload: ctypes.Structure | None = None
) -> ctypes.Array[ctypes.c_char]:
    """A ``vfio_device_feature`` header followed by ``payload``, with argsz filled in.

    The result is a writable buffer: the kernel writes GET results into the payload part, which
    the caller reads back with :func:`feature_payload`.
    """
    if feature & ~VFIO_DEVICE_FEATURE_MASK:
        raise ValueError(f"feature index {feature:#x} does not fit VFIO_DEVICE_FEATURE_MASK (16 bits)")
    payload_bytes = bytes(payload) if payload is not None else b""
    header = VfioDeviceFeature(
        argsz=ctypes.sizeof(VfioDeviceFeature) + len(payload_bytes), flags=flags | feature
    )
    return ctypes.create_string_buffer(bytes(header) + payload_bytes, header.argsz)


def feature_payload(buffer: ctypes.Array[ctypes.c_char], payload_type: type[_Payload]) -> _Payload:
    """Read the payload of a feature buffer (after the ioctl) as ``payload_type``."""
    return payload_type.from_buffer_copy(buffer.raw, ctypes.sizeof(VfioDeviceFeature))
