"""The emulated NVM subsystem driven by raw 64-byte commands: what it answers, byte for byte.

Every test talks to the model the way a driver would: encoded SQEs in, encoded CQEs and data out,
the change log read by phase tag from host memory.  Namespaces are real sparse files.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass
from pathlib import Path
from threading import RLock

import pytest

from agent.emulated.model.hostmem import PAGE_BYTES
from agent.emulated.model.namespace import NamespaceStore
from agent.emulated.model.subsystem import PRIMARY_CNTLID, NvmeSubsystemModel
from agent.nvme import cdq, spec
from agent.nvme import commands as c
from agent.nvme.commands import Cqe, Sqe
from agent.nvme.error_log import parse_error_detail
from agent.nvme.spec import LoggingAction, SequenceIndicator, Status
from agent.nvme.state_format import HEADER_BYTES, MAGIC, decode_state, encode_state

MIB = 1 << 20
BLOCK = 4096
NS_BLOCKS = 256  # 1 MiB namespaces
S = Status


def blk(fill: int, count: int = 1) -> bytes:
    return bytes([fill]) * (BLOCK * count)


@dataclass
class Subsystem:
    """A model with namespace 1 attached to the primary and to secondary ``vf``."""

    model: NvmeSubsystemModel
    store: NamespaceStore
    vf: int
    cid: int = 0

    def admin(self, cntlid: int, sqe: Sqe, data: bytes | None = None) -> tuple[Cqe, bytes]:
        raw, out = self.model.submit_admin(cntlid, sqe.encode(), data)
        return Cqe.decode(raw), out

    def io(self, cntlid: int, sqid: int, sqe: Sqe, data: bytes | None = None) -> tuple[Cqe, bytes]:
        raw, out = self.model.submit_io(cntlid, sqid, sqe.encode(), data)
        return Cqe.decode(raw), out

    def ok(self, cntlid: int, sqe: Sqe, data: bytes | None = None, sqid: int = 0) -> tuple[Cqe, bytes]:
        cqe, out = self.io(cntlid, sqid, sqe, data) if sqid else self.admin(cntlid, sqe, data)
        assert cqe.ok, f"{cqe.status_name}: {self.detail(cntlid)}"
        return cqe, out

    def fails(self, status: Status, cntlid: int, sqe: Sqe, data: bytes | None = None, sqid: int = 0,
              match: str = "") -> Cqe:
        """The command completes with ``status``, More set, and a detail text matching ``match``."""
        cqe, out = self.io(cntlid, sqid, sqe, data) if sqid else self.admin(cntlid, sqe, data)
        assert cqe.status == status, f"{cqe.status_name}: {self.detail(cntlid)}"
        assert cqe.more and out == b""
        if match:
            assert match in self.detail(cntlid)
        return cqe

    def detail(self, cntlid: int) -> str:
        _, page = self.model.submit_admin(cntlid, c.get_log_page(spec.LogPageId.ERROR_DETAIL, 4096).encode())
        return parse_error_detail(page)[1]

    def guest_boot(self, pairs: int = 1, entries: int = 16) -> None:
        self.model.enable_controller(self.vf, admin_entries=32, asq=0x10_0000, acq=0x20_0000)
        for qid in range(1, pairs + 1):
            self.ok(self.vf, c.create_io_cq(qid, entries, 0x100_0000 + qid * PAGE_BYTES, vector=qid))
            self.ok(self.vf, c.create_io_sq(qid, entries, 0x200_0000 + qid * PAGE_BYTES, qid))

    def host_io_queue(self) -> None:
        """An I/O queue pair on the primary: the migration host's own path to the namespace."""
        self.ok(PRIMARY_CNTLID, c.create_io_cq(1, 64, 0x300_0000))
        self.ok(PRIMARY_CNTLID, c.create_io_sq(1, 64, 0x400_0000, 1))


def build(tmp_path: Path, name: str = "vm1", *, file: str = "", resuming: bool = False,
          size: int = MIB) -> Subsystem:
    model = NvmeSubsystemModel(f"SN-{name}")
    store = NamespaceStore(tmp_path / (file or f"{name}.img"), size, create=True, lock=model.lock, label=name)
    vf = model.add_secondary(name, suspended=resuming)
    model.attach_namespace(1, store, (PRIMARY_CNTLID, vf))
    return Subsystem(model, store, vf)


@pytest.fixture
def sub(tmp_path: Path) -> Subsystem:
    s = build(tmp_path)
    s.guest_boot()
    return s


# ----- Identify ---------------------------------------------------------------------------------


def test_building_a_subsystem(sub: Subsystem, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"name='xxx.*' must be 0\.\.255 UTF-8 bytes"):
        sub.model.add_secondary("x" * 256)
    assert sub.model.add_secondary("vm2") == 2
    assert sub.model.add_secondary("") == 3  # an anonymous VF, as a real device's are
    foreign = NamespaceStore(tmp_path / "f.img", MIB, create=True, lock=RLock(), label="f")
    with pytest.raises(ValueError, match="must be built with this subsystem's lock"):
        sub.model.attach_namespace(2, foreign, [2])
    other = NamespaceStore(tmp_path / "o.img", MIB, create=True, lock=sub.model.lock, label="o")
    with pytest.raises(ValueError, match="nsid=1 already names another namespace"):
        sub.model.attach_namespace(1, other, [2])
    with pytest.raises(ValueError, match=r"nsid=17 must be 1\.\.16"):
        sub.model.attach_namespace(17, other, [2])


def test_identify_controller(sub: Subsystem) -> None:
    _, guest = sub.ok(sub.vf, c.identify_controller())
    _, host = sub.ok(PRIMARY_CNTLID, c.identify_controller())
    for page, cntlid in ((guest, sub.vf), (host, PRIMARY_CNTLID)):
        assert len(page) == 4096
        assert page[4:24] == b"SN-vm1".ljust(20)
        assert page[24:64].rstrip() == b"nvmigrate emulated NVMe controller"
        assert struct.unpack_from("<HI", page, 78) == (cntlid, 0x0002_0100)
        assert page[77] == 8  # MDTS: 1 MiB
        assert (page[512], page[513]) == (0x66, 0x44)
        assert struct.unpack_from("<IH", page, 516) == (16, spec.ONCS_DSM | spec.ONCS_WRITE_ZEROES)
        nqn = b"nqn.2024-01.io.nvmigrate:subsystem:SN-vm1"
        assert page[768 : 768 + len(nqn) + 1] == nqn + b"\0"
    # Only the migration controller advertises host managed live migration and change tracking.
    assert struct.unpack_from("<H", host, 256)[0] == spec.OACS_HMLMS == 1 << 11
    assert host[576] == spec.TRATTR_TUDCS and struct.unpack_from("<HH", host, 578) == (1, 1)
    assert struct.unpack_from("<H", guest, 256)[0] == 0 and guest[576] == 0
    # CMIC: bit 1 multiple controllers; bit 2 SR-IOV virtual function (bit 3 would be ANA reporting).
    assert spec.CMIC_SRIOV_VF == 1 << 2 and spec.CMIC_ANA_REPORTING == 1 << 3
    assert guest[76] == 0b0110 and host[76] == 0b0010


