"""The vfio backend's call sequence and struct packing, against the fake kernel of fakes/fake_vfio_device.

The backend-independent behaviour (state walk, state round trip, dirty tracking) is in
test_backends_contract.py; this module checks what only the VFIO uAPI has: how the device is
opened, one ioctl per arc, data_fd ownership, failure recovery, precopy info, the stop-copy size
and DMA logging.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.backend import BLOCK_BYTES
from agent.backends.namespace_device import DeviceUnavailableError, NamespaceDevice
from agent.backends.vfio import VfioHandles, VfioMigrationDevice, open_cdev_device, open_group_device
from agent.controller_errors import DeviceCommandError
from agent.emulated.controller import EmulatedController, NotRunningError, WrongStateError
from agent.vfio_states import VfioState
from tests.fakes.fake_vfio_device import STREAM_MAGIC, FakeVfioDevice

S = VfioState
MIB = 1 << 20


def _open_fds() -> set[int]:
    return {int(n) for n in os.listdir("/proc/self/fd")}


@pytest.fixture
def guest(tmp_path: Path) -> Iterator[EmulatedController]:
    c = EmulatedController("c1", tmp_path / "c1.ns", MIB, create=True)
    yield c
    c.close()


def _device(fake: FakeVfioDevice) -> VfioMigrationDevice:
    namespace = NamespaceDevice(fake.controller.namespace_path)
    return VfioMigrationDevice("c1", VfioHandles(fake.device_fd), namespace, ioctl=fake.ioctl)


def test_probe_reads_features_and_state(guest: EmulatedController) -> None:
    fake = FakeVfioDevice(guest, p2p=True)
    dev = _device(fake)
    assert dev.migration_features == frozenset({"P2P", "PRE_COPY"})
    assert dev.vfio_state is S.RUNNING
    assert fake.calls == ["VFIO_DEVICE_FEATURE", "VFIO_DEVICE_FEATURE"]  # MIGRATION GET, then state GET
    dev.close()


def test_one_ioctl_per_arc_including_p2p(guest: EmulatedController) -> None:
    fake = FakeVfioDevice(guest, p2p=True)
    dev = _device(fake)
    fake.calls.clear()
    dev.set_state(S.STOP_COPY)  # RUNNING -> RUNNING_P2P -> STOP -> STOP_COPY: three arcs
    assert fake.calls == ["VFIO_DEVICE_FEATURE"] * 3
    assert fake.state is S.STOP_COPY and dev.vfio_state is S.STOP_COPY
    assert guest.vfio_state is S.STOP_COPY
    dev.close()


def test_saving_stream_concatenates_precopy_and_stop_copy(guest: EmulatedController) -> None:
    fake = FakeVfioDevice(guest)
    dev = _device(fake)
    dev.set_state(S.PRE_COPY)
    info = dev.precopy_info()
    assert (info.initial_bytes, info.dirty_bytes) == (len(STREAM_MAGIC), 0)
    assert dev.read_precopy() == len(STREAM_MAGIC)
    assert dev.precopy_info().initial_bytes == 0  # what was read is no longer pending
    assert dev.read_precopy() == 0
    guest.write_blocks(3, b"\x05" * BLOCK_BYTES)
    expected_size = dev.stop_copy_bytes()
    dev.set_state(S.STOP_COPY)  # inside the saving group: same stream, no new fd
    with pytest.raises(WrongStateError, match="VFIO_MIG_GET_PRECOPY_INFO needs state PRE_COPY"):
        dev.precopy_info()
    blob = dev.save_state()
    assert blob.startswith(STREAM_MAGIC)
    assert len(blob) == expected_size
    assert dev.save_state() == blob  # a retry returns the same stream, not an empty one
    dev.close()


def test_save_state_only_in_stop_copy(guest: EmulatedController) -> None:
    dev = _device(FakeVfioDevice(guest))
    dev.set_state(S.STOP)
    with pytest.raises(WrongStateError, match=r"save_state \(reading the VFIO stream\) needs state STOP_COPY"):
        dev.save_state()
    dev.close()


def test_no_fd_is_leaked_over_a_whole_migration(tmp_path: Path, guest: EmulatedController) -> None:
    before = _open_fds()
    src_fake = FakeVfioDevice(guest)
    src = _device(src_fake)
    dst_model = EmulatedController.for_resuming("c1", tmp_path / "dst.ns", MIB)
    dst_fake = FakeVfioDevice(dst_model)
    dst = _device(dst_fake)
    dst.set_state(S.RESUMING)
    for _ in range(2):  # a rollback and a second attempt reuse nothing from the first
        src.set_state(S.PRE_COPY)
        src.read_precopy()
        src.set_state(S.STOP_COPY)
        blob = src.save_state()
        src.set_state(S.RUNNING)
    dst.load_state(blob)
    dst.set_state(S.STOP)
    dst.set_state(S.RUNNING)
    src.release()
    dst.close()
    dst_model.close()
    assert _open_fds() == before


def test_resuming_takes_one_stream_and_a_bad_one_fails_the_arc(tmp_path: Path) -> None:
    model = EmulatedController.for_resuming("c1", tmp_path / "dst.ns", MIB)
    fake = FakeVfioDevice(model)
    dev = _device(fake)
    assert dev.vfio_state is S.STOP
    with pytest.raises(WrongStateError, match="load_state needs state RESUMING, but it is STOP"):
        dev.load_state(b"garbage")
    dev.set_state(S.RESUMING)
    dev.load_state(b"garbage")
    with pytest.raises(WrongStateError, match="already took a stream"):
        dev.load_state(b"more")
    with pytest.raises(DeviceCommandError, match=r"RESUMING -> STOP failed: EINVAL.*now in RESUMING"):
        dev.set_state(S.STOP)
    assert dev.vfio_state is S.RESUMING
    dev.reset()
    assert dev.vfio_state is S.RUNNING
    dev.close()
    model.close()


def test_failed_arc_records_where_the_device_is(guest: EmulatedController) -> None:
    fake = FakeVfioDevice(guest, fail_arcs={(S.STOP, S.STOP_COPY): S.ERROR})
    dev = _device(fake)
    with pytest.raises(DeviceCommandError, match=r"arc STOP -> STOP_COPY failed: EIO .*now in ERROR: reset it"):
        dev.set_state(S.STOP_COPY)
    assert dev.vfio_state is S.ERROR  # read back from the device, not assumed
    dev.reset()
    assert dev.vfio_state is S.RUNNING and fake.state is S.RUNNING
    guest.write_blocks(0, b"\x01" * BLOCK_BYTES)  # the model runs again
    dev.close()


def test_failed_arc_in_the_middle_stays_on_the_last_good_state(guest: EmulatedController) -> None:
    fake = FakeVfioDevice(guest, fail_arcs={(S.STOP, S.STOP_COPY): S.STOP})
    dev = _device(fake)
    with pytest.raises(DeviceCommandError, match="now in STOP: retry"):
        dev.set_state(S.STOP_COPY)
    assert dev.vfio_state is S.STOP
    with pytest.raises(NotRunningError):
        guest.write_blocks(0, b"\x01" * BLOCK_BYTES)  # the RUNNING -> STOP arc did run
    del fake.fail_arcs[(S.STOP, S.STOP_COPY)]
    dev.set_state(S.STOP_COPY)
    assert dev.save_state().startswith(STREAM_MAGIC)
    dev.close()


def test_dma_logging_start_report_stop(guest: EmulatedController) -> None:
    fake = FakeVfioDevice(guest)
    dev = _device(fake)
    assert dev.dma_logging_supported()
    assert dev.start_dma_logging([(0x10000, 0x8000), (0x100000, 0x1000)], page_size=4096) == 4096
    assert fake.dma_ranges == [(0x10000, 0x8000), (0x100000, 0x1000)]  # the ranges array was packed right
    for iova in (0x10000, 0x10fff, 0x17000, 0x100800, 0x200000):
        fake.device_wrote(iova)
    assert dev.dma_logging_report(0x10000, 0x8000, 4096) == [0x10000, 0x17000]
    assert dev.dma_logging_report(0x10000, 0x8000, 4096) == []  # a report clears what it returned
    assert dev.dma_logging_report(0x100000, 0x1000, 4096) == [0x100000]
    # Pages beyond the first bitmap word land in the right word and bit.
    dev.stop_dma_logging()
    dev.start_dma_logging([(0, 1 << 30)], page_size=4096)
    fake.device_wrote(100 * 4096)
    assert dev.dma_logging_report(0, 1 << 20, 4096) == [100 * 4096]
    dev.stop_dma_logging()
    with pytest.raises(DeviceCommandError, match="DMA_LOGGING_REPORT failed: EINVAL"):
        dev.dma_logging_report(0, 4096, 4096)
    with pytest.raises(ValueError, match="page_size=3000 must be a power of two"):
        dev.start_dma_logging([(0, 4096)], page_size=3000)
    dev.close()


def test_no_dma_logging_is_reported_as_unsupported(guest: EmulatedController) -> None:
    dev = _device(FakeVfioDevice(guest, dma_logging=False))
    assert not dev.dma_logging_supported()
    dev.close()


def test_device_without_pre_copy_has_no_pre_copy_state(guest: EmulatedController) -> None:
    dev = _device(FakeVfioDevice(guest, pre_copy=False))
    assert dev.migration_features == frozenset()
    with pytest.raises(ValueError, match="has no PRE_COPY state"):
        dev.set_state(S.PRE_COPY)
    dev.close()


def test_group_open_sequence(tmp_path: Path, guest: EmulatedController) -> None:
    fake = FakeVfioDevice(guest, pci_address="0000:3b:00.1")
    container, group = tmp_path / "vfio", tmp_path / "42"
    container.touch()
    group.touch()
    handles = open_group_device(group, "0000:3b:00.1", container_path=container, ioctl=fake.ioctl)
    assert handles.device_fd == fake.device_fd
    assert fake.calls == ["VFIO_GET_API_VERSION", "VFIO_CHECK_EXTENSION", "VFIO_GROUP_GET_STATUS",
                          "VFIO_GROUP_SET_CONTAINER", "VFIO_SET_IOMMU", "VFIO_GROUP_GET_DEVICE_FD"]
    dev = VfioMigrationDevice("c1", handles, NamespaceDevice(guest.namespace_path), ioctl=fake.ioctl)
    before_close = _open_fds()
    dev.close()
    assert len(before_close - _open_fds()) == 4  # device, group, container and namespace device


def test_group_open_errors_name_the_node(tmp_path: Path, guest: EmulatedController) -> None:
    fake = FakeVfioDevice(guest)
    (tmp_path / "vfio").touch()
    before = _open_fds()
    with pytest.raises(DeviceUnavailableError, match=f"VFIO group {tmp_path}/7 does not exist: bind the VF"):
        open_group_device(tmp_path / "7", "0000:3b:00.1", container_path=tmp_path / "vfio", ioctl=fake.ioctl)
    (tmp_path / "7").touch()
    with pytest.raises(DeviceCommandError, match=r"GET_DEVICE_FD for '0000:00:00\.9'.*ENODEV"):
        open_group_device(tmp_path / "7", "0000:00:00.9", container_path=tmp_path / "vfio", ioctl=fake.ioctl)
    assert _open_fds() == before  # nothing opened on the way is left open


def test_cdev_open_binds_an_iommufd(tmp_path: Path, guest: EmulatedController) -> None:
    fake = FakeVfioDevice(guest)
    cdev, iommu = tmp_path / "vfio0", tmp_path / "iommu"
    with pytest.raises(DeviceUnavailableError, match=f"VFIO device cdev {cdev} does not exist"):
        open_cdev_device(cdev, iommu_path=iommu, ioctl=fake.ioctl)
    with pytest.raises(DeviceUnavailableError, match=f"iommufd {iommu} does not exist: load the iommufd module"):
        open_cdev_device(fake.node, iommu_path=iommu, ioctl=fake.ioctl)
    iommu.touch()
    handles = open_cdev_device(fake.node, iommu_path=iommu, ioctl=fake.ioctl)
    assert fake.calls == ["VFIO_DEVICE_BIND_IOMMUFD"]
    dev = VfioMigrationDevice("c1", handles, NamespaceDevice(guest.namespace_path), ioctl=fake.ioctl)
    dev.set_state(S.STOP)  # the bound cdev takes the migration ioctls
    assert fake.state is S.STOP
    dev.close()
    os.close(fake.device_fd)  # the fake's own handle on its "device"
