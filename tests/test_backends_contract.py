"""The backend contract, run the same way against every backend.

- ``emulated``: the EmulatedController itself;
- ``nvme-passthru``: NvmePassthruController through fakes/fake_nvme_pf into the emulated NVMe
  subsystem model, whose secondary controller the guest drives;
- ``vfio``: VfioMigrationDevice through fakes/fake_vfio_device (on the same kind of model), with
  its changed LBAs from the PF's Track Send log through the fake PF.

In every case the guest is the emulated controller façade driving the model's secondary
controller with I/O commands, so "the guest's writes are refused" means the device (not our
bookkeeping) suspended it.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from agent.backend import BLOCK_BYTES, MigratableController, Snapshot
from agent.backends.namespace_device import NamespaceDevice
from agent.backends.nvme_passthru import NvmeAdminChannel, NvmePassthruController
from agent.backends.vfio import VfioHandles, VfioMigrationDevice
from agent.controller_errors import ControllerError, ControllerGoneError, NotRunningError, WrongStateError
from agent.emulated.controller import EmulatedController
from agent.namespace_digest import digest_extents
from agent.nvme.migration_driver import CdqChangedLbaLog
from agent.vfio_states import IllegalTransition, VfioState, path
from tests.fakes.fake_nvme_pf import FakeNvmePf
from tests.fakes.fake_vfio_device import FakeVfioDevice

S = VfioState
MIB = 1 << 20
NS_BYTES = MIB
NSID = 1
KINDS = ("emulated", "nvme-passthru", "vfio")
SUPPORTED = (S.STOP, S.RUNNING, S.STOP_COPY, S.RESUMING, S.PRE_COPY)


def blk(fill: int, count: int = 1) -> bytes:
    return bytes([fill]) * (BLOCK_BYTES * count)


@dataclass
class Rig:
    """A controller as the host drives it (``ctrl``) and the same controller as its guest drives it."""

    ctrl: MigratableController
    guest: EmulatedController
    cleanups: list[Callable[[], None]] = field(default_factory=list)

    def guest_can_write(self) -> bool:
        try:
            self.guest.write_blocks(NS_BYTES // BLOCK_BYTES - 1, blk(0xEE))
        except NotRunningError:
            return False
        return True

    def close(self) -> None:
        self.ctrl.close()
        for cleanup in self.cleanups:
            cleanup()
        self.guest.close()


def _admin(pf: FakeNvmePf) -> NvmeAdminChannel:
    return NvmeAdminChannel(pf.fd, "fake PF", ioctl=pf.ioctl)


def make_rig(kind: str, tmp_path: Path, name: str, *, destination: bool = False) -> Rig:
    ns_path = tmp_path / f"{name}.ns"
    guest = (EmulatedController.for_resuming("c1", ns_path, NS_BYTES) if destination
             else EmulatedController("c1", ns_path, NS_BYTES, create=True))
    if kind == "emulated":
        return Rig(guest, guest)
    pf = FakeNvmePf(guest.model)
    if kind == "nvme-passthru":
        args = ("c1", _admin(pf), guest.cntlid, NSID, NamespaceDevice(ns_path))
        ctrl = NvmePassthruController.for_resuming(*args) if destination else NvmePassthruController(*args)
        return Rig(ctrl, guest, [pf.close])
    vf = FakeVfioDevice(guest)
    log = CdqChangedLbaLog(_admin(pf), guest.cntlid, NSID, namespace_blocks=NS_BYTES // BLOCK_BYTES,
                           owns_transport=True)
    dev = VfioMigrationDevice("c1", VfioHandles(vf.device_fd), NamespaceDevice(ns_path), lba_log=log, ioctl=vf.ioctl)
    if destination:
        dev.set_state(S.RESUMING)
    return Rig(dev, guest, [pf.close])


@pytest.fixture(params=KINDS)
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def rigs(kind: str, tmp_path: Path) -> Iterator[Callable[..., Rig]]:
    made: list[Rig] = []
    counter = itertools.count()

    def new(*, destination: bool = False) -> Rig:
        rig = make_rig(kind, tmp_path, f"r{next(counter)}", destination=destination)
        made.append(rig)
        return rig

    yield new
    for rig in made:
        rig.close()


def test_conforms_and_starts_running(rigs: Callable[..., Rig]) -> None:
    rig = rigs()
    assert isinstance(rig.ctrl, MigratableController)
    assert rig.ctrl.controller_id == "c1" and rig.ctrl.namespace_bytes == NS_BYTES
    assert rig.ctrl.vfio_state is S.RUNNING and rig.guest_can_write()
    assert rigs(destination=True).ctrl.vfio_state is S.RESUMING


@pytest.mark.parametrize(("start", "target"), list(itertools.product(SUPPORTED, SUPPORTED)))
def test_every_pair_of_states(rigs: Callable[..., Rig], start: VfioState, target: VfioState) -> None:
    rig = rigs(destination=start is S.RESUMING)
    if start is not S.RESUMING:
        rig.ctrl.set_state(start)
    assert rig.ctrl.vfio_state is start
    if start is S.RESUMING and target is not S.RESUMING:
        # Leaving RESUMING needs a loaded state: the arc fails and leaves the controller where it was.
        with pytest.raises(ControllerError, match="no controller state loaded"):
            rig.ctrl.set_state(target)
        assert rig.ctrl.vfio_state is S.RESUMING
        return
    if start is S.STOP_COPY and target is S.PRE_COPY:
        with pytest.raises(IllegalTransition, match="STOP_COPY to PRE_COPY"):
            rig.ctrl.set_state(target)
        assert rig.ctrl.vfio_state is S.STOP_COPY
        return
    assert path(start, target, frozenset({"PRE_COPY"}))[-1:] in ([], [target])
    rig.ctrl.set_state(target)
    assert rig.ctrl.vfio_state is target
    if target is not S.RESUMING:
        assert rig.guest_can_write() == (target in (S.RUNNING, S.PRE_COPY))


def test_optional_and_error_states_are_refused(rigs: Callable[..., Rig]) -> None:
    rig = rigs()
    for target in (S.RUNNING_P2P, S.PRE_COPY_P2P, S.ERROR):
        with pytest.raises(IllegalTransition):
            rig.ctrl.set_state(target)
    assert rig.ctrl.vfio_state is S.RUNNING


def test_migration_round_trip(rigs: Callable[..., Rig]) -> None:
    src, dst = rigs(), rigs(destination=True)
    src.guest.write_blocks(0, blk(1, 4))
    src.guest.write_blocks(100, blk(2))
    initial = src.guest.current_state()
    src.ctrl.set_state(S.PRE_COPY)
    for offset, length in src.ctrl.data_extents():  # the first copy, while the guest runs
        dst.ctrl.write_raw(offset, src.ctrl.read_raw(offset, length))
    src.guest.write_blocks(2, blk(3, 3))  # changes during the copy
    src.guest.write_blocks(200, blk(4))
    assert src.ctrl.take_dirty_lbas() == [2, 3, 4, 200]
    src.guest.write_blocks(50, blk(5))
    src.ctrl.set_state(S.STOP_COPY)
    assert src.ctrl.take_dirty_lbas() == [50]  # the last round sees writes up to the suspend
    for lba in (2, 3, 4, 200, 50):
        dst.ctrl.write_raw(lba * BLOCK_BYTES, src.ctrl.read_raw(lba * BLOCK_BYTES, BLOCK_BYTES))
    assert src.guest.current_state() != initial  # the guest's I/O moved the queue registers
    blob = src.ctrl.save_state()
    assert src.ctrl.save_state() == blob
    dst.ctrl.load_state(blob)
    dst.ctrl.set_state(S.STOP)
    assert dst.guest.current_state() == src.guest.current_state()
    assert dst.ctrl.digest() == src.ctrl.digest()
    dst.ctrl.set_state(S.RUNNING)
    assert dst.ctrl.vfio_state is S.RUNNING


def test_rollback_resumes_the_source_and_stops_tracking(rigs: Callable[..., Rig]) -> None:
    rig = rigs()
    rig.ctrl.set_state(S.PRE_COPY)
    rig.ctrl.set_state(S.STOP_COPY)
    assert not rig.guest_can_write()
    rig.ctrl.set_state(S.RUNNING)
    assert rig.guest_can_write()
    with pytest.raises(WrongStateError, match="dirty tracking is off"):
        rig.ctrl.take_dirty_lbas()
    rig.ctrl.set_state(S.PRE_COPY)  # a second attempt starts with a fresh, empty log
    assert rig.ctrl.take_dirty_lbas() == []


def test_dirty_tracking_by_hand(rigs: Callable[..., Rig]) -> None:
    rig = rigs()
    rig.guest.write_blocks(1, blk(1))  # before tracking: not logged
    assert rig.ctrl.dirty_block_count() == 0
    rig.ctrl.start_dirty_tracking()
    rig.guest.write_blocks(9, blk(1, 3))
    rig.guest.write_blocks(2, blk(1))
    assert rig.ctrl.dirty_block_count() == 4
    rig.ctrl.start_dirty_tracking()  # idempotent: keeps what is logged
    assert rig.ctrl.take_dirty_lbas() == [2, 9, 10, 11]
    assert rig.ctrl.take_dirty_lbas() == []
    rig.ctrl.stop_dirty_tracking()
    rig.guest.write_blocks(6, blk(1))
    assert rig.ctrl.dirty_block_count() == 0


def test_a_corrupted_state_is_refused_and_resuming_stays(rigs: Callable[..., Rig]) -> None:
    src, dst = rigs(), rigs(destination=True)
    src.ctrl.set_state(S.STOP_COPY)
    blob = bytearray(src.ctrl.save_state())
    blob[-5] ^= 0xFF
    with pytest.raises(ControllerError):
        # Refused by load_state (emulated, nvme-passthru) or by the RESUMING -> STOP arc (vfio,
        # where the kernel driver checks the stream when the session ends).
        dst.ctrl.load_state(bytes(blob))
        dst.ctrl.set_state(S.STOP)
    assert dst.ctrl.vfio_state is S.RESUMING


def test_write_raw_only_while_resuming(rigs: Callable[..., Rig]) -> None:
    rig = rigs()
    with pytest.raises(WrongStateError, match="write_raw needs state RESUMING, but it is RUNNING"):
        rig.ctrl.write_raw(0, blk(1))
    dst = rigs(destination=True)
    dst.ctrl.write_raw(BLOCK_BYTES - 2, b"abcd")  # unaligned pieces are fine
    assert dst.ctrl.read_raw(BLOCK_BYTES - 2, 4) == b"abcd"
    assert dst.ctrl.data_extents() == [(0, 2 * BLOCK_BYTES)]


def test_digest_and_snapshot_of_a_suspended_controller(rigs: Callable[..., Rig]) -> None:
    rig = rigs()
    rig.guest.write_blocks(17, blk(5))
    rig.ctrl.set_state(S.STOP)
    image = rig.guest.namespace_path.read_bytes()
    expected = digest_extents([(0, len(image))], lambda o, n: image[o:o + n])
    assert rig.ctrl.digest() == expected
    snap = rig.ctrl.begin_snapshot()
    assert isinstance(snap, Snapshot)
    assert snap.digest() == expected
    snap.close()
    with pytest.raises(ValueError, match="snapshot is closed"):
        snap.digest()


def test_release_destroys_the_data_and_the_controller(rigs: Callable[..., Rig]) -> None:
    rig = rigs()
    rig.guest.write_blocks(3, blk(9))
    ns_path = rig.guest.namespace_path
    rig.ctrl.set_state(S.STOP)
    rig.ctrl.release()
    assert not ns_path.exists() or not any(ns_path.read_bytes())
    for call in (lambda: rig.ctrl.vfio_state, lambda: rig.ctrl.read_raw(0, 1),
                 lambda: rig.ctrl.set_state(S.RUNNING), lambda: rig.ctrl.take_dirty_lbas()):
        with pytest.raises(ControllerGoneError, match="controller c1 was released"):
            call()
    rig.ctrl.release()  # a retried release is harmless
    assert rig.ctrl.controller_id == "c1"
