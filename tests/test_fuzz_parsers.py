"""Property-based fuzzing of every parser that takes bytes or requests from outside.

Hostile or broken input must get a clear refusal: the parser's own documented error with a
message, never another exception, never a hang, never an allocation a length field asked for.
One section per parser:

1. NVMe submission queue entries into the emulated controller (any 64 bytes, on any queue):
   always a 16-byte completion with an NVMe status, data no larger than MDTS.
2. The controller-state container (``agent.nvme.state_format``) and what a device writes into a
   Controller Data Queue (``agent.nvme.cdq`` and the host's reading of it): StateFormatError /
   ValueError / DeviceCommandError; a header claiming gigabytes is refused before it is read.
3. The data-plane frame reader (``read_frame`` on a StreamReader fed bytes then EOF) and the
   HELLO / FINAL / ACK payloads: a Frame, None at a clean EOF, or FrameError, within a deadline.
4. NBD: option data (``parse_go``), request headers (``parse_request``), the request checks,
   and a real NbdServer fed arbitrary bytes after its greeting.
5. API requests: ``policy_from_request`` with any int64 values, the name checks with any string
   (huge, non-ASCII), the policy bounds, and orchctl's size and bandwidth arguments.

The inputs start from valid encodings made by the project's own encoders, then truncated,
overwritten or re-sealed (a checksum recomputed), so the fuzzers get past the first checks.
Examples that once found a bug stay as ``@example``.

Budget: every test runs a fixed, derandomized set of examples (a few hundred each), so CI is
reproducible and the file takes well under a minute. ``FUZZ_EXAMPLES=N`` raises every test to
at least N examples, drawn at random so that each long run explores new input, e.g.
``FUZZ_EXAMPLES=20000 pytest tests/test_fuzz_parsers.py``; hypothesis prints a failing example
as a ``@reproduce_failure`` line to paste.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import string
import struct
from array import array
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import count
from pathlib import Path
from typing import Any

import grpc
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from agent.controller_errors import DeviceCommandError, StateFormatError
from agent.dataplane.framing import (
    HEADER_SIZE,
    MAGIC,
    Frame,
    FrameError,
    FrameType,
    encode_frame,
    read_frame,
)
from agent.dataplane.receiver import DataReceiver, decode_final_payload, encode_final_payload, parse_hello
from agent.dataplane.sender import DataPlaneError, DataSender
from agent.emulated.controller import EmulatedController, power_on_guest_driver
from agent.emulated.model.hostmem import PAGE_BYTES
from agent.emulated.model.namespace import NamespaceStore
from agent.emulated.model.structures import MAX_TRANSFER_BYTES
from agent.emulated.model.subsystem import PRIMARY_CNTLID, NvmeSubsystemModel
from agent.emulated.model_transport import ModelAdminTransport
from agent.guest.lineage import Lineage, Segment
from agent.guest.map_sync import MapAssembly, MapSyncError, base_pieces, delta_piece
from agent.guest.workload import GuestState, GuestStateError, WorkloadSpec
from agent.nbd import protocol as nbd
from agent.nbd.server import MAX_REQUEST_BYTES, NbdServer, _refusal
from agent.nvme import cdq
from agent.nvme import commands as c
from agent.nvme import state_format as sf
from agent.nvme.commands import Cqe, Sqe
from agent.nvme.migration_driver import AdminResult, CdqChangedLbaLog, MigrationDriver
from agent.nvme.spec import (
    CDQ_ENTRY_BYTES,
    CQE_BYTES,
    SQE_BYTES,
    IoOpcode,
    LoggingAction,
    MigrationSendSelect,
    SequenceIndicator,
    Status,
    SuspendType,
)
from cluster import names
from cluster.policy_limits import BOUNDS, policy_value_problem
from orchctl.cli import parse_bandwidth, parse_size
from orchestrator.api import Refused, policy_from_request
from orchestrator.jobs import Policy
from proto.v1 import migration_pb2

_FUZZ_EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "0"))


def budget(ci_examples: int) -> settings:
    """Hypothesis settings for one fuzzer: ``ci_examples`` derandomized, or FUZZ_EXAMPLES at random."""
    return settings(
        max_examples=max(ci_examples, _FUZZ_EXAMPLES),
        derandomize=not _FUZZ_EXAMPLES,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example,
                               HealthCheck.function_scoped_fixture],
    )


def small_or_any(bits: int) -> st.SearchStrategy[int]:
    """An unsigned field: small values, the edges, or anything."""
    top = (1 << bits) - 1
    return st.one_of(st.integers(0, 8), st.sampled_from([top, top - 1, 1 << (bits - 1)]), st.integers(0, top))


U8, U16, U32, U64 = small_or_any(8), small_or_any(16), small_or_any(32), small_or_any(64)


@st.composite
def mutated(draw: st.DrawFn, valid: st.SearchStrategy[bytes], *, most: int = 3) -> bytes:
    """A valid encoding, then up to ``most`` of: a byte overwritten, a dword set to an edge value,
    cut short, extended with junk."""
    blob = bytearray(draw(valid))
    for _ in range(draw(st.integers(0, most))):
        kind = draw(st.sampled_from(["byte", "dword", "cut", "extend"]))
        if kind == "extend" or not blob:
            blob += draw(st.binary(min_size=1, max_size=16))
        elif kind == "cut":
            del blob[draw(st.integers(0, len(blob) - 1)):]
        elif kind == "byte":
            blob[draw(st.integers(0, len(blob) - 1))] = draw(st.integers(0, 255))
        else:
            at = draw(st.integers(0, len(blob) - 1))
            blob[at:at + 4] = draw(st.sampled_from([0, 1, 0x7FFF_FFFF, 0x8000_0000, 0xFFFF_FFFF])).to_bytes(4, "little")
    return bytes(blob)


# ---- 1. NVMe submission queue entries into the emulated controller ----------------------------

NS_BYTES = 1 << 20
CDQ_QUEUE_ENTRIES = 64
HOST_MEMORY_FIRST = 0x1_0000_0000  # HostMemory's first allocation: where the seeds put a CDQ
FIT_DATA_MAX = 64 << 10  # data sized to what a command describes, when that is at most this
_example_ids = count()


@dataclass
class NvmeRig:
    """A subsystem as a guest leaves it after power-on: namespace 1 on the primary and on VF
    ``vf``, four I/O queue pairs on the VF, one on the primary, and host memory for a CDQ."""

    model: NvmeSubsystemModel
    store: NamespaceStore
    vf: int

    def queues(self, cntlid: int) -> set[int]:
        return {q.qid for q in self.model.controller_state(cntlid).submission_queues}


def nvme_rig(directory: Path) -> NvmeRig:
    model = NvmeSubsystemModel("SN-FUZZ")
    store = NamespaceStore(directory / f"ns-{next(_example_ids)}.img", NS_BYTES, create=True, lock=model.lock,
                           label="fuzz")
    vf = model.add_secondary("fuzz")
    model.attach_namespace(1, store, (PRIMARY_CNTLID, vf))
    power_on_guest_driver(model, vf)
    host = ModelAdminTransport(model)
    host.submit(c.create_io_cq(1, 64, 0x300_0000), "Create I/O CQ")
    host.submit(c.create_io_sq(1, 64, 0x400_0000, 1), "Create I/O SQ")
    assert model.host_memory.allocate(CDQ_QUEUE_ENTRIES * CDQ_ENTRY_BYTES) == HOST_MEMORY_FIRST
    return NvmeRig(model, store, vf)


def mostly(usual: st.SearchStrategy[int], other: st.SearchStrategy[int]) -> st.SearchStrategy[int]:
    """``usual`` three times in four, else ``other``: fields lean to what the rig has (the VF is
    cntlid 1, the namespace nsid 1), so that commands get past their first checks."""
    return st.integers(0, 3).flatmap(lambda k: other if k == 0 else usual)


def dwords(values: st.SearchStrategy[int]) -> st.SearchStrategy[int]:
    return values.map(lambda n: n * 4)


CNTLIDS = mostly(st.just(1), st.one_of(st.sampled_from([0, 2]), U16))
NSIDS = mostly(st.just(1), st.one_of(st.sampled_from([0, 2, 0xFFFF_FFFF]), U32))
ZERO_OR_ANY = mostly(st.just(0), U32)
OFFSETS = mostly(dwords(st.integers(0, 64)), U64.map(lambda n: n & ~3))
LENGTHS = mostly(dwords(st.integers(1, 1024)), dwords(st.integers(1, 1 << 20)))
QUEUE_IDS = mostly(st.integers(1, 5), U16)
QUEUE_ENTRIES = mostly(st.integers(2, 64), st.integers(2, 0x1_0000))
QUEUE_BASES = mostly(st.integers(0x500, 0x600).map(lambda n: n * PAGE_BYTES), U64)
FIDS = mostly(st.sampled_from([1, 4, 6, 7, 8, 0x21]), U8)
SLBAS = mostly(st.integers(0, NS_BYTES // 4096), U64)
BLOCKS = mostly(st.integers(1, 8), st.integers(1, c.MAX_BLOCKS_PER_COMMAND))

# Every command the encoder builds, with fields drawn from their whole range and the edges.
ADMIN_SQES: st.SearchStrategy[Sqe] = st.one_of(
    st.builds(lambda cns, nsid: c.identify(cns, nsid=nsid), mostly(st.sampled_from([0, 1, 2, 0x20]), U8), NSIDS),
    st.builds(lambda lid, n, off: c.get_log_page(lid, n, offset=off), mostly(st.sampled_from([1, 2, 0xC0]), U8),
              LENGTHS, OFFSETS),
    st.builds(lambda fid, v, w, x: c.set_features(fid, v, cdw12=w, cdw13=x), FIDS, mostly(st.integers(0, 3), U32),
              ZERO_OR_ANY, ZERO_OR_ANY),
    st.builds(lambda fid, sel, v: c.get_features(fid, sel=sel, cdw11=v), FIDS, st.integers(0, 7), ZERO_OR_ANY),
    st.builds(lambda q, n, b, v: c.create_io_cq(q, n, b, vector=v), QUEUE_IDS, QUEUE_ENTRIES, QUEUE_BASES,
              mostly(st.integers(0, 8), U16)),
    st.builds(c.create_io_sq, QUEUE_IDS, QUEUE_ENTRIES, QUEUE_BASES, QUEUE_IDS),
    st.builds(c.delete_io_sq, QUEUE_IDS),
    st.builds(c.delete_io_cq, QUEUE_IDS),
    st.builds(c.track_send, st.integers(0, 2), st.sampled_from(LoggingAction)),
    st.builds(lambda cntlid, kind, dudmq: c.migration_suspend(cntlid, suspend_type=kind, delete_udmq=dudmq),
              CNTLIDS, st.sampled_from(SuspendType), st.booleans()),
    st.builds(c.migration_resume, CNTLIDS),
    st.builds(c.set_controller_state, CNTLIDS, OFFSETS, LENGTHS, st.sampled_from(SequenceIndicator)),
    st.builds(c.get_controller_state, CNTLIDS, OFFSETS, LENGTHS),
    st.builds(c.cdq_create, CNTLIDS, mostly(st.integers(2, CDQ_QUEUE_ENTRIES).map(lambda n: n * 8), U32),
              mostly(st.just(HOST_MEMORY_FIRST), QUEUE_BASES)),
    st.builds(c.cdq_delete, st.integers(0, 2)),
    st.builds(lambda q, head, trigger: c.set_cdq_head(q, head, tail_trigger=trigger), st.integers(0, 2),
              mostly(st.integers(0, CDQ_QUEUE_ENTRIES), U32), st.one_of(st.none(), mostly(st.integers(0, 70), U32))),
    st.builds(c.get_cdq_pointers, st.integers(0, 2)),
)
IO_SQES: st.SearchStrategy[Sqe] = st.one_of(
    st.builds(c.read, NSIDS, SLBAS, BLOCKS),
    st.builds(c.write, NSIDS, SLBAS, BLOCKS),
    st.builds(lambda nsid, slba, n, dealloc: c.write_zeroes(nsid, slba, n, deallocate=dealloc),
              NSIDS, SLBAS, BLOCKS, st.booleans()),
    st.builds(c.flush, NSIDS),
    st.builds(c.dataset_management, NSIDS, mostly(st.integers(1, 4), st.integers(1, 256))),
)
ADMIN_QUEUES = st.sampled_from([("vf", 0), ("primary", 0)])
IO_QUEUES = st.sampled_from([("vf", 1), ("vf", 4), ("primary", 1)])
# (controller, submission queue) and the entry: an admin command on an admin queue, an I/O command
# on an I/O queue, either one damaged, or 64 bytes of anything on any queue.
COMMANDS = st.one_of(
    st.tuples(ADMIN_QUEUES, ADMIN_SQES.map(Sqe.encode)),
    st.tuples(IO_QUEUES, IO_SQES.map(Sqe.encode)),
    st.tuples(ADMIN_QUEUES, mutated(ADMIN_SQES.map(Sqe.encode))),
    st.tuples(IO_QUEUES, mutated(IO_SQES.map(Sqe.encode))),
    st.tuples(st.one_of(ADMIN_QUEUES, IO_QUEUES), st.binary(min_size=SQE_BYTES, max_size=SQE_BYTES)),
).map(lambda queue_raw: (queue_raw[0], queue_raw[1][:SQE_BYTES].ljust(SQE_BYTES, b"\0")))
# The host's data buffer: none, a few bytes, what the command describes, or (rarely) the VF's own
# controller state in a Set Controller State of its own.
DATA_KINDS = st.sampled_from(["fit", "fit", "fit", "none", "bytes", "state"])


def described_bytes(sqe: Sqe) -> int:
    """How much data the command says the host hands it (0 if none or not known)."""
    if sqe.opcode == IoOpcode.WRITE:
        return ((sqe.cdw12 & 0xFFFF) + 1) * 4096
    if sqe.opcode == IoOpcode.DATASET_MANAGEMENT:
        return ((sqe.cdw10 & 0xFF) + 1) * 16
    if sqe.opcode == c.AdminOpcode.MIGRATION_SEND and sqe.cdw10 & 0xFF == MigrationSendSelect.SET_CONTROLLER_STATE:
        return sqe.cdw15 * 4
    return 0


def run_command(rig: NvmeRig, cntlid: int, sqid: int, raw: bytes, data: bytes | None) -> None:
    """One command: a completion with a status, never an exception; failures explained."""
    sqe = Sqe.decode(raw)
    if sqid not in rig.queues(cntlid):
        # The queue is gone (deleted, or a loaded state lacks it): the caller's mistake, a ValueError.
        with pytest.raises(ValueError, match="has no submission queue"):
            rig.model.submit_io(cntlid, sqid, raw, data) if sqid else rig.model.submit_admin(cntlid, raw, data)
        return
    cqe_raw, out = rig.model.submit_io(cntlid, sqid, raw, data) if sqid else rig.model.submit_admin(cntlid, raw, data)
    assert len(cqe_raw) == CQE_BYTES
    cqe = Cqe.decode(cqe_raw)
    assert (cqe.cid, cqe.sqid) == (sqe.cid, sqid)
    assert len(out) <= MAX_TRANSFER_BYTES
    if cqe.ok:
        return
    assert out == b""
    if not cqe.more:
        # Only a suspended controller answers without an error entry: "not now, retry later".
        assert cqe.status == Status.NAMESPACE_NOT_READY and rig.model.suspended(cntlid)
        return
    if not rig.model.suspended(cntlid) and 0 in rig.queues(cntlid):
        explanation = ModelAdminTransport(rig.model, cntlid).explain(cqe.status)
        assert explanation, f"{cqe.status_name} without an explanation for {sqe}"


@budget(300)
@given(st.lists(st.tuples(COMMANDS, DATA_KINDS, st.binary(max_size=64)), min_size=1, max_size=8),
       st.lists(st.tuples(st.integers(0, 1 << 20), st.integers(0, 255)), max_size=3))
def test_any_submission_queue_entry_gets_a_completion(tmp_path: Path,
                                                      commands: list[tuple[tuple[tuple[str, int], bytes], str, bytes]],
                                                      state_damage: list[tuple[int, int]]) -> None:
    rig = nvme_rig(tmp_path)
    try:
        for ((who, sqid), raw), data_kind, junk in commands:
            cntlid = rig.vf if who == "vf" else PRIMARY_CNTLID
            data: bytes | None
            if data_kind == "state":
                # Set Controller State, entire, of the VF's own state with a few bytes damaged: the
                # container gets past the command's field checks to the state checks.
                blob = bytearray(sf.encode_state(rig.model.controller_state(rig.vf)))
                blob += bytes(-len(blob) % 4)
                for at, value in state_damage:
                    blob[at % len(blob)] = value
                raw, data = c.set_controller_state(rig.vf, 0, len(blob), SequenceIndicator.ENTIRE).encode(), bytes(blob)
                cntlid, sqid = PRIMARY_CNTLID, 0
            elif data_kind == "fit":
                need = described_bytes(Sqe.decode(raw))
                data = (junk * (need // len(junk) + 1))[:need] if junk and 0 < need <= FIT_DATA_MAX else None
            else:
                data = junk if data_kind == "bytes" else None
            run_command(rig, cntlid, sqid, raw, data)
        # Whatever the guest and the fuzzer did, the migration controller still answers.
        cqe_raw, page = rig.model.submit_admin(PRIMARY_CNTLID, c.identify_controller(cid=7).encode())
        assert Cqe.decode(cqe_raw).ok and len(page) == 4096
    finally:
        rig.store.release()


@budget(500)
@given(st.binary(min_size=SQE_BYTES, max_size=SQE_BYTES), st.binary(min_size=CQE_BYTES, max_size=CQE_BYTES))
def test_any_64_bytes_decode_as_an_sqe_and_any_16_as_a_cqe(sqe_raw: bytes, cqe_raw: bytes) -> None:
    assert Sqe.decode(sqe_raw).encode() == sqe_raw
    cqe = Cqe.decode(cqe_raw)
    assert cqe.encode() == cqe_raw
    assert cqe.status_name  # a name, or "SCT 0x. / SC 0x.." for one we do not know


# ---- 2. the controller-state container and the Controller Data Queue ---------------------------

_STATE_HEADER = struct.Struct("<8sHHI32s")  # the container header, as state_format documents it

queue_states = st.builds(
    lambda qid, size, head, tail, base, attributes: sf.QueueState(qid, base, size, head % size, tail % size,
                                                                  attributes),
    U16, st.integers(2, 0xFFFF), U16, U16, U64, U32)
controller_states = st.builds(
    sf.ControllerState,
    controller_id=st.text(max_size=40).filter(lambda s: len(s.encode()) <= sf.MAX_CONTROLLER_ID_BYTES),
    namespace_bytes=U64,
    registers=st.builds(sf.ControllerRegisters, U32, U32, U32, U64, U64),
    submission_queues=st.lists(queue_states, max_size=4, unique_by=lambda q: q.qid).map(tuple),
    completion_queues=st.lists(queue_states, max_size=4, unique_by=lambda q: q.qid).map(tuple),
)
valid_containers = controller_states.map(sf.encode_state)


def sealed(payload: bytes, *, version: int = sf.STATE_FORMAT_VERSION, flags: int = 0) -> bytes:
    """A container around ``payload`` with its length and checksum right: the decoder reads it all."""
    return _STATE_HEADER.pack(sf.MAGIC, version, flags, len(payload), hashlib.sha256(payload).digest()) + payload


@st.composite
def resealed(draw: st.DrawFn) -> bytes:
    """A valid payload mutated (lengths, counts, the id, queue fields) and sealed again."""
    payload = bytearray(draw(valid_containers)[sf.HEADER_BYTES:])
    choice = draw(st.sampled_from(["id length", "queue counts", "id bytes", "anything"]))
    if choice == "id length":
        payload[0:2] = draw(U16).to_bytes(2, "little")
    elif choice == "queue counts":
        id_len = int.from_bytes(payload[0:2], "little")
        at = 2 + id_len + 8 + 28
        payload[at:at + 4] = struct.pack("<HH", draw(U16), draw(U16))
    elif choice == "id bytes":
        id_len = int.from_bytes(payload[0:2], "little")
        extra = draw(st.binary(min_size=1, max_size=8))
        payload[2 + id_len:2 + id_len] = extra
        payload[0:2] = (id_len + len(extra)).to_bytes(2, "little")
    payload = bytearray(draw(mutated(st.just(bytes(payload)), most=2)))
    return sealed(bytes(payload))


@st.composite
def header_damaged(draw: st.DrawFn) -> bytes:
    """A valid container whose version, flags or length field says something else."""
    blob = bytearray(draw(valid_containers))
    field = draw(st.sampled_from(["version", "flags", "length"]))
    if field == "version":
        blob[8:10] = draw(U16).to_bytes(2, "little")
    elif field == "flags":
        blob[10:12] = draw(U16).to_bytes(2, "little")
    else:
        blob[12:16] = draw(U32).to_bytes(4, "little")
    return bytes(blob)


STATE_BLOBS = st.one_of(
    st.binary(max_size=200),
    st.binary(max_size=120).map(lambda b: sf.MAGIC + b),
    valid_containers,
    mutated(valid_containers),
    resealed(),
    header_damaged(),
)


@budget(300)
@given(STATE_BLOBS)
@example(sealed(b"\xff\xff"))  # an id length running past the payload
@example(sealed(b"\x01\x00\xff" + bytes(8 + 28 + 4)))  # an id that is not UTF-8
@example(sealed(b"\x00\x00" + bytes(8 + 28) + b"\xff\xff\xff\xff"))  # 131070 queues, none there
def test_any_bytes_as_a_controller_state(blob: bytes) -> None:
    try:
        state = sf.decode_state(blob)
    except StateFormatError as exc:
        assert str(exc).startswith("controller state")
        return
    # What decodes is a state the encoder would write (reserved bytes aside).
    assert sf.decode_state(sf.encode_state(state)) == state


@budget(200)
@given(st.one_of(header_damaged(), STATE_BLOBS))
@example(_STATE_HEADER.pack(sf.MAGIC, 1, 0, 0xFFFF_FFFF, bytes(32)))
def test_the_container_length_is_bounded_by_the_layout(blob: bytes) -> None:
    """Set and Get Controller State learn the length from the header: it is checked, not trusted."""
    try:
        length = sf.container_length(blob)
    except StateFormatError as exc:
        assert "controller state" in str(exc)
        return
    assert sf.HEADER_BYTES <= length <= sf.HEADER_BYTES + sf.MAX_PAYLOAD_BYTES


class LyingDevice:
    """A fake device (a real one cannot be made to lie here): Get Controller State answers with
    ``header`` at offset 0 and zeros after it, and counts what the host asked for."""

    name = "a lying device"

    def __init__(self, header: bytes) -> None:
        self.header = header
        self.asked_bytes = 0

    def submit(self, sqe: Sqe, what: str, *, data: bytes | None = None, read_bytes: int = 0,
               queue: object = None) -> AdminResult:
        offset = sqe.cdw12 | sqe.cdw13 << 32
        self.asked_bytes += read_bytes
        assert self.asked_bytes <= sf.HEADER_BYTES + sf.MAX_PAYLOAD_BYTES + 64, "the host asked for more than fits"
        piece = (self.header if offset == 0 else b"")[:read_bytes].ljust(read_bytes, b"\0")
        return AdminResult(1, 0, piece)  # CSUP=1: suspended

    def allocate_queue(self, preferred_bytes: int) -> object:
        raise NotImplementedError

    def close(self) -> None:
        pass


@budget(200)
@given(U32)
@example(0xFFFF_FFFF)
def test_a_device_claiming_a_huge_state_is_refused_before_it_is_read(length: int) -> None:
    device = LyingDevice(_STATE_HEADER.pack(sf.MAGIC, 1, 0, length, bytes(32)))
    driver = MigrationDriver(device, 1, state_piece_bytes=1 << 20)  # type: ignore[arg-type]
    try:
        blob = driver.get_state()
    except StateFormatError as exc:
        assert length > sf.MAX_PAYLOAD_BYTES and f"payload length of {length} bytes" in str(exc)
        return
    assert len(blob) == sf.HEADER_BYTES + length


@budget(300)
@given(st.one_of(st.binary(min_size=CDQ_ENTRY_BYTES, max_size=CDQ_ENTRY_BYTES),
                 mutated(st.builds(cdq.UdmqEntry, U32, U64, U32, st.integers(0, 1), st.sampled_from(cdq.EntrySequence),
                                   st.sampled_from(cdq.LbaChange), st.booleans()).map(cdq.UdmqEntry.encode))
                 .map(lambda b: b[:CDQ_ENTRY_BYTES].ljust(CDQ_ENTRY_BYTES, b"\0"))),
       st.binary(max_size=16))
def test_any_cdq_entry_and_pointer_data(raw: bytes, pointers: bytes) -> None:
    try:
        entry = cdq.UdmqEntry.decode(raw)
    except ValueError as exc:
        assert "reserved" in str(exc)
    else:
        assert entry.encode() == raw
    try:
        head, trigger = cdq.decode_pointers(pointers)
    except ValueError as exc:
        assert "8 bytes" in str(exc)
    else:
        assert cdq.encode_pointers(head, trigger) == pointers[:8]


@budget(300)
@given(st.integers(2, 16).flatmap(lambda n: st.binary(min_size=n * CDQ_ENTRY_BYTES, max_size=n * CDQ_ENTRY_BYTES)))
def test_the_host_reads_a_queue_of_garbage_in_one_pass(memory: bytes) -> None:
    entries = len(memory) // CDQ_ENTRY_BYTES
    reader = cdq.CdqReader(memoryview(bytearray(memory)), entries)
    assert len(list(reader.take())) <= entries
    assert list(reader.take()) == []  # nothing new was posted since


@budget(300)
@given(U64, U32, st.one_of(st.integers(1, 1 << 20), U64.filter(bool)))
@example(0, 0xFFFF_FFFF, 256)  # four billion blocks claimed on a 1 MiB namespace
@example((1 << 64) - 1, 0, 256)
def test_an_entry_range_is_checked_before_it_is_expanded(slba: int, nlb: int, namespace_blocks: int) -> None:
    try:
        lbas = cdq.entry_lbas(slba, nlb, namespace_blocks)
    except ValueError as exc:
        assert f"slba={slba} nlb={nlb}" in str(exc)
        return
    assert len(lbas) == nlb + 1 and 0 <= lbas[0] and lbas[-1] < namespace_blocks


@budget(200)
@given(st.lists(st.tuples(U32.map(lambda n: n if n > 3 else 1), st.one_of(st.integers(0, 300), U64), U32,
                          st.integers(0, 255)), min_size=1, max_size=4))
@example(posted=[(1, 2**63, 0xFFFF_FFFF, 0x01)])  # nsid 1, far outside, four billion blocks, phase 1
def test_a_device_writing_garbage_into_the_change_log(tmp_path: Path, posted: list[tuple[int, int, int, int]]) -> None:
    """The host's changed-LBA log against the real model, while the 'device' scribbles entries into
    the queue's host memory: the LBAs it takes lie in the namespace, or it refuses the device."""
    rig = nvme_rig(tmp_path)
    try:
        log = CdqChangedLbaLog(ModelAdminTransport(rig.model), rig.vf, 1, namespace_blocks=NS_BYTES // 4096,
                               queue_entries=8)
        log.start()
        (queue,) = rig.model.migration.queues.values()
        memory = rig.model.host_memory.view(queue.address, queue.log.ring.entries * CDQ_ENTRY_BYTES)
        for slot, (nsid, slba, nlb, attributes) in enumerate(posted):
            struct.pack_into("<IIQ15xB", memory, slot * CDQ_ENTRY_BYTES, nsid, nlb, slba, attributes)
        try:
            lbas = log.take()
        except DeviceCommandError as exc:
            assert "slba=" in str(exc) or "head pointer" in str(exc) or "failed with status" in str(exc)
        else:
            assert all(0 <= lba < NS_BYTES // 4096 for lba in lbas)
    finally:
        rig.store.release()


# ---- 3. the data-plane frame reader and its payloads ------------------------------------------

FRAME_MAX_PAYLOAD = 4096  # small, so that the fuzzer reaches the limit often
DEADLINE_S = 5.0  # a reader that has not finished by then is hanging

frames = st.builds(Frame, st.sampled_from(FrameType), U64, U64, st.binary(max_size=FRAME_MAX_PAYLOAD // 16))
frame_streams = st.lists(frames, min_size=1, max_size=4).map(lambda fs: b"".join(encode_frame(f) for f in fs))


@st.composite
def length_lies(draw: st.DrawFn) -> bytes:
    """Valid frames whose first header's length field says something else."""
    stream = bytearray(draw(frame_streams))
    stream[8:12] = draw(U32).to_bytes(4, "big")
    return bytes(stream)


async def read_all(stream: bytes, max_payload: int) -> tuple[list[Frame], BaseException | None]:
    """Every frame in ``stream`` (then EOF), and the FrameError that ended it, if one did."""
    reader = asyncio.StreamReader()
    reader.feed_data(stream)
    reader.feed_eof()
    got: list[Frame] = []
    while True:
        try:
            frame = await read_frame(reader, max_payload=max_payload)
        except FrameError as exc:
            return got, exc
        if frame is None:
            return got, None
        got.append(frame)


@budget(300)
@given(st.one_of(st.binary(max_size=200), frame_streams, mutated(frame_streams), length_lies()))
@example(MAGIC + bytes(28))  # version 0
@example(encode_frame(Frame(FrameType.EXTENT, payload=b"x"))[:HEADER_SIZE])  # ends before its payload
@example(encode_frame(Frame(FrameType.ACK, payload=b"{}"))[:-1] + b"]")  # a payload byte changed
def test_any_byte_stream_gives_frames_then_eof_or_a_frame_error(stream: bytes) -> None:
    got, error = asyncio.run(asyncio.wait_for(read_all(stream, FRAME_MAX_PAYLOAD), DEADLINE_S))
    assert len(got) <= len(stream) // HEADER_SIZE
    assert all(len(f.payload) <= FRAME_MAX_PAYLOAD for f in got)
    if error is None:
        assert b"".join(encode_frame(f) for f in got) == stream  # a clean EOF: every byte was a frame
    else:
        assert str(error)


@budget(200)
@given(frames, st.integers(FRAME_MAX_PAYLOAD + 1, 0xFFFF_FFFF))
def test_a_payload_above_the_limit_is_refused_before_it_is_read(frame: Frame, length: int) -> None:
    """The header alone, and no EOF: a reader that waited for the payload would hang."""
    header = bytearray(encode_frame(frame)[:HEADER_SIZE])
    header[8:12] = length.to_bytes(4, "big")

    async def read_header_only() -> None:
        reader = asyncio.StreamReader()
        reader.feed_data(bytes(header))
        with pytest.raises(FrameError, match=f"declares a {length}-byte payload, above the {FRAME_MAX_PAYLOAD}"):
            await read_frame(reader, max_payload=FRAME_MAX_PAYLOAD)

    asyncio.run(asyncio.wait_for(read_header_only(), DEADLINE_S))


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=8),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                                                       max_size=3), max_leaves=8)
hellos = st.builds(lambda job, token, extra: json.dumps({"job_id": job, "token": token, **extra}).encode(),
                   st.one_of(st.text(max_size=20), json_values), st.one_of(st.text(max_size=20), json_values),
                   st.dictionaries(st.text(max_size=6), json_values, max_size=2))


