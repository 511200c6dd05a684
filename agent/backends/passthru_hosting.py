"""Hosting on the nvme-passthru backend: the VF slots of one PF.

The agent is given the PF (``--device /dev/nvme0``) and an inventory of slots, each one VF: its
CNTLID, the namespace id it uses, and the PF-side block device of that namespace
(``--slot CNTLID:NSID:PATH``, repeated).  A controller, or a migration destination, takes a free
slot whose namespace is exactly its size; its namespace data moves through that block device.

The assignment of slots lives in ``<data dir>/nvme-passthru.slots`` (JSON, written atomically):
per CNTLID, its namespace id and path, the controller it holds (and the job, while it is a
destination), and whether its namespace is known to be zero.  A slot whose contents are unknown
(never used by this agent) is erased before it is handed out, since a controller starts empty and
a destination receives only the blocks that hold data.

A released slot keeps its VF suspended (Release sanitizes the namespace, but nothing resumes the
VF), and a slot that a migration suspended stays so across an agent restart.  So each VF is opened
as the device reports it (the CSUP bit of Get Controller State): a suspended VF is resumed before
it runs a new controller, and is not suspended again to become a destination.

This module reaches the device only through the passthrough channel and the namespace block
devices, with the ioctl the agent was given (``DeviceAccess``): never through a device model.
"""

from __future__ import annotations

import json
import logging
import stat
import threading
from dataclasses import asdict, dataclass
from pathlib import Path

from agent.backend import GuestDrivenController, MigratableController
from agent.backends.hosting import DeviceAccess, HostingCapabilities, HostingError
from agent.backends.namespace_device import DeviceUnavailableError, NamespaceDevice
from agent.backends.nvme_passthru import NvmeAdminChannel, NvmePassthruController
from agent.controller_errors import ControllerError
from agent.datadir import write_atomically
from agent.nvme import commands
from agent.nvme.migration_driver import MigrationDriver, timed_submit
from agent.nvme.spec import ID_CTRL_OACS, IDENTIFY_BYTES, OACS_HMLMS, SMART_BYTES, LogPageId
from agent.vfio_states import VfioState

log = logging.getLogger(__name__)

KIND = "nvme-passthru"
SLOTS_FILE = "nvme-passthru.slots"
SLOT_FORMAT = ("CNTLID:NSID:PATH, e.g. 3:3:/dev/nvme0n3 (the VF's controller id, its namespace id, and that "
               "namespace's block device on the PF)")


@dataclass(frozen=True)
class Slot:
    """One VF of the PF and its namespace, as the agent was given it."""

    cntlid: int
    nsid: int
    path: Path


def parse_slot(text: str) -> Slot:
    """``CNTLID:NSID:PATH`` -> Slot; ValueError naming the value and the format."""
    parts = text.split(":", 2)
    if len(parts) != 3 or not parts[2]:
        raise ValueError(f"--slot {text!r} is not {SLOT_FORMAT}")
    try:
        cntlid, nsid = int(parts[0], 0), int(parts[1], 0)
    except ValueError:
        raise ValueError(f"--slot {text!r}: CNTLID and NSID must be numbers; the format is {SLOT_FORMAT}") from None
    if not 1 <= cntlid <= 0xFFFE:
        raise ValueError(f"--slot {text!r}: CNTLID {cntlid} is not a VF's controller id (1..65534)")
    if not 1 <= nsid < 0xFFFF_FFFF:
        raise ValueError(f"--slot {text!r}: NSID {nsid} is not a namespace id (1..4294967294)")
    return Slot(cntlid, nsid, Path(parts[2]))


@dataclass
class SlotRecord:
    """What the slots file keeps per CNTLID."""

    nsid: int
    path: str
    controller_id: str = ""  # the controller it holds, "" when free
    job_id: str = ""  # while it is the destination of that job
    zeroed: bool = False  # its namespace is known to read as zeros