def test_identify_namespace_and_lists(sub: Subsystem, tmp_path: Path) -> None:
    _, ns = sub.ok(sub.vf, c.identify_namespace(1))
    assert struct.unpack_from("<QQQ", ns, 0) == (NS_BLOCKS, NS_BLOCKS, 0)  # NSZE, NCAP, NUSE: thin, empty
    assert ns[24] == spec.NSFEAT_THIN_PROVISIONING and ns[25] == 0 and ns[33] == 0x09
    assert struct.unpack_from("<I", ns, 128)[0] >> 16 & 0xFF == 12  # LBADS: 4096-byte blocks
    sub.ok(sub.vf, c.write(1, 0, 3), blk(1, 3), sqid=1)
    _, ns = sub.ok(sub.vf, c.identify_namespace(1))
    assert struct.unpack_from("<Q", ns, 16)[0] >= 3
    # Namespace 2 exists but is attached only to the primary: inactive for the guest.
    other = NamespaceStore(tmp_path / "two.img", 2 * MIB, create=True, lock=sub.model.lock, label="ns2")
    sub.model.attach_namespace(2, other, [PRIMARY_CNTLID])
    _, inactive = sub.ok(sub.vf, c.identify_namespace(2))
    assert inactive == bytes(4096)
    _, ns2 = sub.ok(PRIMARY_CNTLID, c.identify_namespace(2))
    assert struct.unpack_from("<Q", ns2, 0)[0] == 512
    for nsid in (0, 17, spec.BROADCAST_NSID):
        sub.fails(S.INVALID_NAMESPACE_OR_FORMAT, sub.vf, c.identify_namespace(nsid), match=f"nsid={nsid:#x}")
    _, guest_list = sub.ok(sub.vf, c.identify(spec.Cns.ACTIVE_NAMESPACES))
    _, host_list = sub.ok(PRIMARY_CNTLID, c.identify(spec.Cns.ACTIVE_NAMESPACES))
    _, after_one = sub.ok(PRIMARY_CNTLID, c.identify(spec.Cns.ACTIVE_NAMESPACES, nsid=1))
    assert guest_list[:12] == struct.pack("<III", 1, 0, 0)
    assert host_list[:12] == struct.pack("<III", 1, 2, 0)
    assert after_one[:8] == struct.pack("<II", 2, 0)
    sub.fails(S.INVALID_NAMESPACE_OR_FORMAT, sub.vf, c.identify(spec.Cns.ACTIVE_NAMESPACES, nsid=0xFFFF_FFFE))


def test_identify_state_formats_and_bad_cns(sub: Subsystem) -> None:
    _, formats = sub.ok(PRIMARY_CNTLID, c.identify(spec.Cns.SUPPORTED_CONTROLLER_STATE_FORMATS))
    assert formats[:4] == bytes([1, 0]) + struct.pack("<H", 1)  # NV=1, NUUID=0, version 1
    assert formats[4:] == bytes(4092)
    sub.fails(S.INVALID_FIELD, sub.vf, c.identify(spec.Cns.SUPPORTED_CONTROLLER_STATE_FORMATS), match="CNS=0x20")
    sub.fails(S.INVALID_FIELD, sub.vf, c.identify(0x13), match="CNS=0x13 is not supported")
    sub.fails(S.INVALID_FIELD, sub.vf, c.identify(spec.Cns.CONTROLLER, cntid=5), match="reserved bits 0x50000")
    sub.fails(S.INVALID_FIELD, sub.vf, c.identify(spec.Cns.CONTROLLER, nsid=1), match="nsid=0x1 on a command")
    sub.fails(S.INVALID_FIELD, sub.vf, Sqe(spec.AdminOpcode.IDENTIFY, cdw10=1, cdw14=0x7F), match="cdw14")


# ----- log pages ----------------------------------------------------------------------------------


def test_smart_log_and_the_health_hook(sub: Subsystem) -> None:
    for lba in range(3):
        sub.ok(sub.vf, c.write(1, lba * 10, 2), blk(lba, 2), sqid=1)
    sub.ok(sub.vf, c.read(1, 0, 1), sqid=1)
    _, page = sub.ok(sub.vf, c.get_log_page(spec.LogPageId.SMART_HEALTH, 512))
    assert page[0] == 0 and struct.unpack_from("<HBBB", page, 1) == (310, 100, 10, 0)
    u128 = lambda at: int.from_bytes(page[at : at + 16], "little")  # noqa: E731
    # 24 KiB written = 48 units of 512 bytes: one data unit (thousands, rounded up).
    assert (u128(32), u128(48), u128(64), u128(80), u128(112)) == (1, 1, 1, 3, 1)
    sub.model.set_health(temperature_k=350, available_spare=5, percentage_used=103, media_errors=7,
                         critical_warning=spec.CRITICAL_WARNING_RELIABILITY, bytes_written=2_000_000_000)
    _, page = sub.ok(sub.vf, c.get_log_page(spec.LogPageId.SMART_HEALTH, 512))
    assert page[0] == (spec.CRITICAL_WARNING_SPARE | spec.CRITICAL_WARNING_TEMPERATURE
                       | spec.CRITICAL_WARNING_RELIABILITY)
    assert struct.unpack_from("<HBBB", page, 1) == (350, 5, 10, 103)
    assert u128(48) == 3907 and u128(160) == 7
    # The temperature warning follows the controller's own threshold feature.
    sub.model.set_health(temperature_k=330, available_spare=50, critical_warning=0)
    _, page = sub.ok(sub.vf, c.get_log_page(spec.LogPageId.SMART_HEALTH, 512))
    assert page[0] == 0
    sub.ok(sub.vf, c.set_features(spec.FeatureId.TEMPERATURE_THRESHOLD, 320))
    _, page = sub.ok(sub.vf, c.get_log_page(spec.LogPageId.SMART_HEALTH, 512))
    assert page[0] == spec.CRITICAL_WARNING_TEMPERATURE
    _, tail = sub.ok(sub.vf, c.get_log_page(spec.LogPageId.SMART_HEALTH, 8, offset=504))
    assert tail == bytes(8)
    with pytest.raises(ValueError, match="unknown field 'temperature'"):
        sub.model.set_health(temperature=1)
    with pytest.raises(ValueError, match="available_spare=-1 must be a non-negative integer"):
        sub.model.set_health(available_spare=-1)