@budget(300)
@given(st.one_of(st.binary(max_size=100), hellos, mutated(hellos), json_values.map(lambda v: json.dumps(v).encode()),
                 st.integers(1, 200_000).map(lambda n: b"[" * n)))
@example(b"[" * 60_000)  # RecursionError escaped the HELLO check: a traceback per connection
@example(b'{"job_id": "mig-000000000001", "token": "\\ud800"}')  # a lone surrogate: token.encode() raised
@example(b'"job_id"')  # a JSON string, not an object
def test_any_hello_payload_is_a_job_and_token_or_refused(payload: bytes) -> None:
    try:
        job_id, token = parse_hello(payload)
    except ValueError as exc:
        assert str(exc)
        return
    job_id.encode()
    token.encode()


@budget(300)
@given(st.one_of(st.binary(max_size=64), st.builds(encode_final_payload, st.binary(max_size=32),
                                                   st.binary(max_size=32)).flatmap(lambda b: mutated(st.just(b)))))
def test_any_final_payload_splits_or_is_refused(payload: bytes) -> None:
    try:
        state, guest = decode_final_payload(payload)
    except ValueError as exc:
        assert "FINAL payload" in str(exc)
        return
    assert encode_final_payload(state, guest) == payload


_MAP = array("Q", [1, 7, 0, 3, 9, 1])
_MAP_STATE = GuestState(WorkloadSpec(write_iops=10, seed=2), len(_MAP), 12, _MAP, 1.0, 0.5, 11, 0, 1,
                        Lineage((Segment(5, 0),)))
