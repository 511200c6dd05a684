"""The shared NVMe encoder: every builder's SQE byte for byte, CQE layout, and round trips."""

from __future__ import annotations

import struct
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.nvme import commands as c
from agent.nvme.commands import Cqe, Sqe, cqe_status, pack_cqe
from agent.nvme.spec import LoggingAction, SequenceIndicator, Status, SuspendType


def sqe_bytes(*, opcode: int, cid: int = 0, flags: int = 0, nsid: int = 0, prp1: int = 0, prp2: int = 0,
              cdw: dict[int, int] | None = None) -> bytes:
    """The expected 64 bytes, placed field by field at the offsets of NVMe Base 2.1 Figure 92."""
    raw = bytearray(64)
    raw[0] = opcode
    raw[1] = flags
    struct.pack_into("<H", raw, 2, cid)
    struct.pack_into("<I", raw, 4, nsid)
    struct.pack_into("<Q", raw, 24, prp1)
    struct.pack_into("<Q", raw, 32, prp2)
    for n, value in (cdw or {}).items():
        struct.pack_into("<I", raw, 4 * n, value)  # CDWn lives at byte 4n (CDW10 at 40)
    return bytes(raw)


CASES: list[tuple[str, Callable[[], Sqe], bytes]] = [
    ("identify controller", lambda: c.identify_controller(cid=7, prp1=0x1000),
     sqe_bytes(opcode=0x06, cid=7, prp1=0x1000, cdw={10: 0x01})),
    ("identify namespace", lambda: c.identify_namespace(3), sqe_bytes(opcode=0x06, nsid=3, cdw={10: 0x00})),
    ("identify CNS 20h, CNTID", lambda: c.identify(0x20, cntid=0x1234),
     sqe_bytes(opcode=0x06, cdw={10: 0x1234_0020})),
    ("get log page SMART", lambda: c.get_log_page(0x02, 512, cid=1),
     # NUMD = 127: NUMDL in CDW10 31:16, NUMDU in CDW11 15:0; NSID defaults to the broadcast value.
     sqe_bytes(opcode=0x02, cid=1, nsid=0xFFFF_FFFF, cdw={10: 0x007F_0002})),
    ("get log page, large, offset, LSP, RAE",
     lambda: c.get_log_page(0xC0, 0x4_0004 * 4, nsid=0, offset=0x2_0000_0010, lsp=0x5, rae=True),
     sqe_bytes(opcode=0x02, cdw={10: 0x0003_85C0, 11: 0x0004, 12: 0x10, 13: 0x2})),
    ("set features, save", lambda: c.set_features(0x08, 0x0000_0A05, save=True),
     sqe_bytes(opcode=0x09, cdw={10: 0x8000_0008, 11: 0x0A05})),
    ("get features, SEL", lambda: c.get_features(0x04, sel=3, cdw11=0x0010_0000),
     sqe_bytes(opcode=0x0A, cdw={10: 0x0304, 11: 0x0010_0000})),
    ("number of queues", lambda: c.set_number_of_queues(4, 8),
     sqe_bytes(opcode=0x09, cdw={10: 0x07, 11: 0x0007_0003})),
    ("CDQ head pointer (FID 21h)", lambda: c.set_cdq_head(5, 1000),
     sqe_bytes(opcode=0x09, cdw={10: 0x21, 11: 5, 12: 1000})),
    # ETPT is CDW11 bit 31, the tail pointer trigger CDW13 (libnvme nvme_lm_set_features_ctrl_data_queue).
    ("CDQ head pointer and tail pointer trigger", lambda: c.set_cdq_head(5, 1000, tail_trigger=2000),
     sqe_bytes(opcode=0x09, cdw={10: 0x21, 11: 0x8000_0005, 12: 1000, 13: 2000})),
    ("CDQ pointers", lambda: c.get_cdq_pointers(5), sqe_bytes(opcode=0x0A, cdw={10: 0x21, 11: 5})),
    ("create I/O CQ", lambda: c.create_io_cq(3, 256, 0x20_0000, vector=9),
     sqe_bytes(opcode=0x05, prp1=0x20_0000, cdw={10: 0x00FF_0003, 11: 0x0009_0003})),
    ("create I/O CQ, no interrupts", lambda: c.create_io_cq(1, 2, 0x1000, interrupts=False),
     sqe_bytes(opcode=0x05, prp1=0x1000, cdw={10: 0x0001_0001, 11: 0x1})),
    ("create I/O SQ", lambda: c.create_io_sq(2, 1024, 0x30_0000, 7, priority=2),
     sqe_bytes(opcode=0x01, prp1=0x30_0000, cdw={10: 0x03FF_0002, 11: 0x0007_0005})),
    ("delete I/O SQ", lambda: c.delete_io_sq(2), sqe_bytes(opcode=0x00, cdw={10: 2})),
    ("delete I/O CQ", lambda: c.delete_io_cq(3), sqe_bytes(opcode=0x04, cdw={10: 3})),
    # TP4159, as DESIGN.md lays the fields out: CDW10 = SEL 7:0 | MOS 31:16.
    ("track send start", lambda: c.track_send(4, LoggingAction.START),
     sqe_bytes(opcode=0x3D, cdw={10: 0x0001_0000, 11: 4})),
    ("track send stop", lambda: c.track_send(4, LoggingAction.STOP), sqe_bytes(opcode=0x3D, cdw={10: 0, 11: 4})),
    ("suspend", lambda: c.migration_suspend(0x0102, cid=3),
     sqe_bytes(opcode=0x41, cid=3, cdw={10: 0x0, 11: 0x0001_0102})),
    ("suspend notification, DUDMQ",
     lambda: c.migration_suspend(0x0102, suspend_type=SuspendType.NOTIFICATION, delete_udmq=True),
     sqe_bytes(opcode=0x41, cdw={11: 0x8000_0102})),
    ("resume", lambda: c.migration_resume(0x0102), sqe_bytes(opcode=0x41, cdw={10: 0x1, 11: 0x0102})),
    ("set controller state, last piece",
     lambda: c.set_controller_state(0x0102, 0x1_0000_0008, 16, SequenceIndicator.LAST, csvi=3, csuuidi=4,
                                    uuid_index=5, prp1=0x5000),
     sqe_bytes(opcode=0x41, prp1=0x5000,
               cdw={10: 0x0002_0002, 11: 0x0403_0102, 12: 0x8, 13: 0x1, 14: 5, 15: 4})),
    ("set controller state, entire", lambda: c.set_controller_state(1, 0, 4096, SequenceIndicator.ENTIRE),
     sqe_bytes(opcode=0x41, cdw={10: 0x0003_0002, 11: 1, 15: 1024})),
    ("set controller state, middle", lambda: c.set_controller_state(1, 4096, 8, SequenceIndicator.MIDDLE),
     sqe_bytes(opcode=0x41, cdw={10: 0x0000_0002, 11: 1, 12: 4096, 15: 2})),
    ("get controller state",
     lambda: c.get_controller_state(0x0102, 0x2_0000_0004, 4096, csvi=1, csuuidi=2, csuidxp=3, uuid_index=4),
     # NUMD is zero-based here: 4096 bytes = 1024 dwords = 1023.
     sqe_bytes(opcode=0x42, cdw={10: 0x0001_0000, 11: 0x0302_0102, 12: 0x4, 13: 0x2, 14: 4, 15: 1023})),
    ("CDQ create", lambda: c.cdq_create(0x0102, 65536 * 8, 0x7000_0000),
     sqe_bytes(opcode=0x45, prp1=0x7000_0000, cdw={10: 0x0000_0000, 11: 0x0102_0001, 12: 0x8_0000})),
    ("CDQ create, not contiguous", lambda: c.cdq_create(1, 16, 0x1000, contiguous=False),
     sqe_bytes(opcode=0x45, prp1=0x1000, cdw={11: 0x0001_0000, 12: 16})),
    ("CDQ delete", lambda: c.cdq_delete(9), sqe_bytes(opcode=0x45, cdw={10: 0x1, 11: 9})),
    # NVM I/O: CDW10/11 = SLBA, CDW12 = NLB (zero-based) | FUA 30 | DEAC 25.
    ("read", lambda: c.read(1, 0x1_2345_6789, 8, cid=0xBEEF, prp1=0x1000, prp2=0x2000),
     sqe_bytes(opcode=0x02, cid=0xBEEF, nsid=1, prp1=0x1000, prp2=0x2000, cdw={10: 0x2345_6789, 11: 1, 12: 7})),
    ("write, FUA", lambda: c.write(2, 10, 65536, fua=True),
     sqe_bytes(opcode=0x01, nsid=2, cdw={10: 10, 12: 0x4000_FFFF})),
    ("write zeroes, deallocate", lambda: c.write_zeroes(1, 5, 3, deallocate=True),
     sqe_bytes(opcode=0x08, nsid=1, cdw={10: 5, 12: 0x0200_0002})),
    ("flush, broadcast", lambda: c.flush(), sqe_bytes(opcode=0x00, nsid=0xFFFF_FFFF)),
    ("dataset management", lambda: c.dataset_management(1, 3), sqe_bytes(opcode=0x09, nsid=1, cdw={10: 2, 11: 0x4})),
    ("dataset management, advisory", lambda: c.dataset_management(1, 256, deallocate=False),
     sqe_bytes(opcode=0x09, nsid=1, cdw={10: 255, 11: 0})),
]