class PassthruHosting:
    """Controllers on VF slots of the PF at ``device``; see the module docstring."""

    kind = KIND

    def __init__(self, data_dir: Path, device: Path, slots: list[Slot], *,
                 access: DeviceAccess | None = None) -> None:
        self.data_dir = Path(data_dir)
        self.device = Path(device)
        self._access = access or DeviceAccess()
        self._lock = threading.RLock()
        if not slots:
            raise HostingError(f"backend {KIND} needs at least one --slot {SLOT_FORMAT}")
        self._check_distinct(slots)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        emulated = sorted(p.name for p in self.data_dir.glob("*.json"))
        if emulated:
            raise HostingError(f"data dir {self.data_dir} holds emulated controllers ({', '.join(emulated)}); "
                               f"give the {KIND} backend its own --data-dir")
        self._slots = {s.cntlid: s for s in slots}
        self._sizes = {s.cntlid: self._namespace_size(s) for s in slots}
        self.sparse = all(not self._is_block_device(s.path) for s in slots)
        try:
            self._admin = NvmeAdminChannel.open(self.device, ioctl=self._access.ioctl)
        except DeviceUnavailableError as exc:
            raise HostingError(str(exc)) from None
        try:
            self._check_pf(slots)
            self._records = self._load(slots)
            self._save()
        except BaseException:
            self._admin.close()
            raise

    # ----- start-up checks ----------------------------------------------------------------------

    @staticmethod
    def _check_distinct(slots: list[Slot]) -> None:
        for attribute in ("cntlid", "path"):
            values = [getattr(s, attribute) for s in slots]
            repeated = sorted({str(v) for v in values if values.count(v) > 1})
            if repeated:
                raise HostingError(f"--slot names {attribute.upper()} {', '.join(repeated)} more than once; "
                                   "each VF and each namespace is one slot")

    @staticmethod
    def _is_block_device(path: Path) -> bool:
        return stat.S_ISBLK(path.stat().st_mode)

    def _namespace_size(self, slot: Slot) -> int:
        try:
            namespace = NamespaceDevice(slot.path, ioctl=self._access.ioctl)
        except (DeviceUnavailableError, ValueError) as exc:
            raise HostingError(f"slot CNTLID {slot.cntlid}: {exc}") from None
        try:
            return namespace.size_bytes
        finally:
            namespace.close()

    def _check_pf(self, slots: list[Slot]) -> None:
        try:
            identify = self._admin.submit(commands.identify_controller(), "Identify Controller",
                                          read_bytes=IDENTIFY_BYTES)
        except ControllerError as exc:
            raise HostingError(f"device {self.device} does not answer as an NVMe controller: {exc}") from None
        oacs = int.from_bytes(identify.data[ID_CTRL_OACS:ID_CTRL_OACS + 2], "little")
        if not oacs & OACS_HMLMS:
            raise HostingError(f"device {self.device} does not support host managed live migration (Identify "
                               f"Controller OACS={oacs:#06x}, bit 11 HMLMS clear): it cannot migrate its VFs; "
                               "pass the PF of a TP4159 device")
        for slot in slots:
            try:
                MigrationDriver(self._admin, slot.cntlid).suspended()
            except ControllerError as exc:
                raise HostingError(f"slot CNTLID {slot.cntlid} is not a VF this PF migrates: {exc}") from None

    # ----- the slots file ---------------------------------------------------------------------

    @property
    def _file(self) -> Path:
        return self.data_dir / SLOTS_FILE

    def _load(self, slots: list[Slot]) -> dict[int, SlotRecord]:
        stored: dict[int, SlotRecord] = {}
        if self._file.exists():
            try:
                raw = json.loads(self._file.read_text())
                stored = {int(c): SlotRecord(**r) for c, r in raw["slots"].items()}
            except (ValueError, KeyError, TypeError) as exc:
                raise HostingError(f"slot inventory {self._file} is unreadable ({exc}); restore it or move it "
                                   "away (the controllers it recorded are then forgotten)") from None
        records = {}
        for slot in slots:
            record = stored.pop(slot.cntlid, None)
            if record is not None and record.controller_id and (record.nsid, record.path) != (slot.nsid,
                                                                                              str(slot.path)):
                raise HostingError(f"slot CNTLID {slot.cntlid} holds controller {record.controller_id!r} on "
                                   f"namespace {record.nsid} at {record.path}, but --slot gives namespace "
                                   f"{slot.nsid} at {slot.path}; pass the slot as it was")
            if record is None or (record.nsid, record.path) != (slot.nsid, str(slot.path)):
                record = SlotRecord(slot.nsid, str(slot.path))  # new, or another namespace: contents unknown
            records[slot.cntlid] = record
        held = {c: r.controller_id for c, r in stored.items() if r.controller_id}
        if held:
            listed = ", ".join(f"CNTLID {c} ({cid!r})" for c, cid in sorted(held.items()))
            raise HostingError(f"slots {listed} hold controllers but are not among --slot; pass them again")
        return records

    def _save(self) -> None:
        data = {"version": 1, "pf": str(self.device),
                "slots": {str(c): asdict(r) for c, r in sorted(self._records.items())}}
        write_atomically(self._file, json.dumps(data, indent=1).encode())  # never a half-written inventory

    # ----- capacity -----------------------------------------------------------------------------

    @property
    def capabilities(self) -> HostingCapabilities:
        return HostingCapabilities(guest_workload=False, nbd_export=False, sparse_extents=self.sparse)

    @property
    def capacity_bytes(self) -> int:
        return sum(self._sizes.values())

    def allocated_bytes(self) -> int:
        with self._lock:
            return sum(self._sizes[c] for c, r in self._records.items() if r.controller_id)

    def _free_slot(self, namespace_bytes: int) -> int | None:
        free = [c for c, r in sorted(self._records.items())
                if not r.controller_id and self._sizes[c] == namespace_bytes]
        return free[0] if free else None

    def capacity_problem(self, controller_id: str, namespace_bytes: int) -> str | None:
        with self._lock:
            if self._free_slot(namespace_bytes) is not None:
                return None
            free = [f"CNTLID {c}: {self._sizes[c]} bytes" for c, r in sorted(self._records.items())
                    if not r.controller_id]
            return (f"no free {KIND} slot of {namespace_bytes} bytes for controller {controller_id!r} (free slots: "
                    f"{'; '.join(free) or 'none'}); a slot's namespace must be exactly the controller's size")

    # ----- opening a slot ---------------------------------------------------------------------

    def _slot_of(self, controller_id: str, job_id: str = "") -> int:
        for cntlid, record in self._records.items():
            if record.controller_id == controller_id and record.job_id == job_id:
                return cntlid
        role = f"the destination of job {job_id}" if job_id else "a controller"
        raise HostingError(f"no {KIND} slot holds {role} {controller_id!r}")

    def _open(self, controller_id: str, cntlid: int) -> NvmePassthruController:
        """The VF as the device has it: STOP when it is suspended, else RUNNING."""
        slot = self._slots[cntlid]
        suspended = MigrationDriver(self._admin, cntlid).suspended()
        namespace = NamespaceDevice(slot.path, ioctl=self._access.ioctl)
        return NvmePassthruController(controller_id, self._admin, cntlid, slot.nsid, namespace,
                                      state=VfioState.STOP if suspended else VfioState.RUNNING, owns_admin=False)

    def _erase(self, cntlid: int) -> None:
        namespace = NamespaceDevice(self._slots[cntlid].path, ioctl=self._access.ioctl)
        try:
            namespace.erase()
        finally:
            namespace.close()
        self._records[cntlid].zeroed = True

    def _take(self, controller_id: str, job_id: str, namespace_bytes: int) -> int:
        cntlid = self._free_slot(namespace_bytes)
        if cntlid is None:
            raise HostingError(str(self.capacity_problem(controller_id, namespace_bytes)))
        if not self._records[cntlid].zeroed:
            log.info("slot CNTLID %d: contents unknown, erasing %s before use", cntlid, self._slots[cntlid].path)
            self._erase(cntlid)
        record = self._records[cntlid]
        record.controller_id, record.job_id, record.zeroed = controller_id, job_id, False
        self._save()
        return cntlid

    def _give_back(self, cntlid: int, *, zeroed: bool) -> None:
        record = self._records[cntlid]
        record.controller_id, record.job_id, record.zeroed = "", "", zeroed
        self._save()

    # ----- controllers --------------------------------------------------------------------------

    def create(self, controller_id: str, namespace_bytes: int) -> NvmePassthruController:
        with self._lock:
            cntlid = self._take(controller_id, "", namespace_bytes)
            try:
                controller = self._open(controller_id, cntlid)
                if controller.vfio_state is VfioState.STOP:
                    controller.set_state(VfioState.RUNNING)  # a released VF was left suspended: Resume
            except BaseException:
                self._give_back(cntlid, zeroed=True)
                raise
            log.info("controller %s on slot CNTLID %d (%s)", controller_id, cntlid, self._slots[cntlid].path)
            return controller

    def hosted_ids(self) -> list[str]:
        with self._lock:
            return sorted(r.controller_id for r in self._records.values() if r.controller_id and not r.job_id)

    def reopen(self, controller_id: str) -> NvmePassthruController:
        with self._lock:
            return self._open(controller_id, self._slot_of(controller_id))

    def discard(self, controller_id: str, job_id: str = "") -> None:
        with self._lock:
            cntlid = self._slot_of(controller_id, job_id)
            self._erase(cntlid)
            self._give_back(cntlid, zeroed=True)

    # ----- destinations -------------------------------------------------------------------------

    def create_destination(self, controller_id: str, job_id: str, namespace_bytes: int) -> NvmePassthruController:
        with self._lock:
            cntlid = self._take(controller_id, job_id, namespace_bytes)
            try:
                controller = self._open(controller_id, cntlid)
                controller.set_state(VfioState.RESUMING)  # Suspend, unless the VF already is
            except BaseException:
                self._give_back(cntlid, zeroed=True)
                raise
            log.info("destination of job %s for controller %s on slot CNTLID %d", job_id, controller_id, cntlid)
            return controller

    def pending_destinations(self) -> list[tuple[str, str]]:
        with self._lock:
            return sorted((r.controller_id, r.job_id) for r in self._records.values() if r.job_id)

    def reload_destination(self, controller_id: str, job_id: str) -> NvmePassthruController:
        with self._lock:
            controller = self._open(controller_id, self._slot_of(controller_id, job_id))
            controller.set_state(VfioState.RESUMING)
            return controller

    def adopt_destination(self, controller_id: str, job_id: str) -> None:
        with self._lock:
            record = self._records[self._slot_of(controller_id, job_id)]
            record.job_id = ""
            try:
                self._save()
            except BaseException:
                record.job_id = job_id  # not recorded (disk full): still the pending destination
                raise

    def unadopt_destination(self, controller_id: str, job_id: str) -> None:
        with self._lock:
            record = self._records[self._slot_of(controller_id)]
            record.job_id = job_id
            try:
                self._save()
            except BaseException:
                record.job_id = ""
                raise

    def release(self, controller_id: str, job_id: str = "") -> None:
        """The controller's release() erased the namespace; the VF stays suspended."""
        with self._lock:
            self._give_back(self._slot_of(controller_id, job_id), zeroed=True)

    def guest(self, controller: MigratableController) -> GuestDrivenController | None:
        return None  # a VF's guest is the VM it is passed to

    def health_log(self) -> bytes | None:
        """The PF's SMART / Health log: the drive's, whichever VF a controller runs on."""
        try:
            got = timed_submit(self._admin, commands.get_log_page(LogPageId.SMART_HEALTH, SMART_BYTES),
                               "Get Log Page (SMART / Health)", read_bytes=SMART_BYTES)
        except ControllerError as exc:
            log.debug("SMART / Health log of %s not read: %s", self.device, exc)
            return None
        return got.data

    def close(self) -> None:
        self._admin.close()