map_pieces = st.one_of(st.sampled_from(list(base_pieces(7, _MAP, 4))),
                       st.builds(lambda lbas: delta_piece(7, len(_MAP), lbas, [v + 1 for v in lbas]),
                                 st.lists(st.integers(0, len(_MAP) - 1), max_size=4)))


@budget(300)
@given(st.lists(st.one_of(st.binary(max_size=48), mutated(map_pieces)), max_size=4))
def test_any_guest_map_pieces_assemble_or_are_refused(pieces: list[bytes]) -> None:
    assembly = MapAssembly()
    for piece in [*base_pieces(7, _MAP, 4), *pieces]:
        try:
            assembly.apply(piece)
        except MapSyncError as exc:
            assert str(exc)
    assert len(assembly.acked) <= assembly.block_count


@budget(300)
@given(mutated(st.sampled_from([_MAP_STATE.encode(), _MAP_STATE.encode_raw(),
                                _MAP_STATE.encode_synced(7, [1, 4], [3, 3])])))
def test_any_guest_state_decodes_or_is_refused(blob: bytes) -> None:
    assembly = MapAssembly()
    for piece in base_pieces(7, _MAP):
        assembly.apply(piece)
    try:
        state = GuestState.decode(blob, assembly)
    except GuestStateError as exc:
        assert str(exc)
        return
    assert len(state.acked) == state.block_count


