"""Wire framing for the migration data plane.

Every message between the source and destination agent is one frame: a fixed 36-byte header
followed by an opaque payload. The header carries a 64-bit XXH3 checksum over the header fields
before it and the payload, so a changed frame (a flipped bit or a tampered payload) is detected,
but for a 2^-64 chance, before the destination writes the data into a namespace.

Header layout (network byte order)::

    magic    4s   b"NVMG"
    version  u8   2
    type     u8   FrameType
    rsvd     u16  0
    length   u32  payload length in bytes
    offset   u64  byte offset in the namespace (EXTENT), else 0
    seq      u64  EXTENT: running frame index; ROUND_END/ACK: round number
    checksum u64  xxhash.xxh3_64(header[:28] + payload)

EXTENT frames are numbered 1, 2, 3, ... over a connection, across rounds; the receiver refuses one
that is not the next (a replayed frame passes the checksum, its seq gives it away).

Version 1 had a CRC-32 (zlib) in a u32 instead; it ran at about 1 GB/s, a whole core at link
speed on each side, where XXH3 runs at many GB/s. Agents of the two versions refuse each other's
frames by the version byte.

This module is pure: no sockets, no tasks. The only I/O is ``read_frame``, which consumes an
``asyncio.StreamReader`` (or the receiver's reader) that somebody else owns.
"""

from __future__ import annotations

import asyncio
import struct
from dataclasses import dataclass
from enum import IntEnum
from typing import Protocol

import xxhash

__all__ = [
    "HEADER",
    "HEADER_SIZE",
    "MAGIC",
    "MAX_PAYLOAD_DEFAULT",
    "VERSION",
    "ChecksumError",
    "Frame",
    "FrameError",
    "FrameType",
    "decode_frame",
    "encode_frame",
    "encode_header",
    "extent_header",
    "frame_checksum",
    "frame_length",
    "read_frame",
]

MAGIC = b"NVMG"
VERSION = 2
MAX_PAYLOAD_DEFAULT = 8 * 1024 * 1024

# The checksum covers everything before it, so the header is split in two structs: the part that
# is checksummed and the trailing checksum itself. Together they form HEADER.
_PREFIX = struct.Struct("!4sBBHIQQ")
_CHECKSUM = struct.Struct("!Q")
_LENGTH = struct.Struct("!I")
_LENGTH_AT = 8  # after magic, version, type and the reserved u16
HEADER = struct.Struct("!4sBBHIQQQ")
HEADER_SIZE = HEADER.size
assert HEADER_SIZE == _PREFIX.size + _CHECKSUM.size == 36

_U32_MAX = 0xFFFF_FFFF
_U64_MAX = 0xFFFF_FFFF_FFFF_FFFF


class FrameType(IntEnum):
    """What a frame means; the numbers are on the wire and must never be reused."""

    HELLO = 1
    EXTENT = 2
    ROUND_END = 3
    FINAL = 4
    ACK = 5
    ABORT = 6
    # The switchover's commit plan (a serialized agent_pb2.SwitchoverPlan), sent before FINAL;
    # not acknowledged by itself: FINAL's ACK says how the switchover ended.
    SWITCHOVER_PLAN = 7
    # A piece of the guest's map of acknowledged blocks (agent.guest.map_sync), sent after a
    # round's extents and acknowledged with the round; only to a receiver whose HELLO ACK lists
    # the "guest_map" feature.
    GUEST_MAP = 8


@dataclass(frozen=True)
class Frame:
    """One decoded (or to-be-encoded) frame."""

    type: FrameType
    offset: int = 0
    seq: int = 0
    payload: bytes = b""


class ByteReader(Protocol):
    """What ``read_frame`` reads from: an ``asyncio.StreamReader``, or the receiver's
    ``agent.dataplane.stream.FrameStreamReader``."""

    async def readexactly(self, n: int) -> bytes: ...


class FrameError(Exception):
    """The byte stream does not hold a valid frame (bad magic, version, type, length, truncation)."""


class ChecksumError(FrameError):
    """A frame's checksum does not match its contents: the data was corrupted on the way."""


def _type_name(raw: int) -> str:
    try:
        return FrameType(raw).name
    except ValueError:
        return f"type#{raw}"


def frame_checksum(prefix: bytes | memoryview, payload: bytes | bytearray | memoryview) -> int:
    """XXH3-64 of the header fields before the checksum, then the payload."""
    digest = xxhash.xxh3_64(prefix)
    digest.update(payload)
    return int(digest.intdigest())


def _header(ftype: FrameType, offset: int, seq: int, payload: bytes | bytearray | memoryview) -> bytes:
    length = len(payload)
    if length > _U32_MAX:
        raise ValueError(f"frame payload of {length} bytes exceeds the u32 length field; split it")
    if not 0 <= offset <= _U64_MAX:
        raise ValueError(f"frame offset {offset} is outside 0..2^64-1")
    if not 0 <= seq <= _U64_MAX:
        raise ValueError(f"frame seq {seq} is outside 0..2^64-1")
    prefix = _PREFIX.pack(MAGIC, VERSION, int(ftype), 0, length, offset, seq)
    return prefix + _CHECKSUM.pack(frame_checksum(prefix, payload))


