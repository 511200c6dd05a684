"""The one NVMe command encoder: 64-byte submission and 16-byte completion queue entries (pure).

The emulated controller model decodes what these builders encode, and the ``nvme-passthru``
backend sends the very same fields to a real PF through the admin passthrough ioctl, so a field
placed wrongly here is wrong for both.  Layouts follow the NVMe Base Specification 2.1 (Figures 91,
92 and 99); the TP4159 commands follow DESIGN.md, "The backend":

    CDW0   opcode 7:0, FUSE 9:8, reserved 13:10, PSDT 15:14, CID 31:16
    bytes  0 CDW0, 4 NSID, 8 CDW2, 12 CDW3, 16 MPTR, 24 PRP1, 32 PRP2, 40..63 CDW10..CDW15
    CQE    0 DW0, 4 DW1, 8 SQHD, 10 SQID, 12 CID, 14 phase (bit 0) | status (bits 15:1:
           SC 8:1, SCT 11:9, CRD 13:12, More 14, DNR 15)

Builders take counts (blocks, queue entries, bytes) where the specification stores zero-based
values, and convert; each documents the fields it fills.  Values that cannot fit raise ValueError
naming the parameter.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, fields
from enum import IntEnum

from agent.nvme.spec import (
    BROADCAST_NSID,
    CDQ_ETPT,
    CQE_BYTES,
    DSM_ATTRIBUTE_DEALLOCATE,
    DSM_RANGE_BYTES,
    RW_FUA,
    SQE_BYTES,
    WRITE_ZEROES_DEAC,
    AdminOpcode,
    CdqQueueType,
    CdqSelect,
    Cns,
    FeatureId,
    FeatureSelect,
    IoOpcode,
    LoggingAction,
    MigrationReceiveSelect,
    MigrationSendSelect,
    SequenceIndicator,
    SuspendType,
    TrackSendSelect,
    status_name,
)

_SQE = struct.Struct("<IIIIQQQIIIIII")
_CQE = struct.Struct("<IIHHHH")
_DSM_RANGE = struct.Struct("<IIQ")
assert _SQE.size == SQE_BYTES and _CQE.size == CQE_BYTES and _DSM_RANGE.size == DSM_RANGE_BYTES

_U8, _U16, _U32, _U64 = 0xFF, 0xFFFF, 0xFFFF_FFFF, (1 << 64) - 1
MAX_BLOCKS_PER_COMMAND = 0x1_0000  # NLB is a 16-bit zero-based count


def _check(name: str, value: int, limit: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= limit:
        raise ValueError(f"{name}={value!r} does not fit its field (0..{limit:#x})")


def _count(name: str, value: int, limit: int, least: int = 1) -> int:
    """A 1-based count stored zero-based: returns value - 1."""
    if not isinstance(value, int) or isinstance(value, bool) or not least <= value <= limit:
        raise ValueError(f"{name}={value!r} must be an integer in {least}..{limit}")
    return value - 1


def _dwords(name: str, length_bytes: int, limit_dwords: int) -> int:
    if not isinstance(length_bytes, int) or isinstance(length_bytes, bool) or length_bytes <= 0 or length_bytes % 4:
        raise ValueError(f"{name}={length_bytes!r} must be a positive multiple of 4 bytes (a dword count)")
    if length_bytes // 4 > limit_dwords:
        raise ValueError(f"{name}={length_bytes} bytes is more than {limit_dwords} dwords")
    return length_bytes // 4


@dataclass(frozen=True, slots=True)
class Sqe:
    """A submission queue entry; ``flags`` is CDW0 bits 15:8 (FUSE in 1:0, PSDT in 7:6)."""

    opcode: int
    cid: int = 0
    nsid: int = 0
    flags: int = 0
    cdw2: int = 0
    cdw3: int = 0
    mptr: int = 0
    prp1: int = 0
    prp2: int = 0
    cdw10: int = 0
    cdw11: int = 0
    cdw12: int = 0
    cdw13: int = 0
    cdw14: int = 0
    cdw15: int = 0

    def __post_init__(self) -> None:
        # One pass of ORs and shifts for the common case (this runs for every guest I/O); a
        # negative value keeps its sign through the shifts and a non-integer raises TypeError,
        # so both fall through to the per-field check that names the culprit.
        try:
            dwords = (self.nsid | self.cdw2 | self.cdw3 | self.cdw10 | self.cdw11 | self.cdw12 | self.cdw13
                      | self.cdw14 | self.cdw15)
            if not ((self.opcode | self.flags) >> 8 or self.cid >> 16 or dwords >> 32
                    or (self.mptr | self.prp1 | self.prp2) >> 64):
                return
        except TypeError:
            pass
        for name, limit in _SQE_LIMITS:
            _check(name, getattr(self, name), limit)

    @property
    def fuse(self) -> int:
        return self.flags & 0x3

    @property
    def psdt(self) -> int:
        return self.flags >> 6

    @property
    def cdw0(self) -> int:
        return self.opcode | self.flags << 8 | self.cid << 16

    @property
    def dptr(self) -> bytes:
        """The 16-byte Data Pointer (PRP1 then PRP2), as the passthrough ioctl's addr field sees it."""
        return struct.pack("<QQ", self.prp1, self.prp2)

    def encode(self) -> bytes:
        return _SQE.pack(self.cdw0, self.nsid, self.cdw2, self.cdw3, self.mptr, self.prp1, self.prp2,
                         self.cdw10, self.cdw11, self.cdw12, self.cdw13, self.cdw14, self.cdw15)

    @classmethod
    def decode(cls, raw: bytes) -> Sqe:
        if len(raw) != SQE_BYTES:
            raise ValueError(f"a submission queue entry is {SQE_BYTES} bytes, got {len(raw)}")
        cdw0, nsid, *rest = _SQE.unpack(raw)
        # Unpacked fields always fit, so the controller's decode (once per command) skips the
        # checks: slot setters fill the frozen instance directly.
        sqe = object.__new__(cls)
        for setter, value in zip(_SQE_SETTERS, (cdw0 & _U8, cdw0 >> 16, nsid, (cdw0 >> 8) & _U8, *rest), strict=True):
            setter(sqe, value)
        return sqe