class NeverCalledSink:
    """A session's sink for sessions that must never get past HELLO."""

    async def apply_extent(self, offset: int, data: bytes) -> None:
        raise AssertionError("an unauthenticated peer reached the sink")

    async def apply_round_end(self, round: int) -> None:
        raise AssertionError("an unauthenticated peer reached the sink")

    async def apply_guest_map(self, piece: bytes) -> None:
        raise AssertionError("an unauthenticated peer reached the sink")

    async def apply_plan(self, plan: bytes) -> None:
        raise AssertionError("an unauthenticated peer reached the sink")

    async def apply_final(self, state_blob: bytes, guest_blob: bytes) -> dict[str, Any]:
        raise AssertionError("an unauthenticated peer reached the sink")


@pytest.mark.parametrize("payload", [b"[" * 60_000, b'{"job_id": "mig-000000000001", "token": "\\ud800"}'],
                         ids=["nested-json", "lone-surrogate"])
async def test_a_real_receiver_refuses_a_bad_hello_without_a_traceback(
        receiver: DataReceiver, payload: bytes, caplog: pytest.LogCaptureFixture) -> None:
    receiver.register("mig-000000000001", "the-token", NeverCalledSink())  # type: ignore[arg-type]
    host, port = receiver.address.rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(encode_frame(Frame(FrameType.HELLO, payload=payload)))
        ack = await asyncio.wait_for(read_frame(reader), DEADLINE_S)
    finally:
        writer.close()
    assert ack is not None and ack.type == FrameType.ACK
    body = json.loads(ack.payload)
    assert body["ok"] is False and body["error"].startswith("HELLO payload must be JSON")
    assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"


