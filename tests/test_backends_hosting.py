"""Hosting controllers on a backend (agent.backends.hosting): VF slots of a PF (nvme-passthru, over
the FAKE PF of tests/fakes) and sparse files (emulated); what survives a restart of the agent."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.backend import BLOCK_BYTES
from agent.backends import open_hosting
from agent.backends.emulated_hosting import EmulatedHosting
from agent.backends.hosting import HostingError
from agent.backends.nvme_passthru import NvmeAdminChannel
from agent.backends.passthru_hosting import SLOTS_FILE, PassthruHosting
from agent.nvme.migration_driver import MigrationDriver
from agent.nvme.spec import AdminOpcode, MigrationSendSelect
from agent.session_states import ErrorKind, SessionError
from agent.sessions import DestinationSession
from agent.vfio_states import VfioState
from tests.fakes.fake_nvme_pf import FakeNvmePf
from tests.fakes.fake_pf_agent import FakePfAccess, build_pf

S = VfioState
MIB = 1 << 20


class Pf:
    """A fake PF with VFs, and the flags an agent would be started with."""

    def __init__(self, data_dir: Path, vfs: int = 2, namespace_bytes: int = MIB) -> None:
        self.data_dir = data_dir
        self.fake, self.slots = build_pf(data_dir, vfs, namespace_bytes)
        self.access = FakePfAccess(ioctl=self.fake.ioctl, pf_node=self.fake.node)

    def hosting(self, slots: list[str] | None = None) -> PassthruHosting:
        hosting = open_hosting("nvme-passthru", self.data_dir, device=self.fake.node,
                               slots=self.slots if slots is None else slots, access=self.access)
        assert isinstance(hosting, PassthruHosting)
        return hosting

    def suspended(self, cntlid: int) -> bool:
        admin = NvmeAdminChannel.open(self.fake.node, ioctl=self.access.ioctl)
        try:
            return MigrationDriver(admin, cntlid).suspended()
        finally:
            admin.close()

    def media(self, nsid: int) -> Path:
        return self.data_dir / "fake-pf" / f"vf{nsid}.ns"


@pytest.fixture
def pf(tmp_path: Path) -> Iterator[Pf]:
    made = Pf(tmp_path / "data")
    yield made
    made.fake.close()


def suspends(fake: FakeNvmePf) -> int:
    return sum(s.opcode == AdminOpcode.MIGRATION_SEND and s.cdw10 & 0xFF == MigrationSendSelect.SUSPEND
               for s in fake.sent)


def test_slots_are_the_capacity_and_a_controller_takes_one_of_its_size(pf: Pf) -> None:
    hosting = pf.hosting()
    assert (hosting.capacity_bytes, hosting.allocated_bytes()) == (2 * MIB, 0)
    caps = hosting.capabilities
    assert not caps.guest_workload and not caps.nbd_export and caps.sparse_extents  # files stand in for devices
    assert hosting.capacity_problem("p9", 2 * MIB) == (
        "no free nvme-passthru slot of 2097152 bytes for controller 'p9' (free slots: CNTLID 1: 1048576 bytes; "
        "CNTLID 2: 1048576 bytes); a slot's namespace must be exactly the controller's size")
    pf.media(1).write_bytes(b"\xee" * MIB)  # someone else's data: erased before the slot is handed out
    first = hosting.create("p1", MIB)
    assert first.vfio_state is S.RUNNING and first.read_raw(0, MIB) == bytes(MIB)
    second = hosting.create("p2", MIB)
    assert hosting.allocated_bytes() == 2 * MIB
    assert "free slots: none" in str(hosting.capacity_problem("p3", MIB))
    with pytest.raises(HostingError, match="no free nvme-passthru slot of 1048576 bytes for controller 'p3'"):
        hosting.create("p3", MIB)
    assert hosting.hosted_ids() == ["p1", "p2"]
    for c in (first, second):
        c.close()
    hosting.close()


def test_assignments_survive_a_restart_and_a_released_vf_is_reused(pf: Pf) -> None:
    hosting = pf.hosting()
    ctrl = hosting.create("p1", MIB)
    ctrl.set_state(S.STOP_COPY)  # a migration's source: suspended
    ctrl.release()  # sanitized after COMMIT, the VF left suspended
    hosting.release("p1")
    assert pf.suspended(1) and hosting.allocated_bytes() == 0
    hosting.close()

    restarted = pf.hosting()  # the agent again, from its data dir
    assert restarted.hosted_ids() == [] and restarted.pending_destinations() == []
    before = suspends(pf.fake)
    dst = restarted.create_destination("p7", "mig-1", MIB)  # the suspended VF, not suspended again
    assert dst.vfio_state is S.RESUMING and suspends(pf.fake) == before
    assert restarted.pending_destinations() == [("p7", "mig-1")]
    dst.close()
    restarted.close()

    again = pf.hosting()
    assert again.pending_destinations() == [("p7", "mig-1")] and again.allocated_bytes() == MIB
    reloaded = again.reload_destination("p7", "mig-1")
    assert reloaded.vfio_state is S.RESUMING
    again.adopt_destination("p7", "mig-1")
    assert again.hosted_ids() == ["p7"] and again.pending_destinations() == []
    reloaded.close()
    again.close()
    assert pf.hosting().hosted_ids() == ["p7"]


def test_a_new_controller_on_a_suspended_vf_is_resumed(pf: Pf) -> None:
    hosting = pf.hosting(slots=pf.slots[:1])
    ctrl = hosting.create("p1", MIB)
    ctrl.set_state(S.STOP)
    ctrl.release()
    hosting.release("p1")
    assert pf.suspended(1)
    reused = hosting.create("p2", MIB)
    assert reused.vfio_state is S.RUNNING and not pf.suspended(1)
    reused.close()
    hosting.close()


def test_reopen_sees_the_vf_as_the_device_has_it_and_discard_erases(pf: Pf) -> None:
    hosting = pf.hosting()
    ctrl = hosting.create("p1", MIB)
    ctrl.set_state(S.STOP)  # the agent dies here, the VF stays suspended
    ctrl.close()
    reopened = hosting.reopen("p1")
    assert reopened.vfio_state is S.STOP
    reopened.set_state(S.RUNNING)
    assert not pf.suspended(1)
    reopened.close()
    pf.media(1).write_bytes(b"\x11" * MIB)
    hosting.discard("p1")
    assert hosting.hosted_ids() == [] and pf.media(1).read_bytes() == bytes(MIB)
    hosting.close()


def test_the_inventory_must_match_the_slots_given(pf: Pf, tmp_path: Path) -> None:
    hosting = pf.hosting()
    hosting.create("p1", MIB).close()
    hosting.close()
    moved = tmp_path / "elsewhere.ns"
    moved.write_bytes(bytes(MIB))
    with pytest.raises(HostingError, match=r"slot CNTLID 1 holds controller 'p1' on namespace 1 at .*vf1.ns, but "
                                           r"--slot gives namespace 1 at .*elsewhere.ns; pass the slot as it was"):
        pf.hosting(slots=[f"1:1:{moved}", pf.slots[1]])
    with pytest.raises(HostingError, match=r"slots CNTLID 1 \('p1'\) hold controllers but are not among --slot"):
        pf.hosting(slots=pf.slots[1:])
    with pytest.raises(HostingError, match=r"slot CNTLID 9 is not a VF this PF migrates: .*INVALID_CONTROLLER_ID"):
        pf.hosting(slots=[*pf.slots, f"9:1:{moved}"])
    assert (pf.data_dir / SLOTS_FILE).exists()


def test_a_data_dir_serves_one_backend(pf: Pf, tmp_path: Path) -> None:
    pf.hosting().close()  # writes its slot inventory into the data dir
    with pytest.raises(HostingError, match="belongs to an nvme-passthru agent"):
        EmulatedHosting(pf.data_dir, 1 << 30)
    emulated_dir = tmp_path / "emulated"
    EmulatedHosting(emulated_dir, 1 << 30).create("c1", MIB).close()
    with pytest.raises(HostingError, match=r"holds emulated controllers \(c1.json\)"):
        pf.data_dir = emulated_dir
        pf.hosting()


def test_emulated_hosting_counts_controllers_and_destinations(tmp_path: Path) -> None:
    hosting = EmulatedHosting(tmp_path, 4 * MIB)
    assert hosting.capabilities.guest_workload and hosting.capabilities.nbd_export
    ctrl = hosting.create("c1", MIB)
    dst = hosting.create_destination("c2", "mig-1", 2 * MIB)
    assert hosting.allocated_bytes() == 3 * MIB and hosting.guest(ctrl) is ctrl
    assert hosting.capacity_problem("c3", 2 * MIB) == "1048576 bytes are free; controller 'c3' needs 2097152"
    assert hosting.capacity_problem("c3", 1000) == f"namespace_bytes 1000 must be a positive multiple of {BLOCK_BYTES}"
    dst.close()
    ctrl.close()
    restarted = EmulatedHosting(tmp_path, 4 * MIB)
    assert restarted.hosted_ids() == ["c1"] and restarted.pending_destinations() == [("c2", "mig-1")]
    assert restarted.allocated_bytes() == 3 * MIB
    reloaded = restarted.reload_destination("c2", "mig-1")
    assert reloaded.vfio_state is S.RESUMING and reloaded.namespace_bytes == 2 * MIB
    reloaded.close()
    restarted.adopt_destination("c2", "mig-1")
    assert restarted.hosted_ids() == ["c1", "c2"] and restarted.pending_destinations() == []
    restarted.discard("c1")
    assert restarted.hosted_ids() == ["c2"] and not (tmp_path / "c1.ns").exists()
    assert restarted.allocated_bytes() == 2 * MIB


def test_a_destination_without_a_guest_refuses_a_running_guest(pf: Pf) -> None:
    hosting = pf.hosting()
    controller = hosting.create_destination("p1", "mig-1", MIB)
    session = DestinationSession(job_id="mig-1", epoch=1, controller_id="p1", controller=controller,
                                 guest=hosting.guest(controller), backend=hosting.kind)
    running_guest = bytes([1]) + b"guest state"
    with pytest.raises(SessionError, match="backend nvme-passthru has no built-in guest to continue it") as refused:
        asyncio.run(session.apply_final(b"not even looked at", running_guest))
    assert refused.value.kind is ErrorKind.PRECONDITION and controller.vfio_state is S.RESUMING
    controller.close()
    hosting.close()


def test_the_passthru_backend_does_not_import_the_nvme_model() -> None:
    # The fake PF runs the model in the agent's process; production code paths must not need it.
    probe = ("import sys, agent.main, agent.backends.passthru_hosting, agent.backends.vfio; "
             "print(sorted(m for m in sys.modules if m.startswith('agent.emulated')))")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True)
    assert done.stdout.strip() == "[]"