_WIDE = {"opcode": _U8, "flags": _U8, "cid": _U16, "mptr": _U64, "prp1": _U64, "prp2": _U64}
_SQE_LIMITS = tuple((f.name, _WIDE.get(f.name, _U32)) for f in fields(Sqe))
_SQE_SETTERS = tuple(Sqe.__dict__[f.name].__set__ for f in fields(Sqe))


@dataclass(frozen=True, slots=True)
class Cqe:
    """A completion queue entry; ``status`` is the 15-bit Status field with ``sc``/``sct``/... views."""

    cid: int
    sqid: int = 0
    sqhd: int = 0
    phase: int = 0
    sc: int = 0
    sct: int = 0
    crd: int = 0
    more: bool = False
    dnr: bool = False
    dw0: int = 0
    dw1: int = 0

    def __post_init__(self) -> None:
        for name, limit in _CQE_LIMITS:
            _check(name, getattr(self, name), limit)

    @property
    def status(self) -> int:
        """``(SCT << 8) | SC``, comparable with ``spec.Status``."""
        return self.sct << 8 | self.sc

    @property
    def ok(self) -> bool:
        return self.sc == 0 and self.sct == 0

    @property
    def status_name(self) -> str:
        return status_name(self.sct, self.sc)

    def encode(self) -> bytes:
        return pack_cqe(self.cid, self.sqid, self.sqhd, self.phase, self.sct << 8 | self.sc, more=self.more,
                        dnr=self.dnr, dw0=self.dw0, dw1=self.dw1, crd=self.crd)

    @classmethod
    def decode(cls, raw: bytes) -> Cqe:
        if len(raw) != CQE_BYTES:
            raise ValueError(f"a completion queue entry is {CQE_BYTES} bytes, got {len(raw)}")
        dw0, dw1, sqhd, sqid, cid, field = _CQE.unpack(raw)
        return cls(cid, sqid, sqhd, field & 1, (field >> 1) & _U8, (field >> 9) & 0x7, (field >> 12) & 0x3,
                   bool(field >> 14 & 1), bool(field >> 15), dw0, dw1)


_CQE_LIMITS = (("cid", _U16), ("sqid", _U16), ("sqhd", _U16), ("phase", 1), ("sc", _U8), ("sct", 0x7),
               ("crd", 0x3), ("dw0", _U32), ("dw1", _U32))


def pack_cqe(cid: int, sqid: int, sqhd: int, phase: int, status: int, *, more: bool = False, dnr: bool = False,
             dw0: int = 0, dw1: int = 0, crd: int = 0) -> bytes:
    """Encode a CQE from ``status`` = ``(SCT << 8) | SC`` without building a Cqe (the controller's hot path;
    the controller's own values always fit)."""
    field = phase | (status & _U8) << 1 | (status >> 8) << 9 | crd << 12 | int(more) << 14 | int(dnr) << 15
    return _CQE.pack(dw0, dw1, sqhd, sqid, cid, field)