async def test_a_sender_refuses_an_ack_nested_too_deeply() -> None:
    """A peer on the data-plane port that answers HELLO with JSON nested deeper than the parser goes."""
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_frame(reader)
        writer.write(encode_frame(Frame(FrameType.ACK, payload=b"[" * 100_000)))
        await writer.drain()
        writer.close()

    peer = await asyncio.start_server(answer, "127.0.0.1", 0)
    try:
        port = peer.sockets[0].getsockname()[1]
        with pytest.raises(DataPlaneError, match="undecodable ACK payload"):
            await DataSender.connect(f"127.0.0.1:{port}", "mig-000000000001", "t", connect_timeout_s=DEADLINE_S)
    finally:
        peer.close()
        await peer.wait_closed()


# ---- 4. NBD: option data, request headers, and a real server ----------------------------------

def go_data(name: bytes, infos: list[int]) -> bytes:
    """NBD_OPT_GO / NBD_OPT_INFO data as a client sends it."""
    return nbd.U32.pack(len(name)) + name + nbd.U16.pack(len(infos)) + b"".join(nbd.U16.pack(i) for i in infos)


go_options = st.builds(go_data, st.text(max_size=40).map(str.encode), st.lists(st.integers(0, 0xFFFF), max_size=6))


@budget(500)
@given(st.one_of(st.binary(max_size=64), go_options, mutated(go_options)))
@example(nbd.U32.pack(0xFFFF_FFFF) + b"x")  # a name length of 4 GiB
@example(go_data(b"c1", [1]) + b"\0")  # an odd byte after the info requests
def test_any_go_option_data_parses_or_is_invalid(data: bytes) -> None:
    try:
        go = nbd.parse_go(data)
    except ValueError as exc:
        assert str(exc)
        return
    assert 4 + 2 + 2 * len(go.info_requests) <= len(data)
    assert nbd.parse_go(go_data(go.name.encode(), list(go.info_requests))) == go


