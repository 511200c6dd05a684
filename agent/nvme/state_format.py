"""The versioned, checksummed container for a migratable controller's state (pure, no I/O).

This is what Migration Receive / Get Controller State returns on the source and what Migration
Send / Set Controller State consumes on the destination.  Public implementations disagree on
some field widths, so this module owns one explicit layout, format version 1, little-endian:

Container header (48 bytes)::

    0   8  magic            b"NVMIGCS\\0"
    8   2  format version   u16, currently 1
    10  2  flags            u16, must be 0 (no flags are defined in version 1)
    12  4  payload length   u32, bytes that follow the header
    16 32  sha256(payload)

Payload::

    u16 length + UTF-8 controller id (0..255 bytes; empty when the device does not know it)
    u64 namespace bytes
    u32 CC, u32 CSTS, u32 AQA, u64 ASQ, u64 ACQ      (controller registers)
    u16 number of submission queues, u16 number of completion queues (admin queue included)
    submission queue entries, then completion queue entries, 24 bytes each

Queue entry (24 bytes), the field set DESIGN.md names for TP4159's NVMe controller state, in our
own order::

    0  8  base address      u64
    8  2  size              u16, number of entries (not zero-based, unlike the NVMe registers)
    10 2  queue id          u16 (0 = admin)
    12 2  head              u16
    14 2  tail              u16
    16 4  attributes        u32, opaque here; the controller model defines the bits
    20 4  reserved          written as zero, ignored on read

Per-kind details the specification's queue state structures keep in separate fields (such as a
submission queue's completion queue id, or a completion queue's interrupt vector and phase tag)
live in the attribute bits here, so one entry shape serves both queue kinds; the emulated
controller documents its bits (agent/emulated/model/controllers.py).

Which layout this is, against the public ones: libvfn's ``examples/migrate.c`` uses a 56-byte
container header with 16-byte NVMe and vendor state sizes, the vfio-nvme RFC (Aug 2025) a header
with u16 dword counts at 10h/12h, both followed by the NVMe-defined state (version, NIOSQ, NIOCQ,
then 24-byte queue entries).  Ours is neither: it is our own container, identified as format
version 1 in Identify CNS 20h (CSVI 0 selects it), with a checksum and the controller identity
the NVMe layouts lack.  The identity is the name the device knows the controller by: the emulated
backend names its one secondary controller after the controller it hosts, while a VF taken from
a pool (the nvme-passthru backend) is anonymous, as real hardware is, and reports an empty id.
A destination compares identities only when both sides have one.

The TP4159 commands move the container as a stream of dwords, so Get Controller State pads it
with zeros to a whole dword and Set Controller State finds its end from the header
(``container_length``) and accepts at most three zero bytes of padding after it.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass

from agent.controller_errors import StateFormatError

STATE_FORMAT_VERSION = 1
SUPPORTED_VERSIONS = (1,)
MAGIC = b"NVMIGCS\x00"

_HEADER = struct.Struct("<8sHHI32s")
_REGISTERS = struct.Struct("<IIIQQ")
_QUEUE = struct.Struct("<QHHHHI4x")
_COUNTS = struct.Struct("<HH")
_U16 = struct.Struct("<H")
_U64 = struct.Struct("<Q")

HEADER_BYTES = _HEADER.size
QUEUE_ENTRY_BYTES = _QUEUE.size
MAX_CONTROLLER_ID_BYTES = 255
# The largest payload the layout can hold (the longest id, 65535 queues of each kind): a header
# that claims more is corrupt, and a host reading the container in pieces must not ask for it.
MAX_PAYLOAD_BYTES = (_U16.size + MAX_CONTROLLER_ID_BYTES + _U64.size + _REGISTERS.size + _COUNTS.size
                     + 2 * 0xFFFF * QUEUE_ENTRY_BYTES)

assert QUEUE_ENTRY_BYTES == 24


def _check_uint(name: str, value: int, bits: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < (1 << bits):
        raise ValueError(f"{name}={value!r} does not fit an unsigned {bits}-bit field")


@dataclass(frozen=True)
class QueueState:
    """One submission or completion queue as the controller state carries it."""

    qid: int
    base_address: int
    size: int
    head: int
    tail: int
    attributes: int = 0

    def __post_init__(self) -> None:
        _check_uint("qid", self.qid, 16)
        _check_uint("base_address", self.base_address, 64)
        _check_uint("size", self.size, 16)
        _check_uint("head", self.head, 16)
        _check_uint("tail", self.tail, 16)
        _check_uint("attributes", self.attributes, 32)
        if self.size < 2:
            raise ValueError(f"queue {self.qid}: size={self.size} entries, NVMe queues have at least 2")
        if self.head >= self.size or self.tail >= self.size:
            raise ValueError(
                f"queue {self.qid}: head={self.head} tail={self.tail} must both be below size={self.size}"
            )


@dataclass(frozen=True)
class ControllerRegisters:
    """The controller registers that migrate with the state (NVMe BAR0 offsets 14h..37h)."""

    cc: int = 0
    csts: int = 0
    aqa: int = 0
    asq: int = 0
    acq: int = 0

    def __post_init__(self) -> None:
        _check_uint("cc", self.cc, 32)
        _check_uint("csts", self.csts, 32)
        _check_uint("aqa", self.aqa, 32)
        _check_uint("asq", self.asq, 64)
        _check_uint("acq", self.acq, 64)


@dataclass(frozen=True)
class ControllerState:
    """Everything Get Controller State returns: identity, registers and queues."""

    controller_id: str
    namespace_bytes: int
    registers: ControllerRegisters
    submission_queues: tuple[QueueState, ...] = ()
    completion_queues: tuple[QueueState, ...] = ()

    def __post_init__(self) -> None:
        encoded = self.controller_id.encode("utf-8")
        if len(encoded) > MAX_CONTROLLER_ID_BYTES:
            raise ValueError(
                f"controller_id={self.controller_id!r} must be 0..{MAX_CONTROLLER_ID_BYTES} UTF-8 bytes "
                "(empty: the device does not know which controller it is)"
            )
        _check_uint("namespace_bytes", self.namespace_bytes, 64)
        for kind, queues in (("submission", self.submission_queues), ("completion", self.completion_queues)):
            if len(queues) > 0xFFFF:
                raise ValueError(f"{len(queues)} {kind} queues do not fit the u16 count")
            ids = [q.qid for q in queues]
            if len(ids) != len(set(ids)):
                raise ValueError(f"duplicate {kind} queue ids in {ids}")


def encode_state(state: ControllerState) -> bytes:
    """Serialize ``state`` into a version-1 container."""
    ident = state.controller_id.encode("utf-8")
    regs = state.registers
    parts = [
        _U16.pack(len(ident)),
        ident,
        _U64.pack(state.namespace_bytes),
        _REGISTERS.pack(regs.cc, regs.csts, regs.aqa, regs.asq, regs.acq),
        _COUNTS.pack(len(state.submission_queues), len(state.completion_queues)),
    ]
    for q in (*state.submission_queues, *state.completion_queues):
        parts.append(_QUEUE.pack(q.base_address, q.size, q.qid, q.head, q.tail, q.attributes))
    payload = b"".join(parts)
    header = _HEADER.pack(MAGIC, STATE_FORMAT_VERSION, 0, len(payload), hashlib.sha256(payload).digest())
    return header + payload


class _Reader:
    """Sequential reader over the payload that reports where it ran short."""

    def __init__(self, data: bytes) -> None:
        self._data = data
        self.pos = 0

    def take(self, n: int, what: str) -> bytes:
        if self.pos + n > len(self._data):
            raise StateFormatError(
                f"controller state payload malformed: {what} needs {n} bytes at offset {self.pos}, "
                f"only {len(self._data) - self.pos} left"
            )
        chunk = self._data[self.pos : self.pos + n]
        self.pos += n
        return chunk


def container_length(blob: bytes) -> int:
    """Total bytes of the container that ``blob`` starts with, from its header (which is checked).

    Set Controller State delivers the container in dword pieces, so the receiver needs to know
    where the container ends and the padding begins.
    """
    if len(blob) < HEADER_BYTES:
        raise StateFormatError(
            f"controller state truncated: {len(blob)} bytes, the header alone is {HEADER_BYTES}"
        )
    magic, version, flags, length, _ = _HEADER.unpack_from(blob)
    if magic != MAGIC:
        raise StateFormatError(f"controller state has bad magic {magic!r}, expected {MAGIC!r}")
    if version not in SUPPORTED_VERSIONS:
        supported = ", ".join(str(v) for v in SUPPORTED_VERSIONS)
        raise StateFormatError(
            f"controller state format version {version} is unsupported (supported: {supported}); "
            "upgrade this agent or migrate to a host that supports it"
        )
    if flags != 0:
        raise StateFormatError(f"controller state has unknown flags {flags:#06x}; version 1 defines none")
    if length > MAX_PAYLOAD_BYTES:
        raise StateFormatError(f"controller state header claims a payload length of {length} bytes; version 1 "
                               f"holds at most {MAX_PAYLOAD_BYTES}: the header is corrupt")
    return int(HEADER_BYTES + length)


def decode_state(blob: bytes) -> ControllerState:
    """Parse and verify a container; raises StateFormatError saying what is wrong."""
    length = container_length(blob) - HEADER_BYTES
    checksum = _HEADER.unpack_from(blob)[4]
    payload = blob[HEADER_BYTES:]
    if len(payload) < length:
        raise StateFormatError(
            f"controller state truncated: header says {length} payload bytes, got {len(payload)}"
        )
    if len(payload) > length:
        raise StateFormatError(
            f"controller state has {len(payload) - length} trailing bytes after the {length}-byte payload"
        )
    if hashlib.sha256(payload).digest() != checksum:
        raise StateFormatError("controller state checksum mismatch: the payload was corrupted in transit")
    return _decode_payload(payload)


def _decode_payload(payload: bytes) -> ControllerState:
    r = _Reader(payload)
    (id_len,) = _U16.unpack(r.take(_U16.size, "controller id length"))
    try:
        controller_id = r.take(id_len, "controller id").decode("utf-8")
    except UnicodeDecodeError as exc:
        raise StateFormatError(
            f"controller state payload malformed: controller id is not UTF-8 ({exc})"
        ) from exc
    (namespace_bytes,) = _U64.unpack(r.take(_U64.size, "namespace size"))
    cc, csts, aqa, asq, acq = _REGISTERS.unpack(r.take(_REGISTERS.size, "registers"))
    n_sq, n_cq = _COUNTS.unpack(r.take(_COUNTS.size, "queue counts"))
    queues: list[QueueState] = []
    try:
        for i in range(n_sq + n_cq):
            base, size, qid, head, tail, attributes = _QUEUE.unpack(r.take(_QUEUE.size, f"queue entry {i}"))
            queues.append(QueueState(qid, base, size, head, tail, attributes))
        if r.pos != len(payload):
            raise StateFormatError(
                f"controller state payload malformed: {len(payload) - r.pos} bytes left after "
                f"{n_sq + n_cq} queue entries"
            )
        return ControllerState(
            controller_id=controller_id,
            namespace_bytes=namespace_bytes,
            registers=ControllerRegisters(cc, csts, aqa, asq, acq),
            submission_queues=tuple(queues[:n_sq]),
            completion_queues=tuple(queues[n_sq:]),
        )
    except ValueError as exc:
        raise StateFormatError(f"controller state payload malformed: {exc}") from exc
