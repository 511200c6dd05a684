"""Field checks the command handlers share: reserved bits, unused NSIDs, offsets, transfer sizes.

Each raises CommandError with the status the specification names for the case and a detail text
that says which field held which value.
"""

from __future__ import annotations

from agent.emulated.model.controllers import CommandError
from agent.emulated.model.structures import MAX_TRANSFER_BYTES
from agent.nvme.commands import Sqe
from agent.nvme.spec import Status


def reserved(field: str, value: int, mask: int) -> None:
    """Invalid Field in Command when any bit of ``mask`` is set in ``value``."""
    if value & mask:
        raise CommandError(Status.INVALID_FIELD, f"{field}={value:#010x} has reserved bits {value & mask:#x} set")


def unused_dwords(cmd: Sqe, *names: str) -> None:
    """Command dwords this command does not use are reserved: all zero."""
    for name in names:
        reserved(name, getattr(cmd, name), 0xFFFF_FFFF)


def no_nsid(cmd: Sqe) -> None:
    """Base 2.1 section 4.1: a command that does not use the NSID must have it cleared."""
    if cmd.nsid:
        raise CommandError(Status.INVALID_FIELD, f"nsid={cmd.nsid:#x} on a command that does not use the "
                                                 "namespace identifier; it must be 0")


def byte_offset(cmd: Sqe) -> int:
    """The dword-aligned byte offset in CDW12 (low) and CDW13 (high)."""
    offset = cmd.cdw12 | cmd.cdw13 << 32
    if offset % 4:
        raise CommandError(Status.INVALID_FIELD, f"offset={offset} is not dword aligned")
    return offset


def transfer(length_bytes: int, what: str) -> int:
    """A data transfer may not exceed MDTS."""
    if length_bytes > MAX_TRANSFER_BYTES:
        raise CommandError(Status.INVALID_FIELD, f"{what} of {length_bytes} bytes exceeds the maximum data "
                                                 f"transfer size of {MAX_TRANSFER_BYTES} bytes (MDTS)")
    return length_bytes


def data_length(data: bytes | None, expected: int, what: str) -> bytes:
    """The host-to-controller buffer must be exactly what the command describes."""
    got = 0 if data is None else len(data)
    if data is None or got != expected:
        raise CommandError(Status.DATA_TRANSFER_ERROR, f"{what} describes {expected} bytes of data, the host "
                                                       f"buffer holds {got}")
    return data


def piece(data: bytes, offset: int, length: int) -> bytes:
    """``length`` bytes of ``data`` from ``offset``, zero filled past its end (a host buffer's worth)."""
    if offset >= len(data):
        raise CommandError(Status.INVALID_FIELD, f"offset={offset} is at or past the end of the {len(data)}-byte "
                                                 "structure")
    return data[offset : offset + length].ljust(length, b"\0")