def encode_header(frame: Frame) -> bytes:
    """Return the header for ``frame``, including the checksum over header and payload.

    Kept separate from the payload so a sender can write header and payload with two
    ``writer.write`` calls instead of concatenating (copying) a 1 MiB payload.
    """
    return _header(FrameType(frame.type), frame.offset, frame.seq, frame.payload)


def extent_header(offset: int, seq: int, payload: bytes | bytearray | memoryview) -> bytes:
    """The header of an EXTENT frame for ``payload`` (a view into the sender's buffer: no copy)."""
    return _header(FrameType.EXTENT, offset, seq, payload)


def encode_frame(frame: Frame) -> bytes:
    """Return header and payload as one bytes object (copies the payload; fine for small frames)."""
    return encode_header(frame) + frame.payload


async def read_frame(reader: ByteReader, max_payload: int = MAX_PAYLOAD_DEFAULT) -> Frame | None:
    """Read one frame from ``reader``.

    Returns None on a clean EOF exactly at a frame boundary. Raises ``FrameError`` for a
    truncated frame, bad magic/version, unknown type or a length above ``max_payload`` (checked
    before reading, so a corrupt length cannot make us allocate gigabytes), and
    ``ChecksumError`` when the checksum does not match.
    """
    try:
        raw = await reader.readexactly(HEADER_SIZE)
    except asyncio.IncompleteReadError as exc:
        if not exc.partial:
            return None
        raise FrameError(
            f"stream ended inside a frame header ({len(exc.partial)} of {HEADER_SIZE} bytes); "
            "the peer closed the connection mid-frame"
        ) from None

    ftype, length, offset, seq, expected = _parse_header(raw, max_payload)

    if length:
        try:
            payload = await reader.readexactly(length)
        except asyncio.IncompleteReadError as exc:
            raise FrameError(
                f"stream ended inside the payload of {_where(ftype, offset, seq)} ({len(exc.partial)} of "
                f"{length} bytes)"
            ) from None
    else:
        payload = b""

    _verify(raw, payload, expected, ftype, offset, seq)
    return Frame(FrameType(ftype), offset, seq, payload)


def frame_length(header: bytes | bytearray | memoryview) -> int:
    """The payload length a (not yet checked) header declares."""
    (length,) = _LENGTH.unpack_from(header, _LENGTH_AT)
    return int(length)


def decode_frame(buffer: bytes | bytearray, max_payload: int = MAX_PAYLOAD_DEFAULT) -> tuple[Frame, int] | None:
    """The first frame in ``buffer`` and how many bytes it took, or None while it is incomplete.

    For a reader that receives into its own buffer (the sender reading ACKs from a blocking
    socket); the checks and errors are ``read_frame``'s.
    """
    if len(buffer) < HEADER_SIZE:
        return None
    raw = bytes(buffer[:HEADER_SIZE])
    ftype, length, offset, seq, expected = _parse_header(raw, max_payload)
    if len(buffer) < HEADER_SIZE + length:
        return None
    payload = bytes(buffer[HEADER_SIZE : HEADER_SIZE + length])
    _verify(raw, payload, expected, ftype, offset, seq)
    return Frame(FrameType(ftype), offset, seq, payload), HEADER_SIZE + length


def _where(ftype: int, offset: int, seq: int) -> str:
    return f"{_type_name(ftype)} frame at offset {offset} seq {seq}"


def _parse_header(raw: bytes, max_payload: int) -> tuple[int, int, int, int, int]:
    """(type, length, offset, seq, checksum) of a header; FrameError for anything invalid."""
    magic, version, ftype, _reserved, length, offset, seq = _PREFIX.unpack_from(raw)
    (expected,) = _CHECKSUM.unpack_from(raw, _PREFIX.size)
    if magic == MAGIC and version == VERSION and ftype in FrameType._value2member_map_ and length <= max_payload:
        return ftype, length, offset, seq, expected  # the one way through; the message is built only for the others
    where = _where(ftype, offset, seq)
    if magic != MAGIC:
        raise FrameError(f"bad frame magic {magic!r} (expected {MAGIC!r}) in {where}; not a data-plane peer")
    if version != VERSION:
        raise FrameError(f"unsupported frame version {version} (this agent speaks {VERSION}) in {where}")
    if ftype not in FrameType._value2member_map_:
        raise FrameError(f"unknown frame type {ftype} in {where}")
    if length > max_payload:
        raise FrameError(
            f"{where} declares a {length}-byte payload, above the {max_payload}-byte limit; "
            "corrupt header or a peer with a larger chunk size"
        )
    return ftype, length, offset, seq, expected


def _verify(raw: bytes, payload: bytes, expected: int, ftype: int, offset: int, seq: int) -> None:
    actual = frame_checksum(memoryview(raw)[: _PREFIX.size], payload)
    if actual != expected:
        raise ChecksumError(
            f"checksum mismatch in {_where(ftype, offset, seq)} ({len(payload)} payload bytes): expected xxh3 "
            f"0x{expected:016x}, computed 0x{actual:016x}; the frame was corrupted in transit"
        )