def test_get_log_page_errors_and_the_error_log(sub: Subsystem) -> None:
    sub.fails(S.INVALID_LOG_PAGE, sub.vf, c.get_log_page(0x05, 512), match="log page 0x05 is not supported")
    sub.fails(S.INVALID_FIELD, sub.vf, c.get_log_page(2, 512, nsid=1), match="nsid=0x1")
    sub.fails(S.INVALID_FIELD, sub.vf, c.get_log_page(2, 512, lsp=1), match="LSP")
    sub.fails(S.INVALID_FIELD, sub.vf, c.get_log_page(2, 512, offset=2), match="offset=2 is not dword aligned")
    sub.fails(S.INVALID_FIELD, sub.vf, c.get_log_page(2, 4, offset=512), match="offset=512 is at or past the end")
    sub.fails(S.INVALID_FIELD, sub.vf, c.get_log_page(2, 2 * MIB), match="exceeds the maximum data transfer")
    bad = sub.fails(S.INVALID_OPCODE, sub.vf, Sqe(0x7F, cid=0x4242))
    _, log = sub.ok(sub.vf, c.get_log_page(spec.LogPageId.ERROR_INFORMATION, 128))
    count, sqid, cid, status, location, _, nsid, vsia = struct.unpack_from("<QHHHHQIB", log, 0)
    assert (sqid, cid, status >> 1, location, nsid, vsia) == (0, 0x4242, bad.status, 0xFFFF, 0, 0xC0)
    assert count == 7 and struct.unpack_from("<Q", log, 64)[0] == 6  # newest first
    _, detail = sub.ok(sub.vf, c.get_log_page(spec.LogPageId.ERROR_DETAIL, 4096))
    assert parse_error_detail(detail) == (7, "opcode 0x7f is not a supported admin command")


# ----- features -----------------------------------------------------------------------------------


def test_features(tmp_path: Path) -> None:
    sub = build(tmp_path)
    sub.model.enable_controller(sub.vf, admin_entries=8, asq=0x1000, acq=0x2000)
    cqe, _ = sub.ok(sub.vf, c.set_number_of_queues(2, 100))
    assert cqe.dw0 == 1 | 62 << 16  # granted: 2 SQs, and CQs capped at the controller's 63
    cqe, _ = sub.ok(sub.vf, c.get_features(spec.FeatureId.NUMBER_OF_QUEUES))
    assert cqe.dw0 == 1 | 62 << 16
    sub.fails(S.INVALID_FIELD, sub.vf, c.set_features(spec.FeatureId.NUMBER_OF_QUEUES, 0xFFFF), match="FFFFh")
    sub.ok(sub.vf, c.create_io_cq(1, 4, 0x3000))
    sub.fails(S.COMMAND_SEQUENCE_ERROR, sub.vf, c.set_number_of_queues(4, 4), match="before any I/O queue")
    sub.fails(S.INVALID_QUEUE_IDENTIFIER, sub.vf, c.create_io_sq(3, 4, 0x4000, 1), match="within 1..2")
    # Temperature threshold: over (THSEL 0) and under (THSEL 1) of the composite temperature.
    sub.ok(sub.vf, c.set_features(spec.FeatureId.TEMPERATURE_THRESHOLD, 300 | 1 << 20))
    cqe, _ = sub.ok(sub.vf, c.get_features(spec.FeatureId.TEMPERATURE_THRESHOLD, cdw11=1 << 20))
    assert cqe.dw0 == 300 | 1 << 20
    cqe, _ = sub.ok(sub.vf, c.get_features(spec.FeatureId.TEMPERATURE_THRESHOLD))
    assert cqe.dw0 == 343
    sub.fails(S.INVALID_FIELD, sub.vf, c.set_features(spec.FeatureId.TEMPERATURE_THRESHOLD, 300 | 2 << 16),
              match="TMPSEL=2")
    sub.fails(S.INVALID_FIELD, sub.vf, c.set_features(spec.FeatureId.TEMPERATURE_THRESHOLD, 2 << 20), match="THSEL=2")
    sub.ok(sub.vf, c.set_features(spec.FeatureId.VOLATILE_WRITE_CACHE, 0))
    cqe, _ = sub.ok(sub.vf, c.get_features(spec.FeatureId.VOLATILE_WRITE_CACHE))
    assert cqe.dw0 == 0
    cqe, _ = sub.ok(sub.vf, c.get_features(spec.FeatureId.VOLATILE_WRITE_CACHE, sel=spec.FeatureSelect.DEFAULT))
    assert cqe.dw0 == 1
    cqe, _ = sub.ok(sub.vf, c.get_features(spec.FeatureId.ARBITRATION, sel=spec.FeatureSelect.SUPPORTED_CAPABILITIES))
    assert cqe.dw0 == spec.FEATURE_CAP_CHANGEABLE
    sub.fails(S.INVALID_FIELD, sub.vf, c.set_features(spec.FeatureId.VOLATILE_WRITE_CACHE, 3),
              match="reserved bits 0x2")
    sub.fails(S.FEATURE_NOT_SAVEABLE, sub.vf, c.set_features(spec.FeatureId.ARBITRATION, 0, save=True))
    sub.fails(S.INVALID_FIELD, sub.vf, c.set_features(0x0C, 0), match="feature id 0x0c is not supported")
    sub.fails(S.INVALID_FIELD, sub.vf, c.get_features(spec.FeatureId.ARBITRATION, sel=4), match="SEL=4")
    sub.fails(S.INVALID_FIELD, sub.vf, c.get_cdq_pointers(1), match="only on the migration controller")


# ----- queues and the command path ----------------------------------------------------------------


def test_queue_creation_errors(sub: Subsystem) -> None:
    sub.fails(S.INVALID_QUEUE_IDENTIFIER, sub.vf, c.create_io_cq(1, 16, 0x5000), match="completion queue id 1")
    sub.fails(S.INVALID_QUEUE_SIZE, sub.vf, c.create_io_cq(2, 2048, 0x5000), match="2048 entries")
    sub.fails(S.INVALID_FIELD, sub.vf, c.create_io_cq(2, 16, 0x5000, contiguous=False), match="PC=0")
    sub.fails(S.PRP_OFFSET_INVALID, sub.vf, c.create_io_cq(2, 16, 0x5004), match="prp1=0x5004")
    sub.fails(S.INVALID_INTERRUPT_VECTOR, sub.vf, c.create_io_cq(2, 16, 0x5000, vector=64))
    sub.fails(S.COMPLETION_QUEUE_INVALID, sub.vf, c.create_io_sq(2, 16, 0x6000, 9), match="completion queue 9")
    sub.fails(S.INVALID_QUEUE_DELETION, sub.vf, c.delete_io_cq(1), match="still serves submission queue(s) [1]")
    sub.fails(S.INVALID_QUEUE_IDENTIFIER, sub.vf, c.delete_io_sq(0))
    sub.ok(sub.vf, c.delete_io_sq(1))
    sub.ok(sub.vf, c.delete_io_cq(1))
    assert sub.model.controller_state(sub.vf).submission_queues[-1].qid == 0
    with pytest.raises(ValueError, match="controller 1 has no submission queue 1"):
        sub.io(sub.vf, 1, c.read(1, 0, 1))
    with pytest.raises(ValueError, match="sqid=0 is the admin submission queue"):
        sub.io(sub.vf, 0, c.read(1, 0, 1))
    with pytest.raises(ValueError, match=r"cntlid=9 names no controller of this subsystem \(controllers: \[0, 1\]\)"):
        sub.admin(9, c.identify_controller())