@pytest.mark.parametrize(("name", "build", "expected"), CASES, ids=[case[0] for case in CASES])
def test_builder_bytes(name: str, build: Callable[[], Sqe], expected: bytes) -> None:
    sqe = build()
    assert sqe.encode() == expected
    assert Sqe.decode(expected) == sqe


def test_a_whole_sqe_literally() -> None:
    """One SQE spelled out byte by byte, so the helper above cannot share a mistake with the encoder."""
    sqe = Sqe(0x41, cid=0xA1B2, nsid=0x01020304, flags=0x40, cdw2=0x11, cdw3=0x22, mptr=0x33, prp1=0x44,
              prp2=0x55, cdw10=0x66, cdw11=0x77, cdw12=0x88, cdw13=0x99, cdw14=0xAA, cdw15=0xBB)
    assert sqe.encode().hex() == (
        "4140b2a1" "04030201" "11000000" "22000000" "3300000000000000" "4400000000000000" "5500000000000000"
        "66000000" "77000000" "88000000" "99000000" "aa000000" "bb000000"
    )
    assert (sqe.psdt, sqe.fuse, sqe.cdw0) == (1, 0, 0xA1B2_4041)
    assert sqe.dptr == bytes.fromhex("4400000000000000" "5500000000000000")


def test_dsm_ranges() -> None:
    data = c.dsm_ranges([(0x1_0000_0000, 8), (3, 1)], context_attributes=0x11)
    assert data.hex() == "11000000" "08000000" "0000000001000000" "11000000" "01000000" "0300000000000000"
    assert c.decode_dsm_ranges(data) == [(0x11, 8, 0x1_0000_0000), (0x11, 1, 3)]
    with pytest.raises(ValueError, match="16 bytes each, got 17 bytes"):
        c.decode_dsm_ranges(data[:17])