def cqe_status(raw: bytes) -> int:
    """``(SCT << 8) | SC`` of an encoded CQE without decoding the rest (the I/O fast path)."""
    field = raw[14] | raw[15] << 8
    return ((field >> 9) & 0x7) << 8 | (field >> 1) & _U8


def _sel_mos(sel: int, mos: int) -> int:
    """CDW10 of the TP4159 commands: SEL in bits 7:0, MOS in bits 31:16."""
    return sel | mos << 16


# Admin commands whose select (CDW10 bits 7:0) says what they do, by the select's enum.
_SELECTS: dict[int, type[IntEnum]] = {
    AdminOpcode.MIGRATION_SEND: MigrationSendSelect,
    AdminOpcode.MIGRATION_RECEIVE: MigrationReceiveSelect,
    AdminOpcode.CONTROLLER_DATA_QUEUE: CdqSelect,
}
OTHER_COMMAND = "other"


def admin_command_name(sqe: Sqe) -> str:
    """An admin command as a metric label, from a bounded set: the opcode's name, with the
    select's for the commands that do several things ("migration_send.suspend",
    "controller_data_queue.create"); "other" for an opcode or select not in spec.py."""
    try:
        opcode = AdminOpcode(sqe.opcode)
    except ValueError:
        return OTHER_COMMAND
    name = opcode.name.lower()
    selects = _SELECTS.get(opcode)
    if selects is None:
        return name
    try:
        return f"{name}.{selects(sqe.cdw10 & _U8).name.lower()}"
    except ValueError:
        return OTHER_COMMAND


# ----- admin commands ---------------------------------------------------------------------------


def identify(cns: int, *, nsid: int = 0, cntid: int = 0, cid: int = 0, prp1: int = 0) -> Sqe:
    """Identify: CDW10 = CNS 7:0 | CNTID 31:16; the 4096-byte structure comes back as data."""
    _check("cns", cns, _U8)
    _check("cntid", cntid, _U16)
    return Sqe(AdminOpcode.IDENTIFY, cid, nsid, prp1=prp1, cdw10=cns | cntid << 16)


def identify_controller(*, cid: int = 0, prp1: int = 0) -> Sqe:
    return identify(Cns.CONTROLLER, cid=cid, prp1=prp1)


def identify_namespace(nsid: int, *, cid: int = 0, prp1: int = 0) -> Sqe:
    return identify(Cns.NAMESPACE, nsid=nsid, cid=cid, prp1=prp1)


def get_log_page(lid: int, length_bytes: int, *, nsid: int = BROADCAST_NSID, offset: int = 0, lsp: int = 0,
                 rae: bool = False, cid: int = 0, prp1: int = 0) -> Sqe:
    """Get Log Page: CDW10 = LID 7:0 | LSP 14:8 | RAE 15 | NUMDL 31:16; CDW11 = NUMDU 15:0;
    CDW12/13 = byte offset; NUMD is the zero-based dword count of ``length_bytes``."""
    _check("lid", lid, _U8)
    _check("lsp", lsp, 0x7F)
    _check("offset", offset, _U64)
    numd = _dwords("length_bytes", length_bytes, 1 << 32) - 1
    return Sqe(AdminOpcode.GET_LOG_PAGE, cid, nsid, prp1=prp1,
               cdw10=lid | lsp << 8 | int(rae) << 15 | (numd & _U16) << 16, cdw11=numd >> 16,
               cdw12=offset & _U32, cdw13=offset >> 32)


def set_features(fid: int, cdw11: int = 0, *, cdw12: int = 0, cdw13: int = 0, save: bool = False, nsid: int = 0,
                 cid: int = 0) -> Sqe:
    """Set Features: CDW10 = FID 7:0 | SV 31; the feature's value in CDW11 (and CDW12..13)."""
    _check("fid", fid, _U8)
    return Sqe(AdminOpcode.SET_FEATURES, cid, nsid, cdw10=fid | int(save) << 31, cdw11=cdw11, cdw12=cdw12,
               cdw13=cdw13)


