"""The emulated NVM subsystem: controllers that execute real 64-byte commands and answer 16-byte completions.

One primary controller (cntlid 0) is the PF the host owns and the TP4159 migration controller;
secondary controllers (cntlid 1, 2, ...) are the migratable controllers guests drive, one VF each.
Namespaces live in sparse files of 4096-byte blocks and are attached to controllers.

``submit_admin`` and ``submit_io`` take an encoded submission queue entry, run it as the controller
would after fetching it from that queue, advance the queue registers (they are part of the
migrated state), and return the encoded completion plus any data for the host.  Data buffers
travel as Python bytes instead of through PRPs; only the Controller Data Queue, which the
controller writes on its own, lives in ``host_memory`` at its PRP1 address.

Failed commands complete with the status the specification names, the More bit set, and an
Error Information log entry whose detail text our vendor log page C0h returns; a host reads it to
say exactly which field held which value.

Thread safety: one re-entrant lock guards the whole subsystem.  A guest thread and the agent
(through asyncio.to_thread) submit at the same time; a write and its change-log entry happen under
the same lock, which is what guarantees that a host reading the change log never misses an
acknowledged write.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import fields
from threading import RLock

from agent.controller_errors import ControllerGoneError
from agent.emulated.model import checks, structures
from agent.emulated.model.controllers import (
    ATTR_IEN,
    ATTR_PC,
    ATTR_PHASE,
    ATTR_SQ_PRIORITY_SHIFT,
    DEFAULT_FEATURES,
    ERROR_LOG_ENTRIES,
    MAX_QUEUE_ENTRIES,
    MAX_QUEUES,
    CommandError,
    ControllerModel,
    Queue,
)
from agent.emulated.model.hostmem import PAGE_BYTES, HostMemory
from agent.emulated.model.migration import STATE_VERSIONS, HostManagedMigration
from agent.emulated.model.namespace import NamespaceStore
from agent.nvme.commands import Sqe, decode_dsm_ranges, pack_cqe
from agent.nvme.spec import (
    BROADCAST_NSID,
    DSM_ATTRIBUTE_DEALLOCATE,
    DSM_RANGE_BYTES,
    ERROR_LOG_ENTRY_BYTES,
    FEATURE_CAP_CHANGEABLE,
    LBA_BYTES,
    MIGRATION_OPCODES,
    RW_FUA,
    WRITE_ZEROES_DEAC,
    AdminOpcode,
    Cns,
    FeatureId,
    FeatureSelect,
    IoOpcode,
    LogPageId,
    Status,
)
from agent.nvme.state_format import MAX_CONTROLLER_ID_BYTES, ControllerState

PRIMARY_CNTLID = 0
ADMIN_QUEUE_ENTRIES = 32
INTERRUPT_VECTORS = 64
_PRIMARY_ASQ = 0x10_0000
_PRIMARY_ACQ = 0x11_0000
# CDW0 bits 13:10 are reserved; FUSE (9:8) and PSDT (15:14) name features we lack.
_CDW0_FLAGS_RESERVED = 0x3C
# Read/Write CDW12: NLB 15:0, FUA 30 and LR 31 are honoured; 29:16 hold protection information,
# directive and storage-tag fields for features this controller does not have.
_RW_CDW12_UNSUPPORTED = 0x3FFF_0000
_WZ_CDW12_UNSUPPORTED = _RW_CDW12_UNSUPPORTED & ~WRITE_ZEROES_DEAC

Outcome = tuple[int, int, bytes]
Handler = Callable[[ControllerModel, Sqe, "bytes | None"], Outcome]


class NvmeSubsystemModel:
    """An NVM subsystem: a primary controller, secondary controllers, namespaces, health."""

    def __init__(self, serial: str, *, host_memory: HostMemory | None = None) -> None:
        self.lock = RLock()
        self.serial = serial
        self.subsystem_nqn = f"nqn.2024-01.io.nvmigrate:subsystem:{serial}"
        self.host_memory = host_memory if host_memory is not None else HostMemory()
        self.health = structures.Health()
        primary = ControllerModel(PRIMARY_CNTLID, "migration controller", primary=True)
        primary.enable(ADMIN_QUEUE_ENTRIES, _PRIMARY_ASQ, _PRIMARY_ACQ)
        self._controllers: dict[int, ControllerModel] = {PRIMARY_CNTLID: primary}
        self._namespaces: dict[int, NamespaceStore] = {}
        self.migration = HostManagedMigration(self._controllers, self.host_memory)
        admin: dict[int, Handler] = {
            AdminOpcode.IDENTIFY: self._identify,
            AdminOpcode.GET_LOG_PAGE: self._get_log_page,
            AdminOpcode.SET_FEATURES: self._set_features,
            AdminOpcode.GET_FEATURES: self._get_features,
            AdminOpcode.CREATE_IO_CQ: self._create_io_cq,
            AdminOpcode.CREATE_IO_SQ: self._create_io_sq,
            AdminOpcode.DELETE_IO_SQ: self._delete_io_sq,
            AdminOpcode.DELETE_IO_CQ: self._delete_io_cq,
        }
        # The TP4159 commands exist only on the migration controller's admin queue: suspending a
        # controller, reading its state or its change log are privileged actions of the host, so a
        # guest driving a secondary controller (a VF) must not reach them, and a secondary reports
        # OACS.HMLMS=0.  To it they are opcodes it does not implement.
        self._primary_admin = admin | self.migration.handlers
        self._secondary_admin = admin
        self._io: dict[int, Handler] = {
            IoOpcode.READ: self._read,
            IoOpcode.WRITE: self._write,
            IoOpcode.FLUSH: self._flush,
            IoOpcode.WRITE_ZEROES: self._write_zeroes,
            IoOpcode.DATASET_MANAGEMENT: self._dataset_management,
        }

    # ----- configuration (what a subsystem is built with; not commands) -------------------------

    def add_secondary(self, name: str, *, suspended: bool = False) -> int:
        """A new secondary controller, disabled until ``enable_controller``; returns its cntlid.

        ``suspended`` creates it as a migration destination: suspended, waiting for Set Controller
        State.  ``name`` is the identity its controller state carries; an empty name makes an
        anonymous VF, as a real device's are: its state names no controller, and it takes a state
        whatever controller that names.
        """
        if not isinstance(name, str) or len(name.encode("utf-8")) > MAX_CONTROLLER_ID_BYTES:
            raise ValueError(f"name={name!r} must be 0..{MAX_CONTROLLER_ID_BYTES} UTF-8 bytes: the controller state "
                             "carries it")
        with self.lock:
            cntlid = max(self._controllers) + 1
            self._controllers[cntlid] = ControllerModel(cntlid, name, primary=False, suspended=suspended)
            return cntlid

    def attach_namespace(self, nsid: int, store: NamespaceStore, cntlids: Iterable[int]) -> None:
        with self.lock:
            if not 1 <= nsid <= structures.MAX_NAMESPACES:
                raise ValueError(f"nsid={nsid} must be 1..{structures.MAX_NAMESPACES} (Identify NN)")
            if store.lock is not self.lock:
                raise ValueError(f"namespace {store.path} must be built with this subsystem's lock "
                                 "(NamespaceStore(..., lock=model.lock)): commands and direct access share it")
            if self._namespaces.get(nsid, store) is not store:
                raise ValueError(f"nsid={nsid} already names another namespace ({self._namespaces[nsid].path})")
            self._namespaces[nsid] = store
            for cntlid in cntlids:
                self._controller(cntlid).namespaces[nsid] = store

    def enable_controller(self, cntlid: int, *, admin_entries: int, asq: int, acq: int) -> None:
        """The driver's register writes: AQA, ASQ, ACQ, then CC.EN=1 (the controller reports RDY)."""
        with self.lock:
            self._controller(cntlid).enable(admin_entries, asq, acq)

    def controller_state(self, cntlid: int) -> ControllerState:
        """The state Get Controller State would return, as a value (for inspection and tests)."""
        with self.lock:
            return self._controller(cntlid).state()

    def suspended(self, cntlid: int) -> bool:
        with self.lock:
            return self._controller(cntlid).suspended

    def set_health(self, **values: int) -> None:
        """Test hook for the SMART / Health log: temperature_k, available_spare, percentage_used, ..."""
        known = {f.name for f in fields(structures.Health)}
        with self.lock:
            for name, value in values.items():
                if name not in known:
                    raise ValueError(f"set_health: unknown field {name!r}; known fields: {sorted(known)}")
                if not isinstance(value, int) or value < 0:
                    raise ValueError(f"set_health: {name}={value!r} must be a non-negative integer")
                setattr(self.health, name, value)

    def _controller(self, cntlid: int) -> ControllerModel:
        ctrl = self._controllers.get(cntlid)
        if ctrl is None:
            raise ValueError(f"cntlid={cntlid} names no controller of this subsystem "
                             f"(controllers: {sorted(self._controllers)})")
        return ctrl

    # ----- command submission -------------------------------------------------------------------

    def submit_admin(self, cntlid: int, sqe: bytes, data: bytes | None = None) -> tuple[bytes, bytes]:
        """Run one admin command on controller ``cntlid``: (16-byte CQE, data for the host)."""
        return self._submit(cntlid, 0, sqe, data)

    def submit_io(self, cntlid: int, sqid: int, sqe: bytes, data: bytes | None = None) -> tuple[bytes, bytes]:
        """Run one I/O command from I/O submission queue ``sqid``: (16-byte CQE, data for the host)."""
        if sqid == 0:
            raise ValueError("sqid=0 is the admin submission queue; use submit_admin")
        return self._submit(cntlid, sqid, sqe, data)

    def _submit(self, cntlid: int, sqid: int, raw: bytes, data: bytes | None) -> tuple[bytes, bytes]:
        with self.lock:
            ctrl = self._controller(cntlid)
            sq = ctrl.sqs.get(sqid)
            if sq is None:
                raise ValueError(f"controller {cntlid} has no submission queue {sqid} (it has "
                                 f"{sorted(ctrl.sqs)}); create it, or enable the controller for the admin queue")
            cq = ctrl.cqs[sq.bound_cq]
            cmd = Sqe.decode(raw)
            if ctrl.suspended:
                # A suspended controller fetches nothing: the queues keep their registers, which is
                # what makes the saved state exact.  A synchronous model must still answer, so it
                # answers Namespace Not Ready with DNR clear: "not now, retry later".
                return pack_cqe(cmd.cid, sqid, sq.head, cq.attributes >> 2 & 1, Status.NAMESPACE_NOT_READY), b""
            if sqid:
                handlers = self._io
            else:
                handlers = self._primary_admin if ctrl.primary else self._secondary_admin
            dw0 = dw1 = 0
            out = b""
            status, more, dnr = Status.SUCCESS, False, False
            try:
                handler = handlers.get(cmd.opcode)
                if handler is None:
                    raise CommandError(Status.INVALID_OPCODE, self._unknown_opcode(ctrl, sqid, cmd.opcode))
                if cmd.flags:
                    self._check_flags(cmd)
                dw0, dw1, out = handler(ctrl, cmd, data)
            except CommandError as exc:
                ctrl.record_error(sqid, cmd.cid, cmd.nsid, exc)
                status, more, dnr = exc.status, True, exc.dnr
            except ControllerGoneError as exc:
                ctrl.record_error(sqid, cmd.cid, cmd.nsid, CommandError(Status.NAMESPACE_NOT_READY, str(exc)))
                status, more, dnr = Status.NAMESPACE_NOT_READY, True, True
            except OSError as exc:
                ctrl.record_error(sqid, cmd.cid, cmd.nsid, CommandError(Status.INTERNAL_ERROR, str(exc)))
                status, more, dnr = Status.INTERNAL_ERROR, True, False
            # Submitted (host rang the doorbell), fetched, completed into the bound CQ, reaped.
            sq.tail = (sq.tail + 1) % sq.size
            sq.head = sq.tail
            phase = cq.attributes >> 2 & 1
            cq.tail = (cq.tail + 1) % cq.size
            if cq.tail == 0:
                # The controller inverts the phase tag each time it wraps the completion queue.
                cq.attributes ^= ATTR_PHASE
            cq.head = cq.tail
            return pack_cqe(cmd.cid, sqid, sq.head, phase, status, more=more, dnr=dnr, dw0=dw0, dw1=dw1), out

    @staticmethod
    def _unknown_opcode(ctrl: ControllerModel, sqid: int, opcode: int) -> str:
        if sqid == 0 and opcode in MIGRATION_OPCODES and not ctrl.primary:
            return (f"opcode {opcode:#04x} ({AdminOpcode(opcode).name}) is a migration controller command; "
                    f"controller {ctrl.cntlid} is a migratable (secondary) controller and does not implement it")
        kind = "admin" if sqid == 0 else "I/O"
        return f"opcode {opcode:#04x} is not a supported {kind} command"

    @staticmethod
    def _check_flags(cmd: Sqe) -> None:
        checks.reserved("CDW0 bits 15:8", cmd.flags, _CDW0_FLAGS_RESERVED)
        if cmd.fuse:
            raise CommandError(Status.INVALID_FIELD, f"FUSE={cmd.fuse}: fused operations are not supported")
        raise CommandError(Status.INVALID_FIELD, f"PSDT={cmd.psdt}: SGLs are not supported (Identify SGLS=0); "
                                                 "use PRPs (PSDT=0)")

    # ----- Identify -----------------------------------------------------------------------------

    def _identify(self, ctrl: ControllerModel, cmd: Sqe, data: bytes | None) -> Outcome:
        checks.reserved("cdw10", cmd.cdw10, 0xFFFF_FF00)  # CNTID (31:16) is not used by the CNS we answer
        checks.unused_dwords(cmd, "cdw11", "cdw12", "cdw13", "cdw14", "cdw15")
        cns = cmd.cdw10 & 0xFF
        if cns == Cns.CONTROLLER:
            checks.no_nsid(cmd)
            migratable = sum(not c.primary for c in self._controllers.values())
            return 0, 0, structures.identify_controller(
                cntlid=ctrl.cntlid, serial=self.serial, subsystem_nqn=self.subsystem_nqn,
                migration_controller=ctrl.primary, secondary=not ctrl.primary, migratable_controllers=migratable)
        if cns == Cns.NAMESPACE:
            if cmd.nsid == 0 or cmd.nsid > structures.MAX_NAMESPACES:
                # FFFFFFFFh would ask for the capabilities common to all namespaces: not reported.
                raise CommandError(Status.INVALID_NAMESPACE_OR_FORMAT,
                                   f"nsid={cmd.nsid:#x} is not a namespace id (1..{structures.MAX_NAMESPACES})")
            store = ctrl.namespaces.get(cmd.nsid)
            if store is None:  # inactive: a zero-filled structure, as the specification asks
                return 0, 0, bytes(4096)
            return 0, 0, structures.identify_namespace(block_count=store.block_count,
                                                       allocated_blocks=store.allocated_bytes() // LBA_BYTES)
        if cns == Cns.ACTIVE_NAMESPACES:
            if cmd.nsid >= BROADCAST_NSID - 1:
                raise CommandError(Status.INVALID_NAMESPACE_OR_FORMAT,
                                   f"nsid={cmd.nsid:#x} cannot start an active namespace list")
            return 0, 0, structures.active_namespaces(ctrl.namespaces, cmd.nsid)
        if cns == Cns.SUPPORTED_CONTROLLER_STATE_FORMATS and ctrl.primary:
            checks.no_nsid(cmd)
            return 0, 0, structures.supported_state_formats(STATE_VERSIONS)
        raise CommandError(Status.INVALID_FIELD, f"CNS={cns:#04x} is not supported by controller {ctrl.cntlid}")

    # ----- Get Log Page -------------------------------------------------------------------------

    def _get_log_page(self, ctrl: ControllerModel, cmd: Sqe, data: bytes | None) -> Outcome:
        lid = cmd.cdw10 & 0xFF
        checks.reserved("cdw10 LSP", cmd.cdw10, 0x7F00)  # no log page here has log specific fields
        checks.reserved("cdw11 LSI", cmd.cdw11, 0xFFFF_0000)
        checks.unused_dwords(cmd, "cdw14", "cdw15")
        if cmd.nsid not in (0, BROADCAST_NSID):
            raise CommandError(Status.INVALID_FIELD, f"nsid={cmd.nsid:#x}: log pages are per controller here "
                                                     "(LPA bit 0 = 0); use 0 or FFFFFFFFh")
        length = checks.transfer(((cmd.cdw10 >> 16 | cmd.cdw11 << 16) + 1) * 4, "Get Log Page")
        offset = checks.byte_offset(cmd)
        if lid == LogPageId.SMART_HEALTH:
            page = structures.smart_log(
                self.health, over_threshold_k=ctrl.features[FeatureId.TEMPERATURE_THRESHOLD, 0],
                under_threshold_k=ctrl.features[FeatureId.TEMPERATURE_THRESHOLD, 1],
                error_log_entries=ctrl.error_count)
        elif lid == LogPageId.ERROR_INFORMATION:
            page = structures.error_log(ctrl.errors).ljust(ERROR_LOG_ENTRIES * ERROR_LOG_ENTRY_BYTES, b"\0")
        elif lid == LogPageId.ERROR_DETAIL:
            page = structures.error_detail(ctrl.errors[0] if ctrl.errors else None)
        else:
            raise CommandError(Status.INVALID_LOG_PAGE, f"log page {lid:#04x} is not supported")
        return 0, 0, checks.piece(page, offset, length)

    # ----- Features -----------------------------------------------------------------------------

    def _feature_target(self, ctrl: ControllerModel, cmd: Sqe, fid: int) -> None:
        if cmd.nsid not in (0, BROADCAST_NSID):
            raise CommandError(Status.INVALID_FIELD, f"nsid={cmd.nsid:#x}: feature {fid:#04x} is not namespace "
                                                     "specific; use 0")
        if fid == FeatureId.CONTROLLER_DATA_QUEUE and not ctrl.primary:
            raise CommandError(Status.INVALID_FIELD, f"feature {fid:#04x} (controller data queue) exists only on "
                                                     "the migration controller")
        if fid != FeatureId.CONTROLLER_DATA_QUEUE and (fid, 0) not in DEFAULT_FEATURES:
            raise CommandError(Status.INVALID_FIELD, f"feature id {fid:#04x} is not supported")

    def _set_features(self, ctrl: ControllerModel, cmd: Sqe, data: bytes | None) -> Outcome:
        fid = cmd.cdw10 & 0xFF
        if cmd.cdw10 >> 31:
            raise CommandError(Status.FEATURE_NOT_SAVEABLE, f"feature {fid:#04x} cannot be saved (SV=1)")
        checks.reserved("cdw10", cmd.cdw10, 0x7FFF_FF00)
        self._feature_target(ctrl, cmd, fid)
        value = cmd.cdw11
        if fid == FeatureId.CONTROLLER_DATA_QUEUE:
            checks.unused_dwords(cmd, "cdw14", "cdw15")
            return self.migration.set_cdq_feature(cmd)
        checks.unused_dwords(cmd, "cdw12", "cdw13", "cdw14", "cdw15")
        selector = 0
        if fid == FeatureId.ARBITRATION:
            checks.reserved("cdw11", value, 0x0000_00F8)
        elif fid == FeatureId.TEMPERATURE_THRESHOLD:
            selector = self._temperature_selector(value)
            value &= 0xFFFF
        elif fid == FeatureId.VOLATILE_WRITE_CACHE:
            checks.reserved("cdw11", value, 0xFFFF_FFFE)
        elif fid == FeatureId.INTERRUPT_COALESCING:
            checks.reserved("cdw11", value, 0xFFFF_0000)
        elif fid == FeatureId.NUMBER_OF_QUEUES:
            if len(ctrl.sqs) > 1 or len(ctrl.cqs) > 1:
                raise CommandError(Status.COMMAND_SEQUENCE_ERROR, "Number of Queues can only be set before any "
                                                                  "I/O queue is created")
            nsqr, ncqr = value & 0xFFFF, value >> 16
            if 0xFFFF in (nsqr, ncqr):
                raise CommandError(Status.INVALID_FIELD, f"cdw11={value:#010x}: 65536 queues (FFFFh) is not valid")
            value = min(nsqr, MAX_QUEUES - 2) | min(ncqr, MAX_QUEUES - 2) << 16
        ctrl.features[fid, selector] = value
        return (value if fid == FeatureId.NUMBER_OF_QUEUES else 0), 0, b""

    @staticmethod
    def _temperature_selector(cdw11: int) -> int:
        """TMPSEL 19:16 (only 0, the composite temperature) and THSEL 21:20 (0 over, 1 under)."""
        checks.reserved("cdw11", cdw11, 0xFFC0_0000)
        if cdw11 >> 16 & 0xF:
            raise CommandError(Status.INVALID_FIELD, f"TMPSEL={cdw11 >> 16 & 0xF}: only the composite "
                                                     "temperature (0) has a threshold")
        thsel = cdw11 >> 20 & 0x3
        if thsel > 1:
            raise CommandError(Status.INVALID_FIELD, f"THSEL={thsel} is not over (0) or under (1)")
        return thsel

    def _get_features(self, ctrl: ControllerModel, cmd: Sqe, data: bytes | None) -> Outcome:
        fid = cmd.cdw10 & 0xFF
        checks.reserved("cdw10", cmd.cdw10, 0xFFFF_F800)
        sel = cmd.cdw10 >> 8 & 0x7
        if sel > FeatureSelect.SUPPORTED_CAPABILITIES:
            raise CommandError(Status.INVALID_FIELD, f"SEL={sel} is not current, default, saved or capabilities")
        self._feature_target(ctrl, cmd, fid)
        checks.unused_dwords(cmd, "cdw12", "cdw13", "cdw14", "cdw15")
        if sel == FeatureSelect.SUPPORTED_CAPABILITIES:
            return FEATURE_CAP_CHANGEABLE, 0, b""
        if fid == FeatureId.CONTROLLER_DATA_QUEUE:
            if sel != FeatureSelect.CURRENT:
                raise CommandError(Status.INVALID_FIELD, f"SEL={sel}: a controller data queue has only current "
                                                         "pointers")
            return self.migration.get_cdq_feature(cmd)
        selector = 0
        if fid == FeatureId.TEMPERATURE_THRESHOLD:
            selector = self._temperature_selector(cmd.cdw11)
            checks.reserved("cdw11", cmd.cdw11, 0xFFFF)
        else:
            checks.reserved("cdw11", cmd.cdw11, 0xFFFF_FFFF)
        # Nothing is saveable, so "saved" reads as the default, as the specification asks.
        table = ctrl.features if sel == FeatureSelect.CURRENT else DEFAULT_FEATURES
        return table[fid, selector] | (cmd.cdw11 & 0x3F_0000), 0, b""

    # ----- I/O queues ---------------------------------------------------------------------------

    @staticmethod
    def _new_queue_id(ctrl: ControllerModel, cmd: Sqe, existing: dict[int, Queue], allocated: int, kind: str) -> int:
        qid = cmd.cdw10 & 0xFFFF
        if qid == 0 or qid > allocated or qid in existing:
            raise CommandError(Status.INVALID_QUEUE_IDENTIFIER,
                               f"{kind} queue id {qid} is not free and within 1..{allocated} (Number of Queues)")
        entries = (cmd.cdw10 >> 16) + 1
        if not 2 <= entries <= MAX_QUEUE_ENTRIES:
            raise CommandError(Status.INVALID_QUEUE_SIZE, f"{entries} entries is outside 2..{MAX_QUEUE_ENTRIES}")
        if not cmd.cdw11 & ATTR_PC:
            raise CommandError(Status.INVALID_FIELD, "PC=0: I/O queues must be physically contiguous (CAP.CQR=1)")
        if cmd.prp1 % PAGE_BYTES:
            raise CommandError(Status.PRP_OFFSET_INVALID, f"prp1={cmd.prp1:#x} is not page aligned")
        return qid

    def _create_io_cq(self, ctrl: ControllerModel, cmd: Sqe, data: bytes | None) -> Outcome:
        checks.no_nsid(cmd)
        checks.reserved("cdw11", cmd.cdw11, 0x0000_FFFC)
        checks.unused_dwords(cmd, "cdw12", "cdw13", "cdw14", "cdw15")
        allocated = (ctrl.features[FeatureId.NUMBER_OF_QUEUES, 0] >> 16) + 1
        qid = self._new_queue_id(ctrl, cmd, ctrl.cqs, allocated, "completion")
        vector = cmd.cdw11 >> 16
        if vector >= INTERRUPT_VECTORS:
            raise CommandError(Status.INVALID_INTERRUPT_VECTOR, f"interrupt vector {vector} is not below "
                                                                f"{INTERRUPT_VECTORS}")
        ctrl.cqs[qid] = Queue(qid, cmd.prp1, (cmd.cdw10 >> 16) + 1,
                              attributes=ATTR_PC | (cmd.cdw11 & ATTR_IEN) | ATTR_PHASE | vector << 16)
        return 0, 0, b""

    def _create_io_sq(self, ctrl: ControllerModel, cmd: Sqe, data: bytes | None) -> Outcome:
        checks.no_nsid(cmd)
        checks.reserved("cdw11", cmd.cdw11, 0x0000_FFF8)
        if cmd.cdw12:
            raise CommandError(Status.INVALID_FIELD, f"cdw12={cmd.cdw12:#x}: NVM Sets are not supported (NVMSETID 0)")
        checks.unused_dwords(cmd, "cdw13", "cdw14", "cdw15")
        allocated = (ctrl.features[FeatureId.NUMBER_OF_QUEUES, 0] & 0xFFFF) + 1
        qid = self._new_queue_id(ctrl, cmd, ctrl.sqs, allocated, "submission")
        cqid = cmd.cdw11 >> 16
        if cqid == 0 or cqid not in ctrl.cqs:
            raise CommandError(Status.COMPLETION_QUEUE_INVALID, f"completion queue {cqid} does not exist (I/O "
                                                                f"completion queues: {sorted(set(ctrl.cqs) - {0})})")
        priority = cmd.cdw11 >> ATTR_SQ_PRIORITY_SHIFT & 0x3
        ctrl.sqs[qid] = Queue(qid, cmd.prp1, (cmd.cdw10 >> 16) + 1,
                              attributes=ATTR_PC | priority << ATTR_SQ_PRIORITY_SHIFT | cqid << 16)
        return 0, 0, b""

    @staticmethod
    def _existing_queue_id(cmd: Sqe, existing: dict[int, Queue], kind: str) -> int:
        checks.no_nsid(cmd)
        checks.reserved("cdw10", cmd.cdw10, 0xFFFF_0000)
        checks.unused_dwords(cmd, "cdw11", "cdw12", "cdw13", "cdw14", "cdw15")
        qid = cmd.cdw10
        if qid == 0 or qid not in existing:
            raise CommandError(Status.INVALID_QUEUE_IDENTIFIER, f"{kind} queue {qid} is not an existing I/O queue")
        return qid

    def _delete_io_sq(self, ctrl: ControllerModel, cmd: Sqe, data: bytes | None) -> Outcome:
        del ctrl.sqs[self._existing_queue_id(cmd, ctrl.sqs, "submission")]
        return 0, 0, b""

    def _delete_io_cq(self, ctrl: ControllerModel, cmd: Sqe, data: bytes | None) -> Outcome:
        qid = self._existing_queue_id(cmd, ctrl.cqs, "completion")
        bound = sorted(sq.qid for sq in ctrl.sqs.values() if sq.bound_cq == qid)
        if bound:
            raise CommandError(Status.INVALID_QUEUE_DELETION, f"completion queue {qid} still serves submission "
                                                              f"queue(s) {bound}; delete those first")
        del ctrl.cqs[qid]
        return 0, 0, b""

    # ----- I/O commands -------------------------------------------------------------------------

    @staticmethod
    def _namespace(ctrl: ControllerModel, nsid: int) -> NamespaceStore:
        store = ctrl.namespaces.get(nsid)
        if store is not None:
            return store
        if nsid == 0 or nsid > structures.MAX_NAMESPACES:
            raise CommandError(Status.INVALID_NAMESPACE_OR_FORMAT,
                               f"nsid={nsid:#x} is not a namespace id (1..{structures.MAX_NAMESPACES})")
        # An inactive namespace id: Base 2.1 section 4.1 asks for Invalid Field in Command.
        raise CommandError(Status.INVALID_FIELD, f"namespace {nsid} is not attached to controller {ctrl.cntlid} "
                                                 f"(attached: {sorted(ctrl.namespaces)})")

    @classmethod
    def _blocks(cls, ctrl: ControllerModel, cmd: Sqe, unsupported_cdw12: int) -> tuple[NamespaceStore, int, int]:
        """Namespace, SLBA and block count of a Read/Write/Write Zeroes, bounds checked."""
        store = cls._namespace(ctrl, cmd.nsid)
        checks.reserved("cdw12", cmd.cdw12, unsupported_cdw12)
        checks.reserved("cdw13", cmd.cdw13, 0xFFFF_FF00)  # directives are not supported
        slba = cmd.cdw10 | cmd.cdw11 << 32
        blocks = (cmd.cdw12 & 0xFFFF) + 1
        if slba + blocks > store.block_count:
            raise CommandError(Status.LBA_OUT_OF_RANGE, f"lba {slba}..{slba + blocks - 1} is outside namespace "
                                                        f"{cmd.nsid} (lba 0..{store.block_count - 1})")
        return store, slba, blocks

    def _log_change(self, ctrl: ControllerModel, nsid: int, slba: int, blocks: int, deallocated: bool) -> None:
        log = ctrl.change_log
        if log is not None and log.logging:
            log.record(nsid, slba, blocks, deallocated)

    def _read(self, ctrl: ControllerModel, cmd: Sqe, data: bytes | None) -> Outcome:
        store, slba, blocks = self._blocks(ctrl, cmd, _RW_CDW12_UNSUPPORTED)
        length = checks.transfer(blocks * LBA_BYTES, "Read")
        out = store.read(slba * LBA_BYTES, length)
        self.health.bytes_read += length
        self.health.read_commands += 1
        return 0, 0, out

    def _write(self, ctrl: ControllerModel, cmd: Sqe, data: bytes | None) -> Outcome:
        store, slba, blocks = self._blocks(ctrl, cmd, _RW_CDW12_UNSUPPORTED)
        payload = checks.data_length(data, checks.transfer(blocks * LBA_BYTES, "Write"), "Write")
        store.write(slba * LBA_BYTES, payload)
        if cmd.cdw12 & RW_FUA or not ctrl.features[FeatureId.VOLATILE_WRITE_CACHE, 0]:
            store.flush()
        self._log_change(ctrl, cmd.nsid, slba, blocks, False)
        self.health.bytes_written += len(payload)
        self.health.write_commands += 1
        return 0, 0, b""

    def _write_zeroes(self, ctrl: ControllerModel, cmd: Sqe, data: bytes | None) -> Outcome:
        store, slba, blocks = self._blocks(ctrl, cmd, _WZ_CDW12_UNSUPPORTED)
        deallocate = bool(cmd.cdw12 & WRITE_ZEROES_DEAC)
        store.zero(slba, blocks, deallocate=deallocate)
        if cmd.cdw12 & RW_FUA or not ctrl.features[FeatureId.VOLATILE_WRITE_CACHE, 0]:
            store.flush()
        self._log_change(ctrl, cmd.nsid, slba, blocks, deallocate)
        return 0, 0, b""

    def _dataset_management(self, ctrl: ControllerModel, cmd: Sqe, data: bytes | None) -> Outcome:
        store = self._namespace(ctrl, cmd.nsid)
        checks.reserved("cdw10", cmd.cdw10, 0xFFFF_FF00)
        checks.reserved("cdw11", cmd.cdw11, 0xFFFF_FFF8)
        checks.unused_dwords(cmd, "cdw12", "cdw13", "cdw14", "cdw15")
        count = (cmd.cdw10 & 0xFF) + 1
        ranges = decode_dsm_ranges(checks.data_length(data, count * DSM_RANGE_BYTES, f"NR={count - 1}"))
        for _, blocks, slba in ranges:  # all checked before any is applied
            if slba + blocks > store.block_count:
                raise CommandError(Status.LBA_OUT_OF_RANGE, f"range lba {slba} + {blocks} blocks is outside "
                                                            f"namespace {cmd.nsid} (lba 0..{store.block_count - 1})")
        if cmd.cdw11 & DSM_ATTRIBUTE_DEALLOCATE:
            for _, blocks, slba in ranges:
                if blocks:
                    store.zero(slba, blocks, deallocate=True)
                    self._log_change(ctrl, cmd.nsid, slba, blocks, True)
        return 0, 0, b""

    def _flush(self, ctrl: ControllerModel, cmd: Sqe, data: bytes | None) -> Outcome:
        checks.unused_dwords(cmd, "cdw10", "cdw11", "cdw12", "cdw13", "cdw14", "cdw15")
        stores = ctrl.namespaces.values() if cmd.nsid == BROADCAST_NSID else [self._namespace(ctrl, cmd.nsid)]
        for store in stores:
            store.flush()
        return 0, 0, b""