def test_completions_carry_queue_position_and_phase(tmp_path: Path) -> None:
    sub = build(tmp_path)
    sub.guest_boot(entries=2)  # two-slot queues: the phase tag flips every second completion
    seen = []
    for n in range(5):
        cqe, _ = sub.ok(sub.vf, c.write(1, n, 1, cid=100 + n), blk(n), sqid=1)
        seen.append((cqe.cid, cqe.sqid, cqe.sqhd, cqe.phase))
    assert seen == [(100, 1, 1, 1), (101, 1, 0, 1), (102, 1, 1, 0), (103, 1, 0, 0), (104, 1, 1, 1)]
    cq = sub.model.controller_state(sub.vf).completion_queues[1]
    assert (cq.head, cq.tail, cq.attributes >> 2 & 1) == (1, 1, 1)


def test_io_commands(sub: Subsystem) -> None:
    sub.ok(sub.vf, c.write(1, 10, 2), blk(7, 2), sqid=1)
    _, data = sub.ok(sub.vf, c.read(1, 10, 3), sqid=1)
    assert data == blk(7, 2) + bytes(BLOCK)
    sub.ok(sub.vf, c.write(1, 20, 1, fua=True), blk(8), sqid=1)
    sub.ok(sub.vf, c.flush(), sqid=1)
    sub.ok(sub.vf, c.flush(1), sqid=1)
    assert sub.store.extents() == [(10 * BLOCK, 2 * BLOCK), (20 * BLOCK, BLOCK)]
    # Write Zeroes without DEAC keeps the blocks allocated; with DEAC they become a hole.
    sub.ok(sub.vf, c.write_zeroes(1, 10, 1), sqid=1)
    assert sub.store.extents() == [(10 * BLOCK, 2 * BLOCK), (20 * BLOCK, BLOCK)]
    sub.ok(sub.vf, c.write_zeroes(1, 11, 1, deallocate=True), sqid=1)
    assert sub.store.extents() == [(10 * BLOCK, BLOCK), (20 * BLOCK, BLOCK)]
    _, data = sub.ok(sub.vf, c.read(1, 10, 2), sqid=1)
    assert data == bytes(2 * BLOCK)
    # Dataset Management: deallocate punches holes; without AD it is advice and changes nothing.
    sub.ok(sub.vf, c.dataset_management(1, 1, deallocate=False), c.dsm_ranges([(20, 1)]), sqid=1)
    assert sub.store.read(20 * BLOCK, 1) == b"\x08"
    sub.ok(sub.vf, c.dataset_management(1, 2), c.dsm_ranges([(20, 1), (30, 0)]), sqid=1)
    assert sub.store.extents() == [(10 * BLOCK, BLOCK)]


@pytest.mark.parametrize(
    ("sqe", "data", "status", "match"),
    [
        (c.write(1, 255, 2), blk(1, 2), S.LBA_OUT_OF_RANGE, "lba 255..256 is outside namespace 1 (lba 0..255)"),
        (c.read(1, 1 << 40, 1), None, S.LBA_OUT_OF_RANGE, "lba 1099511627776"),
        (c.write(1, 0, 2), blk(1), S.DATA_TRANSFER_ERROR, "describes 8192 bytes of data, the host buffer holds 4096"),
        (c.write(1, 0, 1), None, S.DATA_TRANSFER_ERROR, "the host buffer holds 0"),
        (c.read(1, 0, 257), None, S.LBA_OUT_OF_RANGE, "lba 0..256"),
        (c.read(1, 0, 300), None, S.LBA_OUT_OF_RANGE, ""),
        (c.write(0, 0, 1), blk(1), S.INVALID_NAMESPACE_OR_FORMAT, "nsid=0x0 is not a namespace id"),
        (c.read(17, 0, 1), None, S.INVALID_NAMESPACE_OR_FORMAT, "nsid=0x11"),
        (c.read(2, 0, 1), None, S.INVALID_FIELD, "namespace 2 is not attached to controller 1 (attached: [1])"),
        (Sqe(spec.IoOpcode.READ, nsid=1, cdw12=1 << 26), None, S.INVALID_FIELD, "cdw12=0x04000000 has reserved bits"),
        (Sqe(spec.IoOpcode.READ, nsid=1, cdw13=0x10000), None, S.INVALID_FIELD, "cdw13"),
        (Sqe(spec.IoOpcode.READ, nsid=1, flags=0x01), None, S.INVALID_FIELD, "FUSE=1"),
        (Sqe(spec.IoOpcode.READ, nsid=1, flags=0x40), None, S.INVALID_FIELD, "PSDT=1: SGLs are not supported"),
        (Sqe(spec.IoOpcode.READ, nsid=1, flags=0x04), None, S.INVALID_FIELD, "CDW0 bits 15:8=0x00000004"),
        (Sqe(0x7F, nsid=1), None, S.INVALID_OPCODE, "opcode 0x7f is not a supported I/O command"),
        (c.dataset_management(1, 2), c.dsm_ranges([(0, 1)]), S.DATA_TRANSFER_ERROR, "NR=1"),
        (c.dataset_management(1, 2), c.dsm_ranges([(0, 1), (250, 7)]), S.LBA_OUT_OF_RANGE, "range lba 250 + 7"),
        (Sqe(spec.IoOpcode.FLUSH, nsid=1, cdw10=1), None, S.INVALID_FIELD, "cdw10"),
        (Sqe(spec.IoOpcode.WRITE_ZEROES, nsid=1, cdw12=1 << 26), None, S.INVALID_FIELD, "cdw12"),
    ],
)
def test_malformed_io_commands(sub: Subsystem, tmp_path: Path, sqe: Sqe, data: bytes | None, status: Status,
                               match: str) -> None:
    other = NamespaceStore(tmp_path / "two.img", MIB, create=True, lock=sub.model.lock, label="ns2")
    sub.model.attach_namespace(2, other, [PRIMARY_CNTLID])
    sub.ok(sub.vf, c.write(1, 0, 1), blk(9), sqid=1)
    before = sub.store.digest()
    cqe = sub.fails(status, sub.vf, sqe, data, sqid=1, match=match)
    assert cqe.dnr
    assert sub.store.digest() == before  # a refused command changes nothing


def test_the_read_limit_is_mdts(sub: Subsystem, tmp_path: Path) -> None:
    big = build(tmp_path, "big", size=4 * MIB)
    big.guest_boot()
    big.fails(S.INVALID_FIELD, big.vf, c.read(1, 0, 257), sqid=1, match="exceeds the maximum data transfer size")
    _, data = big.ok(big.vf, c.read(1, 0, 256), sqid=1)
    assert len(data) == MIB


