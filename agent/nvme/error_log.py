"""Why a command failed: the Error Information log entry and our error detail page (pure).

A failed command completes with the More bit set when the Error Information log (LID 01h) holds
more about it.  Its newest entry names, in Vendor Specific Information Available (VSIA), a log
page with the vendor's explanation.  The emulated controller's is ours, LID C0h: error count
u64, text length u32, reserved u32, UTF-8 text.  The host reads it only when the entry names C0h
and the error counts agree, so a real device's own vendor page is never misread as ours.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from agent.nvme import spec

# Error Information log entry (Base Specification 2.1, Figure 205): error count, SQID, CID,
# status field, parameter location, LBA, NSID, VSIA, transport type, reserved, command specific
# information, transport type specific information, reserved.
ERROR_ENTRY = struct.Struct("<QHHHHQIBBxxQH22x")
assert ERROR_ENTRY.size == spec.ERROR_LOG_ENTRY_BYTES
_DETAIL_HEADER = struct.Struct("<QI4x")
ERROR_DETAIL_BYTES = 4096
PARAMETER_LOCATION_UNKNOWN = 0xFFFF


@dataclass(frozen=True)
class ErrorEntry:
    """The fields of an Error Information entry the host uses."""

    count: int
    status: int  # (SCT << 8) | SC
    vendor_page: int  # VSIA: the log page with more, 0 for none


def pack_error_entry(count: int, sqid: int, cid: int, status: int, nsid: int, vendor_page: int) -> bytes:
    status_field = (status & 0xFF) << 1 | (status >> 8) << 9
    return ERROR_ENTRY.pack(count, sqid, cid, status_field, PARAMETER_LOCATION_UNKNOWN, 0, nsid, vendor_page,
                            0, 0, 0)


def parse_error_entry(raw: bytes) -> ErrorEntry:
    count, _, _, status_field, _, _, _, vsia, *_ = ERROR_ENTRY.unpack_from(raw)
    return ErrorEntry(count, (status_field >> 9 & 0x7) << 8 | status_field >> 1 & 0xFF, vsia)


def pack_error_detail(count: int, text: str) -> bytes:
    """Our error detail page (LID C0h) for the error numbered ``count``."""
    encoded = text.encode("utf-8")[: ERROR_DETAIL_BYTES - _DETAIL_HEADER.size]
    return (_DETAIL_HEADER.pack(count, len(encoded)) + encoded).ljust(ERROR_DETAIL_BYTES, b"\0")


def parse_error_detail(page: bytes) -> tuple[int, str]:
    """(error count, text) from an error detail page."""
    count, length = _DETAIL_HEADER.unpack_from(page)
    return count, page[_DETAIL_HEADER.size : _DETAIL_HEADER.size + length].decode("utf-8", "replace")