def get_features(fid: int, *, sel: int = FeatureSelect.CURRENT, cdw11: int = 0, nsid: int = 0, cid: int = 0) -> Sqe:
    """Get Features: CDW10 = FID 7:0 | SEL 10:8; the value comes back in completion DW0, or as data
    for features that define a data structure (FID 21h)."""
    _check("fid", fid, _U8)
    _check("sel", sel, 0x7)
    return Sqe(AdminOpcode.GET_FEATURES, cid, nsid, cdw10=fid | sel << 8, cdw11=cdw11)


def set_number_of_queues(submission_queues: int, completion_queues: int, *, cid: int = 0) -> Sqe:
    """Number of Queues (FID 07h): CDW11 = NSQR 15:0 | NCQR 31:16, both zero-based."""
    nsqr = _count("submission_queues", submission_queues, 0xFFFF)
    ncqr = _count("completion_queues", completion_queues, 0xFFFF)
    return set_features(FeatureId.NUMBER_OF_QUEUES, nsqr | ncqr << 16, cid=cid)


def set_cdq_head(cdqid: int, head: int, *, tail_trigger: int | None = None, cid: int = 0) -> Sqe:
    """Controller Data Queue feature (FID 21h), Set: CDW11 = CDQID 15:0 | ETPT 31; CDW12 = the new
    head pointer (a slot index); CDW13 = the tail pointer trigger, with ETPT set, when
    ``tail_trigger`` is given (libnvme ``nvme_lm_set_features_ctrl_data_queue``)."""
    _check("cdqid", cdqid, _U16)
    _check("head", head, _U32)
    if tail_trigger is None:
        return set_features(FeatureId.CONTROLLER_DATA_QUEUE, cdqid, cdw12=head, cid=cid)
    _check("tail_trigger", tail_trigger, _U32)
    return set_features(FeatureId.CONTROLLER_DATA_QUEUE, cdqid | CDQ_ETPT, cdw12=head, cdw13=tail_trigger, cid=cid)


def get_cdq_pointers(cdqid: int, *, cid: int = 0) -> Sqe:
    """Controller Data Queue feature (FID 21h), Get: CDW11 = CDQID.  The answer is not in the
    completion: it is an 8-byte data buffer the host supplies, le32 head pointer then le32 tail
    pointer trigger (``agent.nvme.cdq.decode_pointers``)."""
    _check("cdqid", cdqid, _U16)
    return get_features(FeatureId.CONTROLLER_DATA_QUEUE, cdw11=cdqid, cid=cid)


def create_io_cq(qid: int, entries: int, base: int, *, vector: int = 0, interrupts: bool = True,
                 contiguous: bool = True, cid: int = 0) -> Sqe:
    """Create I/O Completion Queue: PRP1 = base; CDW10 = QID 15:0 | QSIZE 31:16 (zero-based);
    CDW11 = PC 0 | IEN 1 | IV 31:16."""
    _check("qid", qid, _U16)
    _check("vector", vector, _U16)
    qsize = _count("entries", entries, 0x1_0000, least=2)  # a queue has at least two slots
    return Sqe(AdminOpcode.CREATE_IO_CQ, cid, prp1=base, cdw10=qid | qsize << 16,
               cdw11=int(contiguous) | int(interrupts) << 1 | vector << 16)


def create_io_sq(qid: int, entries: int, base: int, cqid: int, *, priority: int = 0, contiguous: bool = True,
                 cid: int = 0) -> Sqe:
    """Create I/O Submission Queue: PRP1 = base; CDW10 = QID | QSIZE (zero-based) << 16;
    CDW11 = PC 0 | QPRIO 2:1 | CQID 31:16."""
    _check("qid", qid, _U16)
    _check("cqid", cqid, _U16)
    _check("priority", priority, 0x3)
    qsize = _count("entries", entries, 0x1_0000, least=2)  # a queue has at least two slots
    return Sqe(AdminOpcode.CREATE_IO_SQ, cid, prp1=base, cdw10=qid | qsize << 16,
               cdw11=int(contiguous) | priority << 1 | cqid << 16)


def delete_io_sq(qid: int, *, cid: int = 0) -> Sqe:
    _check("qid", qid, _U16)
    return Sqe(AdminOpcode.DELETE_IO_SQ, cid, cdw10=qid)


def delete_io_cq(qid: int, *, cid: int = 0) -> Sqe:
    _check("qid", qid, _U16)
    return Sqe(AdminOpcode.DELETE_IO_CQ, cid, cdw10=qid)


# ----- TP4159: host managed live migration ----------------------------------------------------