def test_migration_commands_from_a_guest_are_invalid_opcodes(sub: Subsystem) -> None:
    for sqe in (c.track_send(1, LoggingAction.START), Sqe(spec.AdminOpcode.TRACK_RECEIVE),
                c.migration_suspend(sub.vf), c.migration_resume(sub.vf),
                c.get_controller_state(sub.vf, 0, 4096), c.cdq_create(sub.vf, 16, 0x1000), c.cdq_delete(1)):
        sub.fails(S.INVALID_OPCODE, sub.vf, sqe, match="is a migration controller command; controller 1 is a "
                                                       "migratable (secondary) controller")
    assert not sub.model.suspended(sub.vf)


def test_a_suspended_controller_fetches_nothing(sub: Subsystem) -> None:
    sub.ok(PRIMARY_CNTLID, c.migration_suspend(sub.vf, suspend_type=spec.SuspendType.NOTIFICATION))
    assert not sub.model.suspended(sub.vf)
    sub.ok(PRIMARY_CNTLID, c.migration_suspend(sub.vf))
    sub.ok(PRIMARY_CNTLID, c.migration_suspend(sub.vf))  # idempotent
    before = sub.model.controller_state(sub.vf)
    for cqe, _ in (sub.io(sub.vf, 1, c.write(1, 0, 1), blk(1)), sub.admin(sub.vf, c.identify_controller())):
        assert cqe.status == S.NAMESPACE_NOT_READY and not cqe.dnr and not cqe.more
    assert sub.model.controller_state(sub.vf) == before  # no queue moved
    assert sub.store.extents() == []
    sub.ok(PRIMARY_CNTLID, c.migration_resume(sub.vf))
    sub.ok(sub.vf, c.write(1, 0, 1), blk(1), sqid=1)
    sub.fails(S.INVALID_CONTROLLER_IDENTIFIER, PRIMARY_CNTLID, c.migration_suspend(PRIMARY_CNTLID),
              match="cntlid=0 is not a migratable controller of this subsystem (migratable: [1])")
    sub.fails(S.INVALID_FIELD, PRIMARY_CNTLID, Sqe(spec.AdminOpcode.MIGRATION_SEND, cdw11=sub.vf | 2 << 16),
              match="STYPE=2")
    sub.fails(S.INVALID_FIELD, PRIMARY_CNTLID, Sqe(spec.AdminOpcode.MIGRATION_SEND, cdw10=3, cdw11=1), match="SEL=3")
    sub.fails(S.INVALID_FIELD, PRIMARY_CNTLID, Sqe(spec.AdminOpcode.MIGRATION_SEND, cdw10=0x100, cdw11=1),
              match="cdw10=0x00000100 has reserved bits")
    sub.fails(S.INVALID_FIELD, PRIMARY_CNTLID, Sqe(spec.AdminOpcode.MIGRATION_SEND, cdw10=1, cdw11=1 | 1 << 16))


# ----- the Controller Data Queue ------------------------------------------------------------------


@dataclass
class Log:
    """A user data migration queue as the host sees it."""

    sub: Subsystem
    cdqid: int
    reader: cdq.CdqReader

    def entries(self) -> list[cdq.UdmqEntry]:
        """Get Features 21h (posts the open range), read by phase tag, hand the slots back."""
        cqe, data = self.sub.ok(PRIMARY_CNTLID, c.get_cdq_pointers(self.cdqid))
        # The answer is the 8-byte {head pointer, tail pointer trigger}, not the completion dwords.
        assert len(data) == 8 and (cqe.dw0, cqe.dw1) == (0, 0)
        assert cdq.decode_pointers(data) == (self.reader.head, 0)
        out = [cdq.UdmqEntry(n, s, nlb, a & 1, *cdq.describe(a)) for n, s, nlb, a in self.reader.take()]
        self.sub.ok(PRIMARY_CNTLID, c.set_cdq_head(self.cdqid, self.reader.head))
        return out


def open_log(sub: Subsystem, entries: int = 64, start: bool = True) -> Log:
    address = sub.model.host_memory.allocate(entries * 32)
    cqe, _ = sub.ok(PRIMARY_CNTLID, c.cdq_create(sub.vf, entries * 8, address))
    if start:
        sub.ok(PRIMARY_CNTLID, c.track_send(cqe.dw0, LoggingAction.START))
    return Log(sub, cqe.dw0, cdq.CdqReader(sub.model.host_memory.view(address, entries * 32), entries))


def test_changes_are_logged_and_coalesced(sub: Subsystem) -> None:
    sub.ok(sub.vf, c.write(1, 0, 1), blk(1), sqid=1)  # before logging: not reported
    log = open_log(sub)
    assert log.cdqid == 1
    for lba in (5, 6, 7):  # a sequential writer: one entry
        sub.ok(sub.vf, c.write(1, lba, 1), blk(lba), sqid=1)
    sub.ok(sub.vf, c.write(1, 40, 2), blk(1, 2), sqid=1)
    sub.ok(sub.vf, c.read(1, 40, 2), sqid=1)  # reads change nothing
    sub.ok(sub.vf, c.write_zeroes(1, 50, 3, deallocate=True), sqid=1)
    sub.ok(sub.vf, c.dataset_management(1, 1), c.dsm_ranges([(53, 2)]), sqid=1)  # adjacent, same kind
    sub.ok(sub.vf, c.write_zeroes(1, 60, 1), sqid=1)
    got = [(e.nsid, e.slba, e.blocks, e.sequence, e.change, e.deallocated) for e in log.entries()]
    assert got == [
        (1, 5, 3, cdq.EntrySequence.FIRST, cdq.LbaChange.RANGE_VALID, False),
        (1, 40, 2, cdq.EntrySequence.NONE, cdq.LbaChange.RANGE_VALID, False),
        (1, 50, 5, cdq.EntrySequence.NONE, cdq.LbaChange.RANGE_VALID, True),
        (1, 60, 1, cdq.EntrySequence.NONE, cdq.LbaChange.RANGE_VALID, False),
    ]
    assert log.entries() == []
    # Writes by the migration host itself (the primary) are not the migratable controller's changes.
    sub.host_io_queue()
    sub.ok(PRIMARY_CNTLID, c.write(1, 70, 1), blk(2), sqid=1)
    sub.ok(PRIMARY_CNTLID, c.track_send(log.cdqid, LoggingAction.STOP))
    entries = log.entries()
    assert [(e.sequence, e.change) for e in entries] == [(cdq.EntrySequence.LAST_STOPPED, cdq.LbaChange.NONE)]


