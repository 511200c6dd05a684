"""The ctypes ABI of agent.backends.ioctl_abi against the kernel headers, through the C compiler.

A C program generated here includes the system's <linux/nvme_ioctl.h>, <linux/vfio.h>,
<linux/fs.h> and <linux/mman.h> and prints sizeof and offsetof of every struct and field we model, every ioctl number
and every constant; the test compares each printed value with ours.  Items newer than the
installed headers (see ``NEWER_THAN_LINUX_6_1``) are printed as MISSING by an #ifdef and reported
by a separate, skipped test, so a newer linux-libc-dev checks them without a change here.
"""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from agent.backends import ioctl_abi as abi
from agent.vfio_states import VfioState

HEADERS = ("linux/nvme_ioctl.h", "linux/vfio.h", "linux/fs.h", "linux/mman.h")

# C struct name -> our ctypes class.  Every field in _fields_ is checked with offsetof.
STRUCTS: dict[str, type[ctypes.Structure]] = {
    "struct nvme_passthru_cmd": abi.NvmePassthruCmd,
    "struct nvme_passthru_cmd64": abi.NvmePassthruCmd64,
    "struct vfio_group_status": abi.VfioGroupStatus,
    "struct vfio_device_bind_iommufd": abi.VfioDeviceBindIommufd,
    "struct vfio_device_feature": abi.VfioDeviceFeature,
    "struct vfio_device_feature_migration": abi.VfioDeviceFeatureMigration,
    "struct vfio_device_feature_mig_state": abi.VfioDeviceFeatureMigState,
    "struct vfio_precopy_info": abi.VfioPrecopyInfo,
    "struct vfio_device_feature_mig_data_size": abi.VfioDeviceFeatureMigDataSize,
    "struct vfio_device_feature_dma_logging_control": abi.VfioDeviceFeatureDmaLoggingControl,
    "struct vfio_device_feature_dma_logging_range": abi.VfioDeviceFeatureDmaLoggingRange,
    "struct vfio_device_feature_dma_logging_report": abi.VfioDeviceFeatureDmaLoggingReport,
}

CONSTANTS = (
    "NVME_IOCTL_ID",
    "NVME_IOCTL_ADMIN_CMD",
    "NVME_IOCTL_ADMIN64_CMD",
    "BLKZEROOUT",
    "MAP_HUGETLB",
    "MAP_HUGE_SHIFT",
    "MAP_HUGE_2MB",
    "VFIO_API_VERSION",
    "VFIO_TYPE1v2_IOMMU",
    "VFIO_TYPE",
    "VFIO_BASE",
    "VFIO_GET_API_VERSION",
    "VFIO_CHECK_EXTENSION",
    "VFIO_SET_IOMMU",
    "VFIO_GROUP_GET_STATUS",
    "VFIO_GROUP_SET_CONTAINER",
    "VFIO_GROUP_GET_DEVICE_FD",
    "VFIO_GROUP_FLAGS_VIABLE",
    "VFIO_GROUP_FLAGS_CONTAINER_SET",
    "VFIO_DEVICE_RESET",
    "VFIO_DEVICE_BIND_IOMMUFD",
    "VFIO_DEVICE_FEATURE",
    "VFIO_DEVICE_FEATURE_MASK",
    "VFIO_DEVICE_FEATURE_GET",
    "VFIO_DEVICE_FEATURE_SET",
    "VFIO_DEVICE_FEATURE_PROBE",
    "VFIO_DEVICE_FEATURE_MIGRATION",
    "VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE",
    "VFIO_DEVICE_FEATURE_DMA_LOGGING_START",
    "VFIO_DEVICE_FEATURE_DMA_LOGGING_STOP",
    "VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT",
    "VFIO_DEVICE_FEATURE_MIG_DATA_SIZE",
    "VFIO_MIGRATION_STOP_COPY",
    "VFIO_MIGRATION_P2P",
    "VFIO_MIGRATION_PRE_COPY",
    "VFIO_MIG_GET_PRECOPY_INFO",
    *(f"VFIO_DEVICE_STATE_{s.name}" for s in VfioState),
)

# Items that are not macros (structs, enum members) and newer than 6.1 are guarded by a macro
# that the same kernel release added next to them.
GUARDS = {
    "struct vfio_precopy_info": "VFIO_MIG_GET_PRECOPY_INFO",
    "struct vfio_device_feature_mig_data_size": "VFIO_DEVICE_FEATURE_MIG_DATA_SIZE",
    "struct vfio_device_bind_iommufd": "VFIO_DEVICE_BIND_IOMMUFD",
    "VFIO_DEVICE_STATE_PRE_COPY": "VFIO_MIGRATION_PRE_COPY",
    "VFIO_DEVICE_STATE_PRE_COPY_P2P": "VFIO_MIGRATION_PRE_COPY",
}
ENUM_MEMBERS = {f"VFIO_DEVICE_STATE_{s.name}" for s in VfioState}


@dataclass(frozen=True)
class Check:
    """One value the C program prints: ``key`` names it, ``expr`` computes it in C."""

    key: str
    item: str  # the header item it belongs to (for the MISSING report)
    expr: str
    ours: int