requests_headers = st.builds(lambda cmd, flags, cookie, offset, length: nbd.REQUEST.pack(
    nbd.REQUEST_MAGIC, flags, cmd, cookie, offset, length),
    st.one_of(st.sampled_from(sorted(nbd.COMMAND_NAMES)), U16), st.one_of(st.integers(0, 3), U16), U64, U64, U32)


@budget(500)
@given(st.one_of(st.binary(min_size=nbd.REQUEST.size, max_size=nbd.REQUEST.size), requests_headers))
@example(nbd.REQUEST.pack(nbd.REQUEST_MAGIC, 0, nbd.CMD_WRITE, 1, 0, 0xFFFF_FFFF))  # a 4 GiB WRITE
def test_any_request_header_parses_or_ends_the_connection(header: bytes) -> None:
    try:
        request = nbd.parse_request(header, MAX_REQUEST_BYTES)
    except nbd.ProtocolError as exc:
        assert "magic" in str(exc) or "exceeds the advertised maximum" in str(exc)
        return
    assert request.command != nbd.CMD_WRITE or request.length <= MAX_REQUEST_BYTES
    assert nbd.REQUEST.pack(nbd.REQUEST_MAGIC, *request) == header


@budget(500)
@given(st.one_of(st.sampled_from(sorted(nbd.COMMAND_NAMES)), U16), st.one_of(st.integers(0, 3), U16),
       st.one_of(st.integers(0, 300).map(lambda n: n * 4096), U64),
       st.one_of(st.integers(0, 1100).map(lambda n: n * 4096), U32), st.sampled_from([NS_BYTES, 1 << 40]))