def test_suspend_ends_logging_and_dudmq_deletes_the_queue(sub: Subsystem) -> None:
    log = open_log(sub)
    sub.ok(sub.vf, c.write(1, 9, 1), blk(1), sqid=1)
    sub.ok(PRIMARY_CNTLID, c.migration_suspend(sub.vf))
    assert [(e.slba, e.sequence) for e in log.entries()] == [(9, cdq.EntrySequence.LAST_SUSPENDED)]
    sub.fails(S.CONTROLLER_SUSPENDED, PRIMARY_CNTLID, c.track_send(log.cdqid, LoggingAction.START),
              match="controller 1 is suspended")
    sub.ok(PRIMARY_CNTLID, c.track_send(log.cdqid, LoggingAction.STOP))  # stopping is always allowed
    sub.ok(PRIMARY_CNTLID, c.migration_suspend(sub.vf, delete_udmq=True))
    sub.fails(S.INVALID_CONTROLLER_DATA_QUEUE, PRIMARY_CNTLID, c.get_cdq_pointers(log.cdqid),
              match="cdqid=1 names no controller data queue (existing: [])")


def test_a_full_change_log_reports_all_lbas_changed(sub: Subsystem) -> None:
    log = open_log(sub, entries=4)
    for lba in (0, 10, 20, 30, 40):
        sub.ok(sub.vf, c.write(1, lba, 1), blk(1), sqid=1)
    sub.fails(S.CONTROLLER_DATA_QUEUE_FULL, PRIMARY_CNTLID, c.track_send(log.cdqid, LoggingAction.START),
              match="4-entry queue is full")
    entries = log.entries()
    assert [(e.slba, e.change) for e in entries[:2]] == [(0, cdq.LbaChange.RANGE_VALID),
                                                         (10, cdq.LbaChange.RANGE_VALID)]
    assert (entries[2].sequence, entries[2].change) == (cdq.EntrySequence.LAST_QUEUE_FULL, cdq.LbaChange.ALL_CHANGED)
    sub.ok(PRIMARY_CNTLID, c.track_send(log.cdqid, LoggingAction.START))
    sub.ok(sub.vf, c.write(1, 99, 1), blk(1), sqid=1)
    assert [(e.slba, e.sequence) for e in log.entries()] == [(99, cdq.EntrySequence.FIRST)]


def test_cdq_command_errors(sub: Subsystem) -> None:
    memory = sub.model.host_memory
    address = memory.allocate(PAGE_BYTES)
    host = PRIMARY_CNTLID
    sub.fails(S.INVALID_FIELD, host, c.cdq_create(sub.vf, 128, address, contiguous=False), match="PC=0")
    sub.fails(S.INVALID_FIELD, host, c.cdq_create(sub.vf, 12, address), match="queue size 12 dwords")
    sub.fails(S.INVALID_FIELD, host, Sqe(spec.AdminOpcode.CONTROLLER_DATA_QUEUE, prp1=address, cdw10=1 << 16,
                                         cdw11=1 | sub.vf << 16, cdw12=128), match="queue type 1 is not supported")
    sub.fails(S.INVALID_CONTROLLER_IDENTIFIER, host, c.cdq_create(0, 128, address), match="cntlid=0")
    sub.fails(S.INVALID_CONTROLLER_IDENTIFIER, host, c.cdq_create(7, 128, address), match="cntlid=7")
    sub.fails(S.PRP_OFFSET_INVALID, host, c.cdq_create(sub.vf, 128, address + 8), match="not page aligned")
    sub.fails(S.DATA_TRANSFER_ERROR, host, c.cdq_create(sub.vf, 2048, address), match="no allocated region covers")
    sub.fails(S.NOT_ENOUGH_RESOURCES, host, c.cdq_create(sub.vf, 8 << 23, address), match="larger than")
    cqe, _ = sub.ok(host, c.cdq_create(sub.vf, 128, address))
    sub.fails(S.NOT_ENOUGH_RESOURCES, host, c.cdq_create(sub.vf, 128, address), match="already has 1")
    sub.fails(S.INVALID_CONTROLLER_DATA_QUEUE, host, c.track_send(cqe.dw0 + 1, LoggingAction.START))
    sub.fails(S.INVALID_FIELD, host, Sqe(spec.AdminOpcode.TRACK_SEND, cdw10=2 << 16, cdw11=cqe.dw0), match="LACT=2")
    sub.fails(S.INVALID_FIELD, host, Sqe(spec.AdminOpcode.TRACK_SEND, cdw10=1, cdw11=cqe.dw0),
              match="Track Send SEL=1")
    sub.fails(S.INVALID_FIELD, host, Sqe(spec.AdminOpcode.TRACK_RECEIVE), match="host memory change tracking")
    sub.fails(S.INVALID_FIELD, host, c.set_cdq_head(cqe.dw0, 3), match="head pointer 3 passes the tail 0")
    sub.fails(S.INVALID_FIELD, host, c.set_cdq_head(cqe.dw0, 0, tail_trigger=16),
              match="tail pointer trigger 16 is outside the 16-entry queue")
    sub.fails(S.INVALID_FIELD, host, c.set_features(spec.FeatureId.CONTROLLER_DATA_QUEUE, cqe.dw0, cdw13=5),
              match="without ETPT")
    sub.fails(S.INVALID_FIELD, host, Sqe(spec.AdminOpcode.CONTROLLER_DATA_QUEUE, cdw10=2), match="SEL=2")
    sub.ok(host, c.cdq_delete(cqe.dw0))
    sub.fails(S.INVALID_CONTROLLER_DATA_QUEUE, host, c.cdq_delete(cqe.dw0))


def test_the_cdq_feature_answers_in_data_and_keeps_the_tail_pointer_trigger(sub: Subsystem) -> None:
    log = open_log(sub, entries=16)
    for lba in (1, 5, 9):
        sub.ok(sub.vf, c.write(1, lba, 1), blk(1), sqid=1)
    cqe, data = sub.ok(PRIMARY_CNTLID, c.get_cdq_pointers(log.cdqid))
    assert (cqe.dw0, cqe.dw1, cdq.decode_pointers(data)) == (0, 0, (0, 0))
    taken = list(log.reader.take())
    assert [slba for _, slba, _, _ in taken] == [1, 5, 9]
    sub.ok(PRIMARY_CNTLID, c.set_cdq_head(log.cdqid, log.reader.head, tail_trigger=12))
    _, data = sub.ok(PRIMARY_CNTLID, c.get_cdq_pointers(log.cdqid))
    assert cdq.decode_pointers(data) == (3, 12)
    sub.ok(PRIMARY_CNTLID, c.set_cdq_head(log.cdqid, 3))  # no ETPT: the trigger stays as it was
    _, data = sub.ok(PRIMARY_CNTLID, c.get_cdq_pointers(log.cdqid))
    assert cdq.decode_pointers(data) == (3, 12)
    with pytest.raises(ValueError, match="needs an 8-byte data buffer"):
        cdq.decode_pointers(b"")


# ----- controller state ---------------------------------------------------------------------------


def get_state(sub: Subsystem, piece: int = 64) -> tuple[bytes, list[int]]:
    """Get Controller State in ``piece``-byte pieces; returns the container and each CSUP bit."""
    cqe, first = sub.ok(PRIMARY_CNTLID, c.get_controller_state(sub.vf, 0, piece))
    total = HEADER_BYTES + struct.unpack_from("<I", first, 12)[0]
    blob, csup = bytearray(first), [cqe.dw0 & 1]
    while len(blob) < total:
        cqe, more = sub.ok(PRIMARY_CNTLID, c.get_controller_state(sub.vf, len(blob), piece))
        blob += more
        csup.append(cqe.dw0 & 1)
    return bytes(blob[:total]), csup