def checks() -> list[Check]:
    out: list[Check] = []
    for c_name, cls in STRUCTS.items():
        out.append(Check(f"sizeof({c_name})", c_name, f"sizeof({c_name})", ctypes.sizeof(cls)))
        for field_name, *_ in cls._fields_:
            ours = getattr(cls, field_name).offset
            out.append(Check(f"offsetof({c_name}, {field_name})", c_name, f"offsetof({c_name}, {field_name})", ours))
    for name in CONSTANTS:
        out.append(Check(name, name, name, getattr(abi, name)))
    # BLKZEROOUT's argument is a bare uint64_t[2], not a named struct.
    out.append(Check("sizeof(__u64[2])", "BLKZEROOUT", "sizeof(__u64[2])", ctypes.sizeof(abi.BlkRange)))
    return out


def c_program(items: list[Check]) -> str:
    lines = ["#include <stddef.h>", "#include <stdio.h>", *(f"#include <{h}>" for h in HEADERS), "",
             "int main(void) {"]
    for check in items:
        guard = GUARDS.get(check.item, check.item if check.item in abi.NEWER_THAN_LINUX_6_1 else None)
        if guard is None and check.item in CONSTANTS and check.item not in ENUM_MEMBERS:
            guard = check.item  # every macro is checked for presence, so a misspelt name shows up
        printed = f'  printf("%s=%llu\\n", "{check.key}", (unsigned long long)({check.expr}));'
        if guard is None:
            lines.append(printed)
        else:
            lines += [f"#ifdef {guard}", printed, "#else", f'  printf("%s=MISSING\\n", "{check.key}");', "#endif"]
    lines += ["  return 0;", "}", ""]
    return "\n".join(lines)


def _headers_missing() -> list[str]:
    include = Path("/usr/include")
    return [h for h in HEADERS if not (include / h).is_file()]


@pytest.fixture(scope="module")
def c_values(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.skip("gcc is not installed (apt-get install gcc): the ABI cannot be checked against the headers")
    missing = _headers_missing()
    if missing:
        pytest.skip(f"kernel headers {missing} are not installed (apt-get install linux-libc-dev)")
    work = tmp_path_factory.mktemp("abi")
    source = work / "abi.c"
    source.write_text(c_program(checks()))
    binary = work / "abi"
    built = subprocess.run([gcc, "-std=gnu11", "-Wall", "-Werror", "-o", str(binary), str(source)],
                           capture_output=True, text=True, check=False)
    assert built.returncode == 0, (
        f"the ABI probe did not compile:\n{built.stderr}\n--- source ---\n{source.read_text()}"
    )
    ran = subprocess.run([str(binary)], capture_output=True, text=True, check=True)
    values = dict(line.split("=", 1) for line in ran.stdout.splitlines())
    yield values


def test_every_value_the_headers_define_matches(c_values: dict[str, str]) -> None:
    items = checks()
    assert len(c_values) == len(items), "the C program printed a different number of values than requested"
    mismatches = [
        f"{c.key}: kernel headers say {int(c_values[c.key]):#x}, ioctl_abi has {c.ours:#x}"
        for c in items
        if c_values[c.key] != "MISSING" and int(c_values[c.key]) != c.ours
    ]
    assert not mismatches, "ABI mismatch with the system headers:\n" + "\n".join(mismatches)
    compared = [c for c in items if c_values[c.key] != "MISSING"]
    # What the 6.1 headers already define (every struct but three, every macro but six) is compared.
    assert len(compared) >= 99, f"only {len(compared)} of {len(items)} values compared"


def test_only_known_newer_items_are_missing(c_values: dict[str, str]) -> None:
    missing = {c.item for c in checks() if c_values[c.key] == "MISSING"}
    unexpected = missing - set(abi.NEWER_THAN_LINUX_6_1)
    assert not unexpected, (
        f"{sorted(unexpected)} are not in the system headers and not listed as newer than Linux 6.1: "
        "a misspelt name, or a header older than 6.1"
    )


def test_items_newer_than_the_headers(c_values: dict[str, str]) -> None:
    missing = sorted({c.item for c in checks() if c_values[c.key] == "MISSING"})
    if missing:
        pytest.skip(
            "the installed linux-libc-dev predates these items, so the compiler could not check them: "
            + ", ".join(f"{m} (Linux {abi.NEWER_THAN_LINUX_6_1[m]})" for m in missing)
        )


def test_vfio_state_numbers_are_the_state_machine_numbers() -> None:
    for state in VfioState:
        assert getattr(abi, f"VFIO_DEVICE_STATE_{state.name}") == int(state)


def test_ioc_helpers_reject_fields_that_do_not_fit() -> None:
    assert abi._IOC(abi.IOC_READ | abi.IOC_WRITE, "N", 0x41, 72) == 0xC0484E41
    with pytest.raises(ValueError, match="size=16384 does not fit the 14-bit field"):
        abi._IOC(abi.IOC_READ, "N", 1, 1 << 14)
    with pytest.raises(ValueError, match="nr=256 does not fit"):
        abi._IO(abi.VFIO_TYPE, 256)


def test_feature_request_layout() -> None:
    buf = abi.feature_request(abi.VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE, abi.VFIO_DEVICE_FEATURE_SET,
                              abi.VfioDeviceFeatureMigState(device_state=3, data_fd=-1))
    # argsz = 8-byte header + 8-byte payload; flags = SET | feature 2; then the payload.
    assert buf.raw == bytes.fromhex("10000000" "02000200" "03000000" "ffffffff")
    got = abi.feature_payload(buf, abi.VfioDeviceFeatureMigState)
    assert (got.device_state, got.data_fd) == (3, -1)
    with pytest.raises(ValueError, match="feature index 0x10000 does not fit"):
        abi.feature_request(0x10000, abi.VFIO_DEVICE_FEATURE_GET)