def track_send(cdqid: int, action: LoggingAction, *, cid: int = 0) -> Sqe:
    """Track Send, SEL 0 (Log User Data Changes): MOS 3:0 = LACT; CDW11 = CDQID."""
    _check("cdqid", cdqid, _U16)
    return Sqe(AdminOpcode.TRACK_SEND, cid,
               cdw10=_sel_mos(TrackSendSelect.LOG_USER_DATA_CHANGES, LoggingAction(action)), cdw11=cdqid)


def migration_suspend(cntlid: int, *, suspend_type: SuspendType = SuspendType.SUSPEND,
                      delete_udmq: bool = False, cid: int = 0) -> Sqe:
    """Migration Send, SEL 0 (Suspend): CDW11 = CNTLID 15:0 | STYPE 23:16 | DUDMQ 31."""
    _check("cntlid", cntlid, _U16)
    return Sqe(AdminOpcode.MIGRATION_SEND, cid, cdw10=_sel_mos(MigrationSendSelect.SUSPEND, 0),
               cdw11=cntlid | SuspendType(suspend_type) << 16 | int(delete_udmq) << 31)


def migration_resume(cntlid: int, *, cid: int = 0) -> Sqe:
    """Migration Send, SEL 1 (Resume): CDW11 = CNTLID."""
    _check("cntlid", cntlid, _U16)
    return Sqe(AdminOpcode.MIGRATION_SEND, cid, cdw10=_sel_mos(MigrationSendSelect.RESUME, 0), cdw11=cntlid)


def set_controller_state(cntlid: int, offset: int, length_bytes: int, sequence: SequenceIndicator, *,
                         csvi: int = 0, csuuidi: int = 0, uuid_index: int = 0, cid: int = 0,
                         prp1: int = 0) -> Sqe:
    """Migration Send, SEL 2 (Set Controller State), one piece of the state:
    MOS 1:0 = SEQIND; CDW11 = CNTLID 15:0 | CSVI 23:16 | CSUUIDI 31:24; CDW12/13 = byte offset;
    CDW14 = UIDX 6:0; CDW15 = NUMD, the piece's dword count (not zero-based)."""
    _check("cntlid", cntlid, _U16)
    _check("csvi", csvi, _U8)
    _check("csuuidi", csuuidi, _U8)
    _check("uuid_index", uuid_index, 0x7F)
    _check("offset", offset, _U64)
    numd = _dwords("length_bytes", length_bytes, _U32)
    return Sqe(AdminOpcode.MIGRATION_SEND, cid, prp1=prp1,
               cdw10=_sel_mos(MigrationSendSelect.SET_CONTROLLER_STATE, SequenceIndicator(sequence)),
               cdw11=cntlid | csvi << 16 | csuuidi << 24, cdw12=offset & _U32, cdw13=offset >> 32,
               cdw14=uuid_index, cdw15=numd)


def get_controller_state(cntlid: int, offset: int, length_bytes: int, *, csvi: int = 0, csuuidi: int = 0,
                         csuidxp: int = 0, uuid_index: int = 0, cid: int = 0, prp1: int = 0) -> Sqe:
    """Migration Receive, SEL 0 (Get Controller State), one piece: MOS 7:0 = CSVI;
    CDW11 = CNTLID 15:0 | CSUUIDI 23:16 | CSUIDXP 31:24; CDW12/13 = byte offset; CDW14 = UIDX 6:0;
    CDW15 = NUMD, zero-based.  Completion DW0 bit 0 = CSUP (the controller is suspended)."""
    _check("cntlid", cntlid, _U16)
    _check("csvi", csvi, _U8)
    _check("csuuidi", csuuidi, _U8)
    _check("csuidxp", csuidxp, _U8)
    _check("uuid_index", uuid_index, 0x7F)
    _check("offset", offset, _U64)
    numd = _dwords("length_bytes", length_bytes, 1 << 32) - 1
    return Sqe(AdminOpcode.MIGRATION_RECEIVE, cid, prp1=prp1,
               cdw10=_sel_mos(MigrationReceiveSelect.GET_CONTROLLER_STATE, csvi),
               cdw11=cntlid | csuuidi << 16 | csuidxp << 24, cdw12=offset & _U32, cdw13=offset >> 32,
               cdw14=uuid_index, cdw15=numd)