def set_state(sub: Subsystem, stream: bytes, piece: int = 64) -> Cqe:
    """Set Controller State in pieces; returns the completion of the last piece sent."""
    stream += bytes(-len(stream) % 4)
    offsets = list(range(0, len(stream), piece))
    cqe = Cqe(cid=0)
    for n, offset in enumerate(offsets):
        sequence = (SequenceIndicator.ENTIRE if len(offsets) == 1 else SequenceIndicator.FIRST if n == 0
                    else SequenceIndicator.LAST if n == len(offsets) - 1 else SequenceIndicator.MIDDLE)
        chunk = stream[offset : offset + piece]
        cqe, _ = sub.admin(PRIMARY_CNTLID, c.set_controller_state(sub.vf, offset, len(chunk), sequence), chunk)
        if not cqe.ok:
            break
    return cqe


def test_get_controller_state_in_pieces(sub: Subsystem) -> None:
    running, csup = get_state(sub)
    assert set(csup) == {0}  # CSUP: not suspended
    assert decode_state(running) == sub.model.controller_state(sub.vf)
    sub.ok(PRIMARY_CNTLID, c.migration_suspend(sub.vf))
    blob, csup = get_state(sub, piece=20)
    assert set(csup) == {1} and len(csup) > 3
    assert blob == encode_state(sub.model.controller_state(sub.vf))
    _, whole = sub.ok(PRIMARY_CNTLID, c.get_controller_state(sub.vf, 0, 4096))
    assert whole[: len(blob)] == blob and whole[len(blob):] == bytes(4096 - len(blob))  # zero filled
    host = PRIMARY_CNTLID
    sub.fails(S.INVALID_FIELD, host, c.get_controller_state(sub.vf, 0, 2 * MIB), match="NUMD=524287")
    sub.fails(S.INVALID_FIELD, host, c.get_controller_state(sub.vf, 4096, 4), match="offset=4096 is at or past")
    sub.fails(S.INVALID_FIELD, host, c.get_controller_state(sub.vf, 2, 4), match="offset=2 is not dword aligned")
    sub.fails(S.INVALID_FIELD, host, c.get_controller_state(sub.vf, 0, 4, csvi=1), match="CSVI=1")
    sub.fails(S.INVALID_FIELD, host, c.get_controller_state(sub.vf, 0, 4, csuuidi=1), match="CSUUIDI=1")
    sub.fails(S.INVALID_FIELD, host, c.get_controller_state(sub.vf, 0, 4, csuidxp=2), match="CSUIDXP=2")
    sub.fails(S.INVALID_FIELD, host, c.get_controller_state(sub.vf, 0, 4, uuid_index=3), match="UIDX=3")
    sub.fails(S.INVALID_FIELD, host, Sqe(spec.AdminOpcode.MIGRATION_RECEIVE, cdw10=1, cdw11=sub.vf), match="SEL=1")
    sub.fails(S.INVALID_CONTROLLER_IDENTIFIER, host, c.get_controller_state(5, 0, 4))


def _reheader(payload: bytes, version: int = 1) -> bytes:
    return struct.pack("<8sHHI32s", MAGIC, version, 0, len(payload), hashlib.sha256(payload).digest()) + payload


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda b: b[:-1] + bytes([b[-1] ^ 0x01]), "checksum mismatch"),
        (lambda b: b[:30] + bytes([b[30] ^ 0xFF]) + b[31:], "checksum mismatch"),
        (lambda b: b"NOTMAGIC" + b[8:], "bad magic b'NOTMAGIC'"),
        (lambda b: _reheader(b[HEADER_BYTES:], version=2), "format version 2 is unsupported (supported: 1)"),
        (lambda b: b[:-8], "truncated: the container is"),
        (lambda b: b[:40], "truncated: 40 bytes, the header alone is 48"),
        (lambda b: b + bytes(8), "bytes after the"),
        (lambda b: b + b"\x01", "bytes after the"),
        (lambda b: _reheader(b[HEADER_BYTES:-24]), "queue entry"),
    ],
)
def test_set_controller_state_rejects_a_bad_container_and_changes_nothing(tmp_path: Path, mutate: object,
                                                                          match: str) -> None:
    src = build(tmp_path, "vm1", file="src.img")
    src.guest_boot(pairs=2)
    src.ok(PRIMARY_CNTLID, c.migration_suspend(src.vf))
    blob, _ = get_state(src)
    dst = build(tmp_path, "vm1", file="dst.img", resuming=True)
    before = dst.model.controller_state(dst.vf)
    cqe = set_state(dst, mutate(blob), piece=32)  # type: ignore[operator]
    assert cqe.status == S.INVALID_FIELD and cqe.more
    assert match in dst.detail(PRIMARY_CNTLID)
    assert dst.model.controller_state(dst.vf) == before
    assert set_state(dst, blob, piece=32).ok  # the good one still goes in afterwards
    assert dst.model.controller_state(dst.vf) == src.model.controller_state(src.vf)


def test_set_controller_state_sequence_rules(tmp_path: Path) -> None:
    src = build(tmp_path, "vm1", file="src.img")
    src.guest_boot()
    src.ok(PRIMARY_CNTLID, c.migration_suspend(src.vf))
    blob, _ = get_state(src)
    stream = blob + bytes(-len(blob) % 4)
    dst = build(tmp_path, "vm1", file="dst.img", resuming=True)
    host, vf = PRIMARY_CNTLID, dst.vf
    dst.fails(S.COMMAND_SEQUENCE_ERROR, host, c.set_controller_state(vf, 0, 8, SequenceIndicator.MIDDLE), stream[:8],
              match="MIDDLE piece of controller state arrived before a FIRST piece")
    dst.fails(S.INVALID_FIELD, host, c.set_controller_state(vf, 8, 8, SequenceIndicator.FIRST), stream[8:16],
              match="offset=8 on a FIRST piece")
    dst.ok(host, c.set_controller_state(vf, 0, 8, SequenceIndicator.FIRST), stream[:8])
    dst.fails(S.INVALID_FIELD, host, c.set_controller_state(vf, 16, 8, SequenceIndicator.MIDDLE), stream[16:24],
              match="offset=16, but 8 bytes have arrived")
    dst.fails(S.DATA_TRANSFER_ERROR, host, c.set_controller_state(vf, 8, 8, SequenceIndicator.MIDDLE), stream[8:12])
    dst.fails(S.INVALID_FIELD, host, Sqe(spec.AdminOpcode.MIGRATION_SEND, cdw10=2 | 1 << 16, cdw11=vf), b"",
              match="NUMD=0")
    dst.fails(S.INVALID_FIELD, host, c.set_controller_state(vf, 0, 2 * MIB, SequenceIndicator.FIRST),
              bytes(2 * MIB), match="exceeds the maximum data transfer size")
    dst.fails(S.INVALID_FIELD, host, c.set_controller_state(vf, 0, 4, SequenceIndicator.ENTIRE, csvi=1),
              stream[:4], match="CSVI=1")
    dst.ok(host, c.set_controller_state(vf, 8, len(stream) - 8, SequenceIndicator.LAST), stream[8:])
    assert dst.model.controller_state(vf) == src.model.controller_state(src.vf)
    # Setting state needs a suspended controller; identity and size must match.
    dst.ok(host, c.migration_resume(vf))
    dst.fails(S.CONTROLLER_NOT_SUSPENDED, host, c.set_controller_state(vf, 0, len(stream), SequenceIndicator.ENTIRE),
              stream, match="controller 1 is running")
    other = build(tmp_path, "vm2", resuming=True)
    assert set_state(other, blob).status == S.INVALID_FIELD
    assert "controller state is for controller 'vm1', not 'vm2'" in other.detail(PRIMARY_CNTLID)
    bigger = build(tmp_path, "vm1", file="big.img", resuming=True, size=2 * MIB)
    assert set_state(bigger, blob).status == S.INVALID_FIELD
    assert "namespace_bytes=1048576, but controller vm1 has 2097152" in bigger.detail(PRIMARY_CNTLID)


