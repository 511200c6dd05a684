"""The SMART / Health Information log page (LID 02h), decoded into what a failure policy reads.

Offsets are the NVMe base specification's (agent/nvme/spec.py); the emulated model encodes the
same page (agent/emulated/model/structures.py `smart_log`), a real device returns it to Get Log
Page. Pure: 512 bytes in, a `DriveHealth` out.
"""

from __future__ import annotations

import struct

from agent.nvme import spec
from cluster.records import DriveHealth

WARNING_BITS = {
    spec.CRITICAL_WARNING_SPARE: "available spare below its threshold",
    spec.CRITICAL_WARNING_TEMPERATURE: "temperature outside its thresholds",
    spec.CRITICAL_WARNING_RELIABILITY: "reliability degraded (media or internal errors)",
    spec.CRITICAL_WARNING_READ_ONLY: "media placed in read-only mode",
    1 << 4: "volatile memory backup failed",
    1 << 5: "persistent memory region read-only or unreliable",
}


class SmartLogError(ValueError):
    pass


def parse_smart_log(page: bytes) -> DriveHealth:
    if len(page) < spec.SMART_BYTES:
        raise SmartLogError(f"SMART / Health log is {len(page)} bytes; it has {spec.SMART_BYTES}")
    temperature_k, spare, threshold, used = struct.unpack_from("<HBBB", page, spec.SMART_COMPOSITE_TEMPERATURE)
    media_errors = int.from_bytes(page[spec.SMART_MEDIA_ERRORS : spec.SMART_MEDIA_ERRORS + 16], "little")
    return DriveHealth(critical_warning=page[spec.SMART_CRITICAL_WARNING], temperature_k=temperature_k,
                       available_spare=spare, available_spare_threshold=threshold, percentage_used=used,
                       media_errors=media_errors)


def warning_names(critical_warning: int) -> list[str]:
    """The Critical Warning bits set, as an operator reads them (unknown bits by number)."""
    names = [text for bit, text in WARNING_BITS.items() if critical_warning & bit]
    unknown = critical_warning & ~sum(WARNING_BITS)
    names += [f"critical warning bit {i}" for i in range(8) if unknown & (1 << i)]
    return names