def cdq_create(cntlid: int, size_dwords: int, base: int, *,
               queue_type: CdqQueueType = CdqQueueType.USER_DATA_MIGRATION, contiguous: bool = True,
               cid: int = 0) -> Sqe:
    """Controller Data Queue, SEL 0 (create): MOS 7:0 = queue type; PRP1 = base;
    CDW11 = PC 0 | CNTLID 31:16; CDW12 = queue size in dwords.  Completion DW0 = CDQID."""
    _check("cntlid", cntlid, _U16)
    _check("size_dwords", size_dwords, _U32)
    return Sqe(AdminOpcode.CONTROLLER_DATA_QUEUE, cid, prp1=base,
               cdw10=_sel_mos(CdqSelect.CREATE, CdqQueueType(queue_type)), cdw11=int(contiguous) | cntlid << 16,
               cdw12=size_dwords)


def cdq_delete(cdqid: int, *, cid: int = 0) -> Sqe:
    """Controller Data Queue, SEL 1 (delete): CDW11 = CDQID."""
    _check("cdqid", cdqid, _U16)
    return Sqe(AdminOpcode.CONTROLLER_DATA_QUEUE, cid, cdw10=_sel_mos(CdqSelect.DELETE, 0), cdw11=cdqid)


# ----- I/O commands (NVM command set) -----------------------------------------------------------


def _rw(opcode: IoOpcode, nsid: int, slba: int, blocks: int, fua: bool, cid: int, prp1: int, prp2: int,
        extra_cdw12: int = 0) -> Sqe:
    """Read/Write/Write Zeroes: CDW10/11 = SLBA; CDW12 = NLB 15:0 (zero-based) | FUA 30 | extra."""
    _check("slba", slba, _U64)
    nlb = _count("blocks", blocks, MAX_BLOCKS_PER_COMMAND)
    return Sqe(opcode, cid, nsid, prp1=prp1, prp2=prp2, cdw10=slba & _U32, cdw11=slba >> 32,
               cdw12=nlb | (RW_FUA if fua else 0) | extra_cdw12)


def read(nsid: int, slba: int, blocks: int, *, fua: bool = False, cid: int = 0, prp1: int = 0, prp2: int = 0) -> Sqe:
    return _rw(IoOpcode.READ, nsid, slba, blocks, fua, cid, prp1, prp2)


def write(nsid: int, slba: int, blocks: int, *, fua: bool = False, cid: int = 0, prp1: int = 0,
          prp2: int = 0) -> Sqe:
    return _rw(IoOpcode.WRITE, nsid, slba, blocks, fua, cid, prp1, prp2)


def write_zeroes(nsid: int, slba: int, blocks: int, *, deallocate: bool = False, fua: bool = False,
                 cid: int = 0) -> Sqe:
    """Write Zeroes: as a write without data; CDW12 bit 25 = DEAC (the blocks may be deallocated)."""
    return _rw(IoOpcode.WRITE_ZEROES, nsid, slba, blocks, fua, cid, 0, 0, WRITE_ZEROES_DEAC if deallocate else 0)


def flush(nsid: int = BROADCAST_NSID, *, cid: int = 0) -> Sqe:
    return Sqe(IoOpcode.FLUSH, cid, nsid)


def dataset_management(nsid: int, ranges: int, *, deallocate: bool = True, cid: int = 0, prp1: int = 0) -> Sqe:
    """Dataset Management: CDW10 = NR 7:0 (zero-based range count); CDW11 AD bit 2 = deallocate.
    The ranges travel as data, encoded by ``dsm_ranges``."""
    nr = _count("ranges", ranges, 256)
    return Sqe(IoOpcode.DATASET_MANAGEMENT, cid, nsid, prp1=prp1, cdw10=nr,
               cdw11=DSM_ATTRIBUTE_DEALLOCATE if deallocate else 0)


def dsm_ranges(ranges: list[tuple[int, int]], *, context_attributes: int = 0) -> bytes:
    """Dataset Management range list from (slba, blocks) pairs: 16 bytes each,
    context attributes u32, length in blocks u32 (not zero-based), SLBA u64."""
    _check("context_attributes", context_attributes, _U32)
    out = bytearray()
    for slba, blocks in ranges:
        _check("slba", slba, _U64)
        _check("blocks", blocks, _U32)
        out += _DSM_RANGE.pack(context_attributes, blocks, slba)
    return bytes(out)


def decode_dsm_ranges(data: bytes) -> list[tuple[int, int, int]]:
    """(context attributes, blocks, slba) per 16-byte range."""
    if len(data) % DSM_RANGE_BYTES:
        raise ValueError(f"Dataset Management ranges are {DSM_RANGE_BYTES} bytes each, got {len(data)} bytes")
    return [tuple(r) for r in _DSM_RANGE.iter_unpack(data)]  # type: ignore[misc]
