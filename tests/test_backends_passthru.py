"""The nvme-passthru backend's commands, byte for byte, through fakes/fake_nvme_pf into the NVMe model.

The backend-independent behaviour is in test_backends_contract.py; this module checks which
admin commands each arc sends (against the shared encoder), the passthru struct round trip
(status, DW0, data buffers of the 64-bit ioctl), error reporting with the controller's
explanation, state transfer in pieces, the Controller Data Queue's memory (a huge page or one
page, physically contiguous either way), its overflow path and namespace filtering, and the
namespace block device access.
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
import re
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from agent.backend import BLOCK_BYTES
from agent.backends import open_backend
from agent.backends.ioctl_abi import MAP_HUGE_2MB, MAP_HUGETLB
from agent.backends.namespace_device import DeviceUnavailableError, NamespaceDevice
from agent.backends.nvme_passthru import NvmeAdminChannel, NvmePassthruController, map_queue
from agent.controller_errors import DeviceCommandError, LbaOutOfRangeError, WrongStateError
from agent.emulated.controller import EmulatedController, NotRunningError
from agent.emulated.model.namespace import NamespaceStore
from agent.nvme import commands
from agent.nvme.commands import Sqe
from agent.nvme.migration_driver import CdqChangedLbaLog, MigrationDriver, NvmeStatusError
from agent.nvme.spec import AdminOpcode, LoggingAction, SequenceIndicator, Status
from agent.vfio_states import VfioState
from tests.fakes.fake_nvme_pf import FakeNvmePf

S = VfioState
MIB = 1 << 20


def blk(fill: int, count: int = 1) -> bytes:
    return bytes([fill]) * (BLOCK_BYTES * count)


@pytest.fixture
def guest(tmp_path: Path) -> Iterator[EmulatedController]:
    c = EmulatedController("c1", tmp_path / "c1.ns", MIB, create=True)
    yield c
    c.close()


@pytest.fixture
def pf(guest: EmulatedController) -> Iterator[FakeNvmePf]:
    fake = FakeNvmePf(guest.model)
    yield fake
    fake.close()


def _ctrl(guest: EmulatedController, pf: FakeNvmePf, *, state_piece_bytes: int = 64 * 1024) -> NvmePassthruController:
    admin = NvmeAdminChannel(pf.fd, "fake PF", ioctl=pf.ioctl)
    return NvmePassthruController("c1", admin, guest.cntlid, 1, NamespaceDevice(guest.namespace_path),
                                  state_piece_bytes=state_piece_bytes)


def _without_cid(sqes: list[Sqe]) -> list[Sqe]:
    # The kernel assigns command identifiers and builds the data pointer from addr/data_len; what
    # the backend decides is everything else.
    return [replace(s, cid=0, prp1=0) for s in sqes]


def test_each_arc_sends_the_encoders_commands(guest: EmulatedController, pf: FakeNvmePf) -> None:
    ctrl = _ctrl(guest, pf)
    cntlid = guest.cntlid
    ctrl.set_state(S.STOP)
    assert _without_cid(pf.sent) == [commands.migration_suspend(cntlid)]
    pf.sent.clear()
    ctrl.set_state(S.STOP_COPY)
    header = commands.get_controller_state(cntlid, 0, 48)
    assert _without_cid(pf.sent)[0] == header
    assert all(s.opcode == AdminOpcode.MIGRATION_RECEIVE for s in pf.sent)
    pf.sent.clear()
    ctrl.set_state(S.RUNNING)  # STOP_COPY -> STOP -> RUNNING: only the Resume is a command
    assert _without_cid(pf.sent) == [commands.migration_resume(cntlid)]
    ctrl.close()


def _huge_pages_free() -> int:
    meminfo = Path("/proc/meminfo").read_text()
    free = re.search(r"^HugePages_Free:\s+(\d+)", meminfo, re.MULTILINE)
    size = re.search(r"^Hugepagesize:\s+(\d+) kB", meminfo, re.MULTILINE)
    return int(free.group(1)) if free and size and int(size.group(1)) == 2048 else 0


def test_pre_copy_is_a_change_log_in_a_contiguous_queue(guest: EmulatedController, pf: FakeNvmePf,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    ctrl = _ctrl(guest, pf)
    with caplog.at_level(logging.INFO, logger="agent.backends.nvme_passthru"):
        ctrl.set_state(S.PRE_COPY)
    create, track = pf.sent
    # PC=1 needs physically contiguous memory: this host's kernel decides between a 2 MiB huge page
    # (the 65536 entries asked for) and one 4 KiB page (128 entries), and the log says which.
    if _huge_pages_free():
        assert create.cdw12 == (1 << 16) * 32 // 4 and "a 2 MiB huge page" in caplog.text
    else:
        assert create.cdw12 == 128 * 32 // 4 and "one 4 KiB page, 128 entries" in caplog.text
    assert create.opcode == AdminOpcode.CONTROLLER_DATA_QUEUE and pf.data_lengths[0] == create.cdw12 * 4
    assert create.cdw11 == 1 | guest.cntlid << 16  # PC and CNTLID
    assert track == replace(commands.track_send(1, LoggingAction.START), cid=track.cid)
    guest.write_blocks(7, blk(1))
    pf.sent.clear()
    pf.data_lengths.clear()
    assert ctrl.take_dirty_lbas() == [7]
    opcodes = [(s.opcode, s.cdw10 & 0xFF) for s in pf.sent]
    assert opcodes == [(AdminOpcode.GET_FEATURES, 0x21), (AdminOpcode.SET_FEATURES, 0x21)]
    assert pf.data_lengths == [8, 0]  # Get Features 21h answers in an 8-byte {head, trigger} buffer
    assert pf.sent[1].cdw12 == 1  # the head moved past the one entry consumed
    pf.sent.clear()
    ctrl.set_state(S.RUNNING)
    assert _without_cid(pf.sent) == [commands.track_send(1, LoggingAction.STOP), commands.cdq_delete(1)]
    ctrl.close()


def test_queue_memory_is_a_huge_page_when_the_host_has_one_free(caplog: pytest.LogCaptureFixture) -> None:
    asked: list[tuple[int, int]] = []

    def host_with_a_free_huge_page(fileno: int, length: int, *, flags: int) -> mmap.mmap:
        asked.append((length, flags))
        return mmap.mmap(fileno, length)  # what the kernel maps for MAP_HUGETLB, but in small pages

    with caplog.at_level(logging.INFO, logger="agent.backends.nvme_passthru"):
        queue = map_queue(2 << 20, mapper=host_with_a_free_huge_page)
    assert asked == [(2 << 20, mmap.MAP_PRIVATE | MAP_HUGETLB | MAP_HUGE_2MB)]
    assert (queue.size_bytes, queue.contiguous, queue.address % 4096) == (2 << 20, True, 0)
    assert "a 2 MiB huge page, 65536 entries" in caplog.text
    queue.release()


def test_without_a_free_huge_page_the_queue_is_one_page(guest: EmulatedController, pf: FakeNvmePf,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    def host_without_huge_pages(fileno: int, length: int, *, flags: int) -> mmap.mmap:
        if flags & MAP_HUGETLB:
            raise OSError(errno.ENOMEM, os.strerror(errno.ENOMEM))
        return mmap.mmap(fileno, length, flags=flags)

    admin = NvmeAdminChannel(pf.fd, "fake PF", ioctl=pf.ioctl, mapper=host_without_huge_pages)
    log = MigrationDriver(admin, guest.cntlid).change_log(1, 256)
    with caplog.at_level(logging.INFO, logger="agent.backends.nvme_passthru"):
        log.start()
    assert "no free 2 MiB huge page (Cannot allocate memory); using one 4 KiB page, 128 entries" in caplog.text
    create = pf.sent[0]
    assert (create.cdw12, create.cdw11 & 1, log.entries, log.contiguous) == (1024, 1, 128, True)
    for lba in range(0, 256, 2):  # 128 separate ranges do not fit 128 slots: "all LBAs changed"
        guest.write_blocks(lba, blk(1))
    assert log.take() == list(range(256))
    guest.write_blocks(5, blk(2))
    assert log.take() == [5]  # logging was turned back on after the full queue
    log.stop()
    admin.close()


def test_get_features_cdq_hands_an_8_byte_buffer(guest: EmulatedController, pf: FakeNvmePf) -> None:
    admin = NvmeAdminChannel(pf.fd, "fake PF", ioctl=pf.ioctl)
    log = CdqChangedLbaLog(admin, guest.cntlid, 1, namespace_blocks=256)
    log.start()
    guest.write_blocks(1, blk(1))
    guest.write_blocks(9, blk(1))
    got = admin.submit(commands.get_cdq_pointers(1), "Get Features CDQ", read_bytes=8)
    assert (got.dw0, got.dw1, got.data) == (0, 0, bytes(8))  # head 0, no trigger: in the data, not DW0/DW1
    assert pf.data_lengths[-1] == 8
    assert log.take() == [1, 9]
    log.stop()
    admin.close()


def test_the_log_keeps_only_its_namespace(tmp_path: Path, guest: EmulatedController, pf: FakeNvmePf) -> None:
    # The VF has a second namespace; its changes come through the same queue and are not ours.
    other = NamespaceStore(tmp_path / "ns2", MIB, create=True, lock=guest.model.lock, label="ns2")
    guest.model.attach_namespace(2, other, (0, guest.cntlid))
    admin = NvmeAdminChannel(pf.fd, "fake PF", ioctl=pf.ioctl)
    log = MigrationDriver(admin, guest.cntlid).change_log(1, 256)
    log.start()
    raw, _ = guest.model.submit_io(guest.cntlid, 1, commands.write(2, 3, 1).encode(), blk(2))
    assert commands.cqe_status(raw) == 0
    guest.write_blocks(4, blk(1))
    assert log.take() == [4]
    log.stop()
    admin.close()
    other.close()


def test_status_errors_name_the_command_and_the_status(guest: EmulatedController, pf: FakeNvmePf) -> None:
    admin = NvmeAdminChannel(pf.fd, "fake PF", ioctl=pf.ioctl)
    ctrl = NvmePassthruController("c9", admin, 9, 1, NamespaceDevice(guest.namespace_path))
    with pytest.raises(NvmeStatusError, match=r"Suspend for CNTLID 9 \(controller c9\) on fake PF failed with "
                                              r"status INVALID_CONTROLLER_IDENTIFIER \(0x11f\): cntlid=9 is not a "
                                              r"migratable controller .*; do not retry") as info:
        ctrl.set_state(S.STOP)
    assert info.value.status == Status.INVALID_CONTROLLER_IDENTIFIER and info.value.dnr
    # The explanation came from the PF's Error Information log and the detail page it names.
    assert info.value.explanation == "cntlid=9 is not a migratable controller of this subsystem (migratable: [1])"
    assert [(s.opcode, s.cdw10 & 0xFF) for s in pf.sent[-2:]] == [(AdminOpcode.GET_LOG_PAGE, 0x01),
                                                                    (AdminOpcode.GET_LOG_PAGE, 0xC0)]
    assert ctrl.vfio_state is S.RUNNING
    ctrl.close()


def test_kernel_refusals_and_kernel_owned_fields(guest: EmulatedController, pf: FakeNvmePf) -> None:
    admin = NvmeAdminChannel(os.memfd_create("not-a-pf"), "fake PF", ioctl=pf.ioctl)  # not the fake's device
    with pytest.raises(DeviceCommandError, match=r"Resume on fake PF: the kernel refused the ioctl: .*Errno "
                                                 f"{errno.ENOTTY}"):
        admin.submit(commands.migration_resume(1), "Resume")
    with pytest.raises(ValueError, match="FUSE, PSDT and MPTR are the kernel's to set"):
        admin.submit(Sqe(AdminOpcode.IDENTIFY, flags=0x40), "Identify")
    admin.close()
    with pytest.raises(DeviceCommandError, match="the admin channel to fake PF is closed"):
        admin.submit(commands.migration_resume(1), "Resume")
    with pytest.raises(DeviceUnavailableError, match="device /dev/nvme9 does not exist: is the NVMe PF bound"):
        NvmeAdminChannel.open(Path("/dev/nvme9"))


def test_state_moves_in_pieces(tmp_path: Path, guest: EmulatedController, pf: FakeNvmePf) -> None:
    src = _ctrl(guest, pf, state_piece_bytes=64)
    guest.write_blocks(3, blk(3))
    src.set_state(S.STOP_COPY)
    blob = src.save_state()
    gets = [s for s in pf.sent if s.opcode == AdminOpcode.MIGRATION_RECEIVE]
    assert len(gets) == 1 + -(-(len(blob) - 48) // 64)  # the header, then 64-byte pieces
    assert [s.cdw12 for s in gets] == [0, *range(48, len(blob), 64)]
    dst_guest = EmulatedController.for_resuming("c1", tmp_path / "dst.ns", MIB)
    dst_pf = FakeNvmePf(dst_guest.model)
    dst = NvmePassthruController.for_resuming("c1", NvmeAdminChannel(dst_pf.fd, "fake PF 2", ioctl=dst_pf.ioctl),
                                              dst_guest.cntlid, 1, NamespaceDevice(dst_guest.namespace_path),
                                              state_piece_bytes=64)
    dst.load_state(blob)
    sets = [s for s in dst_pf.sent if s.opcode == AdminOpcode.MIGRATION_SEND and s.cdw10 & 0xFF == 2]
    sequences = [SequenceIndicator(s.cdw10 >> 16 & 3) for s in sets]
    assert sequences[0] is SequenceIndicator.FIRST and sequences[-1] is SequenceIndicator.LAST
    assert set(sequences[1:-1]) == {SequenceIndicator.MIDDLE}
    assert [s.cdw12 for s in sets] == list(range(0, len(blob), 64))
    dst.set_state(S.STOP)
    assert dst_guest.current_state() == guest.current_state()
    for c in (src, dst):
        c.close()
    dst_pf.close()
    dst_guest.close()


def test_save_state_checks_the_controller_is_suspended(guest: EmulatedController, pf: FakeNvmePf) -> None:
    ctrl = _ctrl(guest, pf)
    ctrl.set_state(S.STOP)
    # Someone else resumes the VF behind the backend's back: the completion's CSUP bit says so.
    other = NvmeAdminChannel(pf.fd, "fake PF", ioctl=pf.ioctl)
    other.submit(commands.migration_resume(guest.cntlid), "Resume")
    with pytest.raises(WrongStateError, match="CSUP=0, the controller is not suspended"):
        ctrl.save_state()
    ctrl.close()


def test_a_full_queue_reports_every_lba_and_logging_resumes(guest: EmulatedController, pf: FakeNvmePf) -> None:
    admin = NvmeAdminChannel(pf.fd, "fake PF", ioctl=pf.ioctl)
    log = CdqChangedLbaLog(admin, guest.cntlid, 1, namespace_blocks=256, queue_entries=128)
    log.start()
    for lba in range(0, 256, 2):  # 128 separate ranges cannot fit 128 slots (one stays free, one for the end)
        guest.write_blocks(lba, blk(1))
    assert log.take() == list(range(256))
    guest.write_blocks(5, blk(2))
    assert log.take() == [5]  # logging was turned back on
    log.stop()
    admin.close()


def test_suspended_guest_io_is_refused_by_the_device(guest: EmulatedController, pf: FakeNvmePf) -> None:
    ctrl = _ctrl(guest, pf)
    ctrl.set_state(S.STOP)
    with pytest.raises(NotRunningError):
        guest.write_blocks(0, blk(1))
    ctrl.set_state(S.RUNNING)
    guest.write_blocks(0, blk(1))
    ctrl.close()


def test_namespace_device_widens_to_blocks_and_erases(tmp_path: Path) -> None:
    path = tmp_path / "ns"
    with open(path, "wb") as f:
        f.truncate(4 * BLOCK_BYTES)
    ns = NamespaceDevice(path)
    assert not ns.is_block_device and ns.size_bytes == 4 * BLOCK_BYTES
    ns.write(BLOCK_BYTES - 3, b"abcdef")  # straddles two blocks: read-modify-write of both
    assert path.read_bytes()[BLOCK_BYTES - 4 : BLOCK_BYTES + 4] == b"\0abcdef\0"
    assert ns.read(BLOCK_BYTES - 3, 6) == b"abcdef"
    assert ns.data_extents() == [(0, 2 * BLOCK_BYTES)]
    with pytest.raises(LbaOutOfRangeError, match="offset=16380 length=8 is outside the 16384-byte namespace"):
        ns.read(4 * BLOCK_BYTES - 4, 8)
    ns.erase()
    assert not any(path.read_bytes()) and ns.data_extents() == []
    ns.close()
    (tmp_path / "odd").write_bytes(b"x" * 100)
    with pytest.raises(ValueError, match="is 100 bytes, not a positive multiple of 4096"):
        NamespaceDevice(tmp_path / "odd")
    with pytest.raises(DeviceUnavailableError, match=r"namespace device .*/nope does not exist: attach the namespace"):
        NamespaceDevice(tmp_path / "nope")


def test_open_backend_drives_the_pf_it_opened(guest: EmulatedController, pf: FakeNvmePf) -> None:
    before = {int(n) for n in os.listdir("/proc/self/fd")}
    ctrl = open_backend("nvme-passthru", "c1", device=pf.node, namespace_path=guest.namespace_path,
                        cntlid=guest.cntlid, ioctl=pf.ioctl)
    assert isinstance(ctrl, NvmePassthruController) and ctrl.namespace_bytes == MIB
    ctrl.set_state(S.STOP)
    with pytest.raises(NotRunningError):
        guest.write_blocks(0, blk(1))
    ctrl.set_state(S.RUNNING)
    ctrl.close()
    with pytest.raises(DeviceUnavailableError, match=r"namespace device .*/missing.ns does not exist"):
        open_backend("nvme-passthru", "c1", device=pf.node, namespace_path=guest.namespace_path.parent / "missing.ns",
                     cntlid=guest.cntlid, ioctl=pf.ioctl)
    assert {int(n) for n in os.listdir("/proc/self/fd")} == before  # the admin channel opened first was closed