def test_cqe_layout() -> None:
    cqe = Cqe(cid=0x1234, sqid=3, sqhd=0x55, phase=1, sc=0x3B, sct=1, crd=2, more=True, dnr=True,
              dw0=0xDEADBEEF, dw1=7)
    raw = cqe.encode()
    # DW3 bits 31:16: phase 16, SC 24:17, SCT 27:25, CRD 29:28, M 30, DNR 31.
    assert raw.hex() == "efbeadde" "07000000" "5500" "0300" "3412" + struct.pack("<H", 1 | 0x3B << 1 | 1 << 9 | 2 << 12
                                                                                 | 1 << 14 | 1 << 15).hex()
    assert Cqe.decode(raw) == cqe
    assert cqe.status == Status.CONTROLLER_DATA_QUEUE_FULL
    assert cqe.status_name == "CONTROLLER_DATA_QUEUE_FULL"
    assert cqe_status(raw) == Status.CONTROLLER_DATA_QUEUE_FULL
    assert not cqe.ok and Cqe(cid=1).ok
    assert Cqe(cid=0, sc=0x42, sct=1).status_name == "SCT 0x1 / SC 0x42"
    assert pack_cqe(0x1234, 3, 0x55, 1, Status.CONTROLLER_DATA_QUEUE_FULL, more=True, dnr=True, dw0=0xDEADBEEF,
                    dw1=7, crd=2) == raw


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: Sqe.decode(b"\0" * 63), "a submission queue entry is 64 bytes, got 63"),
        (lambda: Sqe.decode(b"\0" * 65), "64 bytes, got 65"),
        (lambda: Cqe.decode(b"\0" * 15), "a completion queue entry is 16 bytes, got 15"),
        (lambda: Sqe(0x100), r"opcode=256 does not fit its field \(0..0xff\)"),
        (lambda: Sqe(1, cid=-1), "cid=-1 does not fit"),
        (lambda: Sqe(1, cdw12=1 << 32), "cdw12=4294967296 does not fit"),
        (lambda: Sqe(1, prp1=1.5), "prp1=1.5 does not fit"),  # type: ignore[arg-type]
        (lambda: Cqe(cid=1, sct=8), "sct=8 does not fit"),
        (lambda: c.write(1, 0, 0), "blocks=0 must be an integer in 1..65536"),
        (lambda: c.read(1, 0, 65537), "blocks=65537 must be an integer in 1..65536"),
        (lambda: c.read(1, 1 << 64, 1), "slba=18446744073709551616 does not fit"),
        (lambda: c.get_log_page(2, 510), "length_bytes=510 must be a positive multiple of 4 bytes"),
        (lambda: c.get_controller_state(1, 0, 0), "length_bytes=0 must be a positive multiple of 4"),
        (lambda: c.create_io_cq(1, 1, 0), "entries=1 must be an integer in 2..65536"),
        (lambda: c.create_io_sq(1, 0, 0, 1), "entries=0 must be an integer in 2..65536"),
        (lambda: c.set_number_of_queues(0, 1), "submission_queues=0 must be an integer in 1..65535"),
        (lambda: c.dataset_management(1, 257), "ranges=257 must be an integer in 1..256"),
        (lambda: c.migration_suspend(0x1_0000), "cntlid=65536 does not fit"),
        (lambda: c.set_controller_state(1, 2, 4, SequenceIndicator(7)), "7 is not a valid SequenceIndicator"),
    ],
)
def test_bad_values_are_named(call: Callable[[], object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()


u8, u16, u32, u64 = (st.integers(0, (1 << bits) - 1) for bits in (8, 16, 32, 64))
sqes = st.builds(Sqe, opcode=u8, cid=u16, nsid=u32, flags=u8, cdw2=u32, cdw3=u32, mptr=u64, prp1=u64, prp2=u64,
                 cdw10=u32, cdw11=u32, cdw12=u32, cdw13=u32, cdw14=u32, cdw15=u32)
cqes = st.builds(Cqe, cid=u16, sqid=u16, sqhd=u16, phase=st.integers(0, 1), sc=u8, sct=st.integers(0, 7),
                 crd=st.integers(0, 3), more=st.booleans(), dnr=st.booleans(), dw0=u32, dw1=u32)


@settings(max_examples=300)
@given(sqes)
def test_sqe_round_trip(sqe: Sqe) -> None:
    raw = sqe.encode()
    assert len(raw) == 64
    assert Sqe.decode(raw) == sqe
    assert int.from_bytes(raw[:4], "little") == sqe.cdw0


@settings(max_examples=300)
@given(st.binary(min_size=64, max_size=64))
def test_any_64_bytes_decode_and_re_encode(raw: bytes) -> None:
    assert Sqe.decode(raw).encode() == raw


@settings(max_examples=300)
@given(cqes)
def test_cqe_round_trip(cqe: Cqe) -> None:
    raw = cqe.encode()
    assert len(raw) == 16
    assert Cqe.decode(raw) == cqe
    assert cqe_status(raw) == cqe.status


@settings(max_examples=200)
@given(st.integers(0, (1 << 64) - 1), st.integers(1, 65536), u16, u32)
def test_rw_builders_place_slba_and_count(slba: int, blocks: int, cid: int, nsid: int) -> None:
    for build, opcode in ((c.read, 0x02), (c.write, 0x01), (c.write_zeroes, 0x08)):
        sqe = Sqe.decode(build(nsid, slba, blocks, cid=cid).encode())
        assert (sqe.opcode, sqe.cid, sqe.nsid) == (opcode, cid, nsid)
        assert sqe.cdw10 | sqe.cdw11 << 32 == slba
        assert (sqe.cdw12 & 0xFFFF) + 1 == blocks
