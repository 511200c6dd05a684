"""The NBD wire format the agent's server speaks: magics, option / command / flag numbers and
the fixed-size headers, as in the NBD protocol document (fixed newstyle negotiation, simple
replies). Pure: packing and unpacking only, no I/O.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import NamedTuple

# ---- handshake --------------------------------------------------------------------------------
NBDMAGIC = 0x4E42444D41474943  # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054  # "IHAVEOPT"
OPTION_REPLY_MAGIC = 0x3E889045565A9

FLAG_FIXED_NEWSTYLE = 1 << 0
FLAG_NO_ZEROES = 1 << 1
CLIENT_FLAG_FIXED_NEWSTYLE = 1 << 0
CLIENT_FLAG_NO_ZEROES = 1 << 1

OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_LIST = 3
OPT_STARTTLS = 5
OPT_INFO = 6
OPT_GO = 7

REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
_REP_ERR = 1 << 31
REP_ERR_UNSUP = _REP_ERR + 1
REP_ERR_POLICY = _REP_ERR + 2
REP_ERR_INVALID = _REP_ERR + 3
REP_ERR_TLS_REQD = _REP_ERR + 5
REP_ERR_UNKNOWN = _REP_ERR + 6
REP_ERR_SHUTDOWN = _REP_ERR + 7

INFO_EXPORT = 0
INFO_NAME = 1
INFO_DESCRIPTION = 2
INFO_BLOCK_SIZE = 3

# ---- transmission -----------------------------------------------------------------------------
TFLAG_HAS_FLAGS = 1 << 0
TFLAG_SEND_FLUSH = 1 << 2
TFLAG_SEND_FUA = 1 << 3
TFLAG_SEND_TRIM = 1 << 5
TFLAG_SEND_WRITE_ZEROES = 1 << 6
TFLAG_CAN_MULTI_CONN = 1 << 8

REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698

CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_TRIM = 4
CMD_WRITE_ZEROES = 6
COMMAND_NAMES = {CMD_READ: "READ", CMD_WRITE: "WRITE", CMD_DISC: "DISC", CMD_FLUSH: "FLUSH", CMD_TRIM: "TRIM",
                 CMD_WRITE_ZEROES: "WRITE_ZEROES"}

CMD_FLAG_FUA = 1 << 0
CMD_FLAG_NO_HOLE = 1 << 1

# errno values the protocol carries (Linux numbering, as the NBD document fixes them)
EIO = 5
EINVAL = 22
ENOSPC = 28
ESHUTDOWN = 108

# ---- headers ----------------------------------------------------------------------------------
_SERVER_GREETING = struct.Struct(">QQH")  # NBDMAGIC, IHAVEOPT, handshake flags
CLIENT_FLAGS = struct.Struct(">I")
OPTION_HEADER = struct.Struct(">QII")  # IHAVEOPT, option, length
_OPTION_REPLY = struct.Struct(">QIII")  # magic, option, reply type, length
_EXPORT_NAME_REPLY = struct.Struct(">QH")  # size, transmission flags
REQUEST = struct.Struct(">IHHQQI")  # magic, command flags, type, cookie, offset, length
_SIMPLE_REPLY = struct.Struct(">IIQ")  # magic, error, cookie
SIMPLE_REPLY_BYTES = _SIMPLE_REPLY.size
U16 = struct.Struct(">H")
U32 = struct.Struct(">I")


def server_greeting() -> bytes:
    return _SERVER_GREETING.pack(NBDMAGIC, IHAVEOPT, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES)


def option_reply(option: int, reply_type: int, data: bytes = b"") -> bytes:
    return _OPTION_REPLY.pack(OPTION_REPLY_MAGIC, option, reply_type, len(data)) + data


def export_name_reply(size: int, flags: int, no_zeroes: bool) -> bytes:
    return _EXPORT_NAME_REPLY.pack(size, flags) + (b"" if no_zeroes else bytes(124))


def info_export(size: int, flags: int) -> bytes:
    return struct.pack(">HQH", INFO_EXPORT, size, flags)


def info_block_size(minimum: int, preferred: int, maximum: int) -> bytes:
    return struct.pack(">HIII", INFO_BLOCK_SIZE, minimum, preferred, maximum)


def info_text(kind: int, text: str) -> bytes:
    return U16.pack(kind) + text.encode()


def server_entry(name: str) -> bytes:
    """NBD_REP_SERVER data: the export name, length-prefixed."""
    raw = name.encode()
    return U32.pack(len(raw)) + raw


def simple_reply(cookie: int, error: int = 0) -> bytes:
    return _SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, error, cookie)


class ProtocolError(Exception):
    """The client broke the protocol in a way that leaves the stream unusable: hang up."""


@dataclass(frozen=True)
class GoRequest:
    """The data of NBD_OPT_INFO / NBD_OPT_GO: an export name and the info items asked for."""

    name: str
    info_requests: tuple[int, ...]


def parse_go(data: bytes) -> GoRequest:
    """Raises ValueError (answered with NBD_REP_ERR_INVALID) when the lengths do not add up."""
    if len(data) < 4:
        raise ValueError(f"option data of {len(data)} bytes is too short for an export name length")
    (name_len,) = U32.unpack_from(data)
    if 4 + name_len + 2 > len(data):
        raise ValueError(f"export name length {name_len} runs past the {len(data)}-byte option data")
    name = data[4:4 + name_len].decode("utf-8", errors="replace")
    (count,) = U16.unpack_from(data, 4 + name_len)
    rest = data[4 + name_len + 2:]
    if len(rest) != 2 * count:
        raise ValueError(f"{count} info requests need {2 * count} bytes, the option has {len(rest)}")
    return GoRequest(name, tuple(U16.unpack_from(rest, 2 * i)[0] for i in range(count)))


class Request(NamedTuple):
    """A transmission-phase request header (the payload of a WRITE follows it on the wire)."""

    flags: int
    command: int
    cookie: int
    offset: int
    length: int


def parse_request(header: bytes | bytearray, max_write_bytes: int, at: int = 0) -> Request:
    """The request in the 28-byte header at ``at``; ProtocolError when the stream cannot go on after it.

    That is a wrong magic, or a WRITE longer than ``max_write_bytes`` (the advertised maximum
    block size): its payload follows the header, and skipping that many bytes unread is not worth
    the risk.  Everything else about a request (command, flags, range) is answered with an errno
    by the server, which keeps the stream.
    """
    magic, flags, command, cookie, offset, length = REQUEST.unpack_from(header, at)
    if magic != REQUEST_MAGIC:
        raise ProtocolError(f"request magic {magic:#x} is not {REQUEST_MAGIC:#x}")
    if command == CMD_WRITE and length > max_write_bytes:
        raise ProtocolError(f"WRITE of {length} bytes exceeds the advertised maximum {max_write_bytes}")
    return Request(flags, command, cookie, offset, length)