@example(nbd.CMD_READ, 0, 0, 0xFFFF_F000, 1 << 40)  # a 4 GiB READ on a namespace that has it
def test_a_request_runs_only_within_the_advertised_limits(command: int, flags: int, offset: int, length: int,
                                                          size: int) -> None:
    error = _refusal(command, flags, offset, length, size)
    assert error in (0, nbd.EINVAL, nbd.ENOSPC)
    if error or command == nbd.CMD_FLUSH:
        return
    assert length and offset % 4096 == 0 and length % 4096 == 0 and offset + length <= size
    if command == nbd.CMD_READ:
        assert length <= MAX_REQUEST_BYTES  # what the server allocates for the reply


@pytest.fixture(scope="module")
def nbd_controller(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmulatedController]:
    controller = EmulatedController("f1", tmp_path_factory.mktemp("nbd") / "f1.img", NS_BYTES, create=True)
    try:
        yield controller
    finally:
        controller.release()


def nbd_request(command: int, *, offset: int = 0, length: int = 4096, flags: int = 0, cookie: int = 1,
                payload: bytes = b"") -> bytes:
    return nbd.REQUEST.pack(nbd.REQUEST_MAGIC, flags, command, cookie, offset, length) + payload


nbd_options = st.one_of(
    st.builds(lambda name, infos, opt: nbd.OPTION_HEADER.pack(nbd.IHAVEOPT, opt, len(d := go_data(name, infos))) + d,
              st.sampled_from([b"f1", b"nope", b""]), st.lists(st.integers(0, 4), max_size=3),
              st.sampled_from([nbd.OPT_GO, nbd.OPT_INFO])),
    st.builds(lambda opt, data: nbd.OPTION_HEADER.pack(nbd.IHAVEOPT, opt, len(data)) + data,
              st.one_of(st.sampled_from([nbd.OPT_LIST, nbd.OPT_STARTTLS, nbd.OPT_ABORT, nbd.OPT_EXPORT_NAME]), U32),
              st.one_of(st.just(b""), st.just(b"f1"), st.binary(max_size=12))),
)
nbd_requests = st.builds(
    lambda cmd, flags, offset, blocks, fill: nbd_request(
        cmd, flags=flags, offset=offset, length=blocks * 4096,
        payload=bytes([fill]) * (blocks * 4096) if cmd == nbd.CMD_WRITE and blocks <= 16 else b""),
    st.sampled_from(sorted(nbd.COMMAND_NAMES)), st.one_of(st.just(0), st.integers(0, 3)),
    st.one_of(st.integers(0, NS_BYTES // 4096).map(lambda n: n * 4096), U64), st.integers(0, 16),
    st.integers(0, 255))
nbd_sessions = st.builds(
    lambda flags, options, go, reqs: nbd.CLIENT_FLAGS.pack(flags) + b"".join(options) + go + b"".join(reqs),
    st.one_of(st.just(3), st.just(1), U32), st.lists(nbd_options, max_size=2),
    st.just(nbd.OPTION_HEADER.pack(nbd.IHAVEOPT, nbd.OPT_GO, len(go_data(b"f1", []))) + go_data(b"f1", [])),
    st.lists(nbd_requests, max_size=4))


async def read_block_zero(port: int) -> bytes:
    """A well-behaved client: NBD_OPT_GO for f1, READ 4096 bytes at 0; returns the data."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        await reader.readexactly(18)  # greeting
        data = go_data(b"f1", [])
        writer.write(nbd.CLIENT_FLAGS.pack(3) + nbd.OPTION_HEADER.pack(nbd.IHAVEOPT, nbd.OPT_GO, len(data)) + data)
        while True:
            _, _, kind, length = struct.unpack(">QIII", await reader.readexactly(20))
            await reader.readexactly(length)
            if kind == nbd.REP_ACK:
                break
        writer.write(nbd_request(nbd.CMD_READ, cookie=42))
        magic, error, cookie = struct.unpack(">IIQ", await reader.readexactly(16))
        assert (magic, error, cookie) == (nbd.SIMPLE_REPLY_MAGIC, 0, 42)
        return await reader.readexactly(4096)
    finally:
        writer.close()


async def nbd_conversation(controller: EmulatedController, wire: bytes) -> list[Exception]:
    """``wire`` after the greeting of a real NbdServer, then EOF; returns what escaped its handler."""
    server = NbdServer("127.0.0.1", 0, "127.0.0.1", lambda cid: controller if cid == controller.controller_id else None,
                       io_threads=2)
    server.export(controller.controller_id)
    escaped: list[Exception] = []

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # The server's own connection handler; an exception it lets out would otherwise only
        # surface as "Task exception was never retrieved" whenever the task is collected.
        try:
            await server._accept(reader, writer)
        except Exception as exc:  # not CancelledError: server.close() cancels what is still open
            escaped.append(exc)
            raise

    listener = await asyncio.start_server(accept, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)

        async def replies_until_eof() -> None:
            while await reader.read(1 << 16):
                pass

        replies = asyncio.create_task(replies_until_eof())
        try:
            writer.write(wire)
            await writer.drain()
            writer.write_eof()
        except ConnectionError:
            pass  # the server hung up while we still wrote
        try:
            await asyncio.wait_for(replies, DEADLINE_S)  # the server closes at our EOF: no hang
        except ConnectionError:
            pass
        writer.close()
        # The server still serves a well-behaved client. (Not compared with the namespace: a write
        # the fuzzed connection left in an I/O thread may still land.)
        assert len(await asyncio.wait_for(read_block_zero(port), DEADLINE_S)) == 4096
    finally:
        listener.close()
        await listener.wait_closed()
        await server.close()
    return escaped


@budget(150)
@given(st.one_of(nbd_sessions, mutated(nbd_sessions), st.binary(max_size=100)))
@example(wire=nbd.CLIENT_FLAGS.pack(3) + nbd.OPTION_HEADER.pack(nbd.IHAVEOPT, nbd.OPT_GO, 8) + go_data(b"f1", [])
         + nbd_request(nbd.CMD_READ, length=0xFFFF_F000))  # a 4 GiB READ: EINVAL, nothing allocated
@example(wire=nbd.CLIENT_FLAGS.pack(3) + nbd.OPTION_HEADER.pack(nbd.IHAVEOPT, nbd.OPT_GO, 8) + go_data(b"f1", [])
         + nbd_request(nbd.CMD_WRITE, length=0xFFFF_F000))  # a 4 GiB WRITE: hung up on, nothing read
def test_a_real_nbd_server_fed_any_bytes_answers_or_hangs_up(nbd_controller: EmulatedController,
                                                             wire: bytes) -> None:
    escaped = asyncio.run(nbd_conversation(nbd_controller, wire))
    assert not escaped, f"the connection handler let {escaped!r} out"


# ---- 5. API requests: policies, names, orchctl arguments --------------------------------------

INT64 = st.one_of(st.integers(-2, 2), st.sampled_from([2**63 - 1, -2**63, 2_000_000, 2_000_001, 10_000, 10_001,
                                                      65_535, 65_536]),
                  st.integers(-2**63, 2**63 - 1))
policies = st.builds(
    lambda values, action: migration_pb2.ConvergencePolicy(on_no_convergence=action, **values),
    st.fixed_dictionaries({}, optional={field: INT64 for field in BOUNDS}),
    st.one_of(st.integers(0, 4), st.integers(-2**31, 2**31 - 1)))


@budget(500)
@given(policies)
def test_any_policy_is_accepted_within_bounds_or_refused_plainly(msg: migration_pb2.ConvergencePolicy) -> None:
    try:
        policy = policy_from_request(msg)
    except Refused as exc:
        assert exc.code == grpc.StatusCode.INVALID_ARGUMENT
        assert exc.message.startswith("policy.") and len(exc.message) <= names.MESSAGE_CHARS
        return
    assert isinstance(policy, Policy)
    for field, (least, most, _) in BOUNDS.items():
        value = getattr(policy, field)
        assert least <= value <= most or (field == "bandwidth_bytes_per_s" and value == 0)


@budget(500)
@given(st.sampled_from(sorted(BOUNDS)), st.integers(-2**70, 2**70))
def test_a_policy_value_is_within_its_bounds_or_named_briefly(field: str, value: int) -> None:
    problem = policy_value_problem(field, value)
    least, most, _ = BOUNDS[field]
    assert (problem is None) == (least <= value <= most)
    if problem:
        assert len(problem) <= 200 and str(value)[:20] in problem


NAME_CHARS = string.ascii_lowercase + string.digits + "-"
valid_names = st.text(NAME_CHARS, min_size=1, max_size=63).filter(lambda s: s[0] != "-" and s[-1] != "-")
job_ids = st.text("0123456789abcdef", min_size=12, max_size=12).map(lambda h: f"mig-{h}")
huge = st.builds(lambda piece, times: piece * times, st.text(min_size=1, max_size=8), st.integers(1, 20_000))
texts = st.one_of(st.text(max_size=80), huge, valid_names, job_ids,
                  st.tuples(st.one_of(valid_names, job_ids), st.sampled_from(["\n", "\r", " ", "\0", "É", "-", "A"]),
                            st.booleans()).map(lambda t: t[0] + t[1] if t[2] else t[1] + t[0]))


def is_name(value: str) -> bool:
    return 1 <= len(value) <= 63 and set(value) <= set(NAME_CHARS) and "-" not in (value[0], value[-1])


def is_job_id(value: str) -> bool:
    return len(value) == 16 and value.startswith("mig-") and set(value[4:]) <= set("0123456789abcdef")


@budget(500)
@given(texts)
@example("c1\n")  # `$` in the pattern matched before a trailing newline: accepted as a controller id
@example("mig-0123456789ab\n")
@example("é" * 100_000)
def test_any_string_is_a_valid_name_or_refused_with_a_prefix(value: str) -> None:
    checks: list[tuple[Callable[[str], str | None], Callable[[str], bool]]] = [
        (names.controller_id_problem, is_name), (names.node_name_problem, is_name), (names.job_id_problem, is_job_id)]
    for check, valid in checks:
        problem = check(value)
        assert (problem is None) == valid(value), f"{check.__name__}({value[:80]!r}) said {problem!r}"
        if problem is not None:
            assert len(problem) <= names.MESSAGE_CHARS
            assert names.shown(value) in problem  # the value, or a 64-character prefix of it


sizes = st.one_of(
    st.text(max_size=20),
    st.builds(lambda digits, unit: digits + unit,
              st.one_of(st.text("0123456789.", min_size=1, max_size=30),
                        st.builds(lambda d, n: d * n, st.sampled_from("19"), st.integers(1, 500))),
              st.sampled_from(["", "k", "M", "G", "T", "KB", "MiB", "/s", "E"])),
    st.floats(allow_nan=False, allow_infinity=False, min_value=0).map(lambda f: f"{f:f}"),
)


@budget(400)
@given(sizes)
@example("9" * 400)  # a float overflowed to infinity: math.floor raised OverflowError, a traceback
@example("1" + "0" * 5000 + "T")
def test_orchctl_size_and_bandwidth_arguments_parse_or_are_refused(text: str) -> None:
    for parse in (parse_size, parse_bandwidth):
        try:
            value = parse(text)
        except argparse.ArgumentTypeError as exc:
            assert str(exc).startswith(("invalid size", "invalid bandwidth"))
            continue
        assert 1 <= value < 2**63
