"""The data structures the emulated controller returns: Identify pages and log pages (pure).

Each builder takes plain values and returns the bytes at the specification's offsets (see
``agent.nvme.spec`` for the offsets and their sources).  Fields we do not model stay zero, which
the specification reads as "not supported" or "not reported".
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from agent.emulated.model.controllers import ErrorRecord
from agent.nvme import spec
from agent.nvme.error_log import ERROR_DETAIL_BYTES, pack_error_detail, pack_error_entry

# Controller capabilities the Identify Controller page advertises.
VENDOR_ID = 0x0000  # no PCI vendor: an emulated device
MODEL_NUMBER = "nvmigrate emulated NVMe controller"
FIRMWARE_REVISION = "1.0"
NVME_VERSION = 0x0002_0100  # 2.1.0
MDTS_POWER = 8  # maximum data transfer 2^8 * 4 KiB (CAP.MPSMIN) = 1 MiB
MAX_TRANSFER_BYTES = (1 << MDTS_POWER) * 4096
MAX_NAMESPACES = 16  # NN
WCTEMP_K = 343
CCTEMP_K = 358
# LBADS = log2(4096) in LBA format 0; no metadata, no protection information.
_LBAF0 = 12 << 16


def _ascii(value: str, width: int) -> bytes:
    """Identify strings: ASCII, space padded, truncated to the field."""
    return value.encode("ascii", "replace")[:width].ljust(width, b" ")


def identify_controller(*, cntlid: int, serial: str, subsystem_nqn: str, migration_controller: bool,
                        secondary: bool, migratable_controllers: int) -> bytes:
    """Identify Controller (CNS 01h).  Only the migration controller reports OACS.HMLMS and the
    TP4159 tracking fields: the secondaries are the controllers being migrated."""
    page = bytearray(spec.IDENTIFY_BYTES)
    struct.pack_into("<HH", page, spec.ID_CTRL_VID, VENDOR_ID, VENDOR_ID)
    page[spec.ID_CTRL_SN : spec.ID_CTRL_SN + 20] = _ascii(serial, 20)
    page[spec.ID_CTRL_MN : spec.ID_CTRL_MN + 40] = _ascii(MODEL_NUMBER, 40)
    page[spec.ID_CTRL_FR : spec.ID_CTRL_FR + 8] = _ascii(FIRMWARE_REVISION, 8)
    page[spec.ID_CTRL_CMIC] = spec.CMIC_MULTIPLE_CONTROLLERS | (spec.CMIC_SRIOV_VF if secondary else 0)
    page[spec.ID_CTRL_MDTS] = MDTS_POWER
    struct.pack_into("<HI", page, spec.ID_CTRL_CNTLID, cntlid, NVME_VERSION)
    page[spec.ID_CTRL_CNTRLTYPE] = 1  # I/O controller
    struct.pack_into("<H", page, spec.ID_CTRL_OACS, spec.OACS_HMLMS if migration_controller else 0)
    page[spec.ID_CTRL_ACL] = 3
    page[spec.ID_CTRL_AERL] = 3
    page[spec.ID_CTRL_FRMW] = 0x03  # one firmware slot, read only
    page[spec.ID_CTRL_ELPE] = 15  # 16 Error Information entries, zero-based
    struct.pack_into("<HH", page, spec.ID_CTRL_WCTEMP, WCTEMP_K, CCTEMP_K)
    page[spec.ID_CTRL_SQES] = 0x66
    page[spec.ID_CTRL_CQES] = 0x44
    struct.pack_into("<HIH", page, spec.ID_CTRL_MAXCMD, 256, MAX_NAMESPACES, spec.ONCS_DSM | spec.ONCS_WRITE_ZEROES)
    # Volatile write cache present; Flush accepts the broadcast NSID (bits 2:1 = 11b).
    page[spec.ID_CTRL_VWC] = 0x07
    if migration_controller:
        page[spec.ID_CTRL_TRATTR] = spec.TRATTR_TUDCS
        struct.pack_into("<HH", page, spec.ID_CTRL_MCUDMQ, 1, migratable_controllers)
    nqn = subsystem_nqn.encode("ascii", "replace")[:255]
    page[spec.ID_CTRL_SUBNQN : spec.ID_CTRL_SUBNQN + len(nqn)] = nqn
    return bytes(page)


def identify_namespace(*, block_count: int, allocated_blocks: int) -> bytes:
    """Identify Namespace (CNS 00h), NVM command set: thin provisioned, one 4096-byte LBA format."""
    page = bytearray(spec.IDENTIFY_BYTES)
    struct.pack_into("<QQQ", page, spec.ID_NS_NSZE, block_count, block_count, min(allocated_blocks, block_count))
    page[spec.ID_NS_NSFEAT] = spec.NSFEAT_THIN_PROVISIONING
    page[spec.ID_NS_NLBAF] = 0
    page[spec.ID_NS_FLBAS] = 0
    page[spec.ID_NS_DLFEAT] = spec.DLFEAT_READS_ZEROES_AND_WZ_DEALLOCATES
    struct.pack_into("<I", page, spec.ID_NS_LBAF0, _LBAF0)
    return bytes(page)


def active_namespaces(nsids: Iterable[int], after: int) -> bytes:
    """Active Namespace ID list (CNS 02h): up to 1024 attached NSIDs greater than ``after``, ascending."""
    chosen = sorted(n for n in nsids if n > after)[: spec.IDENTIFY_BYTES // 4]
    return struct.pack(f"<{len(chosen)}I", *chosen).ljust(spec.IDENTIFY_BYTES, b"\0")


def supported_state_formats(versions: Sequence[int]) -> bytes:
    """Supported Controller State Formats (CNS 20h): NV u8, NUUID u8, then NV u16 versions (the
    layout the vfio-nvme RFC gives); CSVI in the migration commands indexes this list."""
    body = struct.pack(f"<BB{len(versions)}H", len(versions), 0, *versions)
    return body.ljust(spec.IDENTIFY_BYTES, b"\0")


@dataclass
class Health:
    """What the SMART / Health Information log reports; tests and the failure predictor set it."""

    temperature_k: int = 310
    available_spare: int = 100
    available_spare_threshold: int = 10
    percentage_used: int = 0
    media_errors: int = 0
    critical_warning: int = 0  # bits reported on top of the ones computed from the values above
    bytes_read: int = 0
    bytes_written: int = 0
    read_commands: int = 0
    write_commands: int = 0


def _data_units(byte_count: int) -> int:
    """Data units: thousands of 512-byte units, rounded up."""
    return -(-byte_count // (512 * 1000))


def smart_log(health: Health, *, over_threshold_k: int, under_threshold_k: int, error_log_entries: int) -> bytes:
    """SMART / Health Information (LID 02h), 512 bytes."""
    warning = health.critical_warning
    if health.available_spare < health.available_spare_threshold:
        warning |= spec.CRITICAL_WARNING_SPARE
    if health.temperature_k > over_threshold_k or health.temperature_k < under_threshold_k:
        warning |= spec.CRITICAL_WARNING_TEMPERATURE
    page = bytearray(spec.SMART_BYTES)
    page[spec.SMART_CRITICAL_WARNING] = warning & 0xFF
    struct.pack_into("<HBBB", page, spec.SMART_COMPOSITE_TEMPERATURE, health.temperature_k,
                     health.available_spare, health.available_spare_threshold, min(health.percentage_used, 255))
    for offset, value in ((spec.SMART_DATA_UNITS_READ, _data_units(health.bytes_read)),
                          (spec.SMART_DATA_UNITS_WRITTEN, _data_units(health.bytes_written)),
                          (spec.SMART_HOST_READ_COMMANDS, health.read_commands),
                          (spec.SMART_HOST_WRITE_COMMANDS, health.write_commands),
                          (spec.SMART_POWER_CYCLES, 1),
                          (spec.SMART_MEDIA_ERRORS, health.media_errors),
                          (spec.SMART_ERROR_LOG_ENTRIES, error_log_entries)):
        page[offset : offset + 16] = value.to_bytes(16, "little")
    return bytes(page)


def error_log(records: Iterable[ErrorRecord]) -> bytes:
    """Error Information (LID 01h): 64-byte entries, newest first.  Each names our error detail
    page (LID C0h) in Vendor Specific Information Available."""
    return b"".join(pack_error_entry(r.count, r.sqid, r.cid, r.status, r.nsid, spec.LogPageId.ERROR_DETAIL)
                    for r in records)


def error_detail(record: ErrorRecord | None) -> bytes:
    """Our error detail page (LID C0h, see agent.nvme.error_log) about the newest error, the first
    entry of the Error Information log."""
    if record is None:
        return bytes(ERROR_DETAIL_BYTES)
    return pack_error_detail(record.count, record.detail)