def test_an_anonymous_vf_names_no_controller_and_takes_a_named_state(tmp_path: Path) -> None:
    anonymous = build(tmp_path, "", file="anonymous.img")
    anonymous.guest_boot()
    anonymous.ok(PRIMARY_CNTLID, c.migration_suspend(anonymous.vf))
    blob, _ = get_state(anonymous)
    assert decode_state(blob).controller_id == ""
    named = build(tmp_path, "vm1", file="named.img", resuming=True)
    assert set_state(named, blob).ok  # nothing to compare: the state names no controller
    assert named.model.controller_state(named.vf).controller_id == "vm1"  # and it keeps its own name
    named.ok(PRIMARY_CNTLID, c.migration_resume(named.vf))
    named.ok(PRIMARY_CNTLID, c.migration_suspend(named.vf))
    named_blob, _ = get_state(named)
    pool_vf = build(tmp_path, "", file="pool.img", resuming=True)
    assert set_state(pool_vf, named_blob).ok
    assert pool_vf.model.controller_state(pool_vf.vf).controller_id == ""  # it adopts no identity
    assert pool_vf.model.controller_state(pool_vf.vf).submission_queues == decode_state(named_blob).submission_queues


def test_a_state_with_an_unbound_queue_is_refused(tmp_path: Path) -> None:
    src = build(tmp_path, "vm1", file="src.img")
    src.guest_boot()
    state = src.model.controller_state(src.vf)
    orphan = state.submission_queues[1].__class__(7, 0x9000, 16, 0, 0, 1 | 9 << 16)
    broken = state.__class__(state.controller_id, state.namespace_bytes, state.registers,
                             (*state.submission_queues, orphan), state.completion_queues)
    dst = build(tmp_path, "vm1", file="dst.img", resuming=True)
    assert set_state(dst, encode_state(broken)).status == S.INVALID_FIELD
    assert "submission queue 7 is bound to completion queue 9" in dst.detail(PRIMARY_CNTLID)


# ----- a whole migration by raw commands ------------------------------------------------------------


def test_migration_by_raw_commands(tmp_path: Path) -> None:
    """Source and destination subsystems; the host moves the guest's controller with raw commands:
    change log on, full copy, a dirty round, suspend, last changes, state in pieces, resume."""
    src = build(tmp_path, "vm1", file="src.img", size=2 * MIB)
    src.guest_boot(pairs=2)
    dst = build(tmp_path, "vm1", file="dst.img", size=2 * MIB, resuming=True)
    src.host_io_queue()
    dst.host_io_queue()
    guest_sq = iter(int(n) for n in "12" * 1000)
    for n in range(40):
        src.ok(src.vf, c.write(1, n * 3, 1), blk(n), sqid=next(guest_sq))

    def copy(slba: int, blocks: int) -> None:
        """Read on the source host queue, write on the destination host queue, at most MDTS each."""
        for first in range(slba, slba + blocks, 256):
            count = min(256, slba + blocks - first)
            _, data = src.ok(PRIMARY_CNTLID, c.read(1, first, count), sqid=1)
            dst.ok(PRIMARY_CNTLID, c.write(1, first, count), data, sqid=1)

    overflows = 0

    def apply(entries: list[cdq.UdmqEntry]) -> None:
        nonlocal overflows
        if any(e.sequence == cdq.EntrySequence.LAST_QUEUE_FULL for e in entries):
            # Logging stopped with "all LBAs changed": turn it back on first, then copy everything.
            overflows += 1
            if not src.model.suspended(src.vf):
                src.ok(PRIMARY_CNTLID, c.track_send(log.cdqid, LoggingAction.START))
        for e in entries:
            if e.change == cdq.LbaChange.ALL_CHANGED:
                copy(0, 2 * NS_BLOCKS)
            elif e.change == cdq.LbaChange.RANGE_VALID:
                copy(e.slba, e.blocks)

    log = open_log(src, entries=16)  # small on purpose: the full copy below overflows it
    for offset, length in src.store.extents():  # the full copy, while the guest keeps writing
        copy(offset // BLOCK, length // BLOCK)
        src.ok(src.vf, c.write(1, 300 + offset // BLOCK, 2), blk(0xAA, 2), sqid=next(guest_sq))
    for _ in range(2):  # dirty rounds
        apply(log.entries())
        for n in range(30):  # sequential: one coalesced entry
            src.ok(src.vf, c.write(1, 400 + n, 1), blk(n), sqid=next(guest_sq))
    assert overflows == 1
    src.ok(PRIMARY_CNTLID, c.migration_suspend(src.vf))
    final = log.entries()
    assert [(e.slba, e.blocks, e.sequence) for e in final] == [(400, 30, cdq.EntrySequence.LAST_SUSPENDED)]
    apply(final)
    blob, csup = get_state(src, piece=128)
    assert set(csup) == {1}
    assert set_state(dst, blob, piece=128).ok
    dst.ok(PRIMARY_CNTLID, c.migration_resume(dst.vf))
    assert dst.store.digest() == src.store.digest()
    assert dst.model.controller_state(dst.vf) == src.model.controller_state(src.vf)
    # The guest carries on at the destination from the same queue positions.
    cqe, _ = dst.ok(dst.vf, c.write(1, 500, 1), blk(5), sqid=1)
    sq = src.model.controller_state(src.vf).submission_queues[1]
    assert cqe.sqhd == (sq.tail + 1) % sq.size
    _, data = dst.ok(dst.vf, c.read(1, 3, 1), sqid=2)
    assert data == blk(1)
