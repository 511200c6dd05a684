"""TP4159 host managed live migration in the emulated subsystem: the migration controller's commands.

The primary controller (cntlid 0, the PF the host owns) is the migration controller; the
secondaries are the migratable controllers.  This module carries out, on the primary's admin
queue: Controller Data Queue create/delete, Track Send (log user data changes into a queue),
Migration Send (Suspend, Resume, Set Controller State in pieces) and Migration Receive (Get
Controller State in pieces), plus the Controller Data Queue feature (FID 21h).

The controller state is our versioned container (``agent.nvme.state_format``), padded with
zeros to whole dwords because the commands move dwords.  Identify CNS 20h lists its one version,
and CSVI selects it.  A state assembled from pieces is checked completely (container, identity,
queue sanity) before any of it is applied; a bad one leaves the controller exactly as it was.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from agent.controller_errors import StateFormatError
from agent.emulated.model import checks
from agent.emulated.model.controllers import MAX_QUEUE_ENTRIES, CommandError, ControllerModel
from agent.emulated.model.hostmem import PAGE_BYTES, DmaError, HostMemory
from agent.nvme import cdq
from agent.nvme.commands import Sqe
from agent.nvme.spec import (
    CDQ_ENTRY_BYTES,
    CDQ_ETPT,
    AdminOpcode,
    CdqQueueType,
    CdqSelect,
    LoggingAction,
    MigrationReceiveSelect,
    MigrationSendSelect,
    SequenceIndicator,
    Status,
    SuspendType,
    TrackSendSelect,
)
from agent.nvme.state_format import (
    STATE_FORMAT_VERSION,
    ControllerState,
    container_length,
    decode_state,
    encode_state,
)

# CNS 20h list; CSVI is an index into it.
STATE_VERSIONS = (STATE_FORMAT_VERSION,)
MAX_STATE_BYTES = 16 << 20
MAX_CDQ_ENTRIES = 1 << 22
MAX_UDMQ_PER_CONTROLLER = 1  # Identify MCUDMQ

Outcome = tuple[int, int, bytes]  # completion DW0, DW1, data to the host
Handler = Callable[[ControllerModel, Sqe, "bytes | None"], Outcome]


@dataclass
class UserDataQueue:
    """A Controller Data Queue of type User Data Migration, in host memory at ``address``."""

    cdqid: int
    cntlid: int
    address: int
    log: cdq.UserDataLog
    tail_trigger: int = 0  # Set Features FID 21h with ETPT; reported, never acted on


def _sel_mos(cmd: Sqe) -> tuple[int, int]:
    """CDW10: SEL 7:0, reserved 15:8, MOS 31:16."""
    checks.reserved("cdw10", cmd.cdw10, 0x0000_FF00)
    return cmd.cdw10 & 0xFF, cmd.cdw10 >> 16


def _only_an_id(cmd: Sqe, mos: int) -> int:
    """The 16-bit id in CDW11 of a command that has no other parameter (CDQ delete, Resume)."""
    checks.reserved("MOS", mos, 0xFFFF)
    checks.reserved("cdw11", cmd.cdw11, 0xFFFF_0000)
    checks.unused_dwords(cmd, "cdw12", "cdw13", "cdw14", "cdw15")
    return cmd.cdw11 & 0xFFFF


def _padded(blob: bytes) -> bytes:
    return blob + bytes(-len(blob) % 4)


class HostManagedMigration:
    """The migration controller's side of TP4159 for one subsystem."""

    def __init__(self, controllers: dict[int, ControllerModel], host_memory: HostMemory) -> None:
        self._controllers = controllers
        self._host_memory = host_memory
        self.queues: dict[int, UserDataQueue] = {}
        self.handlers: dict[int, Handler] = {
            AdminOpcode.TRACK_SEND: self.track_send,
            AdminOpcode.TRACK_RECEIVE: self.track_receive,
            AdminOpcode.MIGRATION_SEND: self.migration_send,
            AdminOpcode.MIGRATION_RECEIVE: self.migration_receive,
            AdminOpcode.CONTROLLER_DATA_QUEUE: self.controller_data_queue,
        }

    # ----- lookups ------------------------------------------------------------------------------

    def _migratable(self, cntlid: int) -> ControllerModel:
        ctrl = self._controllers.get(cntlid)
        if ctrl is None or ctrl.primary:
            known = sorted(c for c, m in self._controllers.items() if not m.primary)
            raise CommandError(Status.INVALID_CONTROLLER_IDENTIFIER,
                               f"cntlid={cntlid} is not a migratable controller of this subsystem "
                               f"(migratable: {known})")
        return ctrl

    def _queue(self, cdqid: int) -> UserDataQueue:
        queue = self.queues.get(cdqid)
        if queue is None:
            raise CommandError(Status.INVALID_CONTROLLER_DATA_QUEUE,
                               f"cdqid={cdqid} names no controller data queue (existing: {sorted(self.queues)})")
        return queue

    # ----- Controller Data Queue ------------------------------------------------------------------

    def controller_data_queue(self, ctrl: ControllerModel, cmd: Sqe, data: bytes | None) -> Outcome:
        checks.no_nsid(cmd)
        sel, mos = _sel_mos(cmd)
        if sel == CdqSelect.CREATE:
            return self._create_queue(cmd, mos)
        if sel == CdqSelect.DELETE:
            self.delete_queue(self._queue(_only_an_id(cmd, mos)).cdqid)
            return 0, 0, b""
        raise CommandError(Status.INVALID_FIELD, f"Controller Data Queue SEL={sel} is not create (0) or delete (1)")

    def _create_queue(self, cmd: Sqe, mos: int) -> Outcome:
        checks.reserved("MOS", mos, 0xFF00)
        if mos != CdqQueueType.USER_DATA_MIGRATION:
            raise CommandError(Status.INVALID_FIELD, f"queue type {mos} is not supported; only 0 (user data "
                                                     "migration queue) is")
        checks.reserved("cdw11", cmd.cdw11, 0x0000_FFFE)
        checks.unused_dwords(cmd, "cdw13", "cdw14", "cdw15")
        if not cmd.cdw11 & 1:
            raise CommandError(Status.INVALID_FIELD, "PC=0: the controller data queue must be physically "
                                                     "contiguous (PRP lists are not supported)")
        target = self._migratable(cmd.cdw11 >> 16)
        try:
            entries = cdq.entries_for(cmd.cdw12)
        except ValueError as exc:
            raise CommandError(Status.INVALID_FIELD, f"cdw12: {exc}") from None
        if entries > MAX_CDQ_ENTRIES:
            raise CommandError(Status.NOT_ENOUGH_RESOURCES, f"a {entries}-entry queue is larger than the "
                                                            f"{MAX_CDQ_ENTRIES} entries the controller supports")
        if sum(q.cntlid == target.cntlid for q in self.queues.values()) >= MAX_UDMQ_PER_CONTROLLER:
            raise CommandError(Status.NOT_ENOUGH_RESOURCES, f"controller {target.cntlid} already has "
                                                            f"{MAX_UDMQ_PER_CONTROLLER} user data migration queue")
        if cmd.prp1 % PAGE_BYTES:
            raise CommandError(Status.PRP_OFFSET_INVALID, f"prp1={cmd.prp1:#x} is not page aligned")
        try:
            buffer = self._host_memory.view(cmd.prp1, entries * CDQ_ENTRY_BYTES)
        except DmaError as exc:
            raise CommandError(Status.DATA_TRANSFER_ERROR, f"prp1: {exc}") from None
        cdqid = next(i for i in range(1, len(self.queues) + 2) if i not in self.queues)
        log = cdq.UserDataLog(cdq.CdqRing(buffer, entries))
        self.queues[cdqid] = UserDataQueue(cdqid, target.cntlid, cmd.prp1, log)
        target.change_log = log
        return cdqid, 0, b""

    def delete_queue(self, cdqid: int) -> None:
        queue = self.queues.pop(cdqid)
        target = self._controllers[queue.cntlid]
        if target.change_log is queue.log:
            target.change_log = None

    def set_cdq_feature(self, cmd: Sqe) -> Outcome:
        """Set Features FID 21h: CDW11 = CDQID 15:0 | ETPT 31, CDW12 = the new head pointer, CDW13 =
        the tail pointer trigger when ETPT is set.  The trigger is kept and reported back by Get
        Features; the model raises no event when the tail reaches it (it has no asynchronous events),
        so a host that waits for one waits in vain: ours polls by phase tag instead."""
        checks.reserved("cdw11", cmd.cdw11, 0x7FFF_0000)
        queue = self._queue(cmd.cdw11 & 0xFFFF)
        ring = queue.log.ring
        enable_trigger = bool(cmd.cdw11 & CDQ_ETPT)
        if enable_trigger and not cmd.cdw13 < ring.entries:
            raise CommandError(Status.INVALID_FIELD, f"cdw13: tail pointer trigger {cmd.cdw13} is outside the "
                                                     f"{ring.entries}-entry queue")
        if not enable_trigger and cmd.cdw13:
            raise CommandError(Status.INVALID_FIELD, f"cdw13={cmd.cdw13:#x} without ETPT (cdw11 bit 31): a tail "
                                                     "pointer trigger needs ETPT set")
        try:
            ring.set_head(cmd.cdw12)
        except ValueError as exc:
            raise CommandError(Status.INVALID_FIELD, f"cdw12: {exc}") from None
        if enable_trigger:
            queue.tail_trigger = cmd.cdw13
        return 0, 0, b""

    def get_cdq_feature(self, cmd: Sqe) -> Outcome:
        """Get Features FID 21h: the 8-byte data structure {le32 head pointer, le32 tail pointer
        trigger}, nothing in the completion dwords.  Before answering, the controller posts the
        range it was still coalescing: the model's own behaviour (see agent.nvme.cdq)."""
        checks.reserved("cdw11", cmd.cdw11, 0xFFFF_0000)
        queue = self._queue(cmd.cdw11 & 0xFFFF)
        queue.log.flush()
        return 0, 0, cdq.encode_pointers(queue.log.ring.head, queue.tail_trigger)

    # ----- Track Send / Receive -------------------------------------------------------------------

    def track_send(self, ctrl: ControllerModel, cmd: Sqe, data: bytes | None) -> Outcome:
        checks.no_nsid(cmd)
        sel, mos = _sel_mos(cmd)
        if sel != TrackSendSelect.LOG_USER_DATA_CHANGES:
            raise CommandError(Status.INVALID_FIELD, f"Track Send SEL={sel}: only 0 (log user data changes) is "
                                                     "supported (TRATTR.THMCS=0)")
        checks.reserved("MOS", mos, 0xFFF0)
        checks.reserved("cdw11", cmd.cdw11, 0xFFFF_0000)
        checks.unused_dwords(cmd, "cdw12", "cdw13", "cdw14", "cdw15")
        queue = self._queue(cmd.cdw11 & 0xFFFF)
        if mos == LoggingAction.START:
            if self._controllers[queue.cntlid].suspended:
                raise CommandError(Status.CONTROLLER_SUSPENDED, f"controller {queue.cntlid} is suspended; "
                                                                "resume it before logging starts")
            try:
                queue.log.start()
            except cdq.CdqFullError as exc:
                raise CommandError(Status.CONTROLLER_DATA_QUEUE_FULL, str(exc)) from None
        elif mos == LoggingAction.STOP:
            queue.log.stop()
        else:
            raise CommandError(Status.INVALID_FIELD, f"LACT={mos} is not stop (0) or start (1)")
        return 0, 0, b""

    def track_receive(self, ctrl: ControllerModel, cmd: Sqe, data: bytes | None) -> Outcome:
        raise CommandError(Status.INVALID_FIELD, f"Track Receive SEL={cmd.cdw10 & 0xFF}: host memory change "
                                                 "tracking is not supported (TRATTR.THMCS=0)")

    # ----- Migration Send -------------------------------------------------------------------------

    def migration_send(self, ctrl: ControllerModel, cmd: Sqe, data: bytes | None) -> Outcome:
        checks.no_nsid(cmd)
        sel, mos = _sel_mos(cmd)
        if sel == MigrationSendSelect.SUSPEND:
            return self._suspend(cmd, mos)
        if sel == MigrationSendSelect.RESUME:
            target = self._migratable(_only_an_id(cmd, mos))
            target.suspended = False
            target.incoming_state = None
            return 0, 0, b""
        if sel == MigrationSendSelect.SET_CONTROLLER_STATE:
            return self._set_state(cmd, mos, data)
        raise CommandError(Status.INVALID_FIELD, f"Migration Send SEL={sel} is not suspend (0), resume (1) or "
                                                 "set controller state (2)")

    def _suspend(self, cmd: Sqe, mos: int) -> Outcome:
        checks.reserved("MOS", mos, 0xFFFF)
        checks.reserved("cdw11", cmd.cdw11, 0x7F00_0000)
        checks.unused_dwords(cmd, "cdw12", "cdw13", "cdw14", "cdw15")
        target = self._migratable(cmd.cdw11 & 0xFFFF)
        stype = cmd.cdw11 >> 16 & 0xFF
        if stype not in (SuspendType.NOTIFICATION, SuspendType.SUSPEND):
            raise CommandError(Status.INVALID_FIELD, f"STYPE={stype} is not notification (0) or suspend (1)")
        if stype == SuspendType.SUSPEND and not target.suspended:
            target.suspended = True
            if target.change_log is not None:
                target.change_log.stop(cdq.EntrySequence.LAST_SUSPENDED)
        if cmd.cdw11 >> 31:  # DUDMQ: the host has no more use for the target's queues
            for cdqid in [q.cdqid for q in self.queues.values() if q.cntlid == target.cntlid]:
                self.delete_queue(cdqid)
        return 0, 0, b""

    def _set_state(self, cmd: Sqe, mos: int, data: bytes | None) -> Outcome:
        checks.reserved("MOS", mos, 0xFFFC)
        checks.reserved("cdw14", cmd.cdw14, 0xFFFF_FF80)
        target = self._migratable(cmd.cdw11 & 0xFFFF)
        self._state_format(cmd.cdw11 >> 16 & 0xFF, cmd.cdw11 >> 24, cmd.cdw14)
        offset = checks.byte_offset(cmd)
        numd = cmd.cdw15
        if numd == 0:
            raise CommandError(Status.INVALID_FIELD, "NUMD=0: a piece of controller state holds at least one dword")
        piece = checks.data_length(data, checks.transfer(numd * 4, f"NUMD={numd}"), "Set Controller State")
        if not target.suspended:
            raise CommandError(Status.CONTROLLER_NOT_SUSPENDED, f"controller {target.cntlid} is running; suspend it "
                                                                "before setting its state")
        sequence = SequenceIndicator(mos & 0x3)
        if sequence in (SequenceIndicator.FIRST, SequenceIndicator.ENTIRE):
            if offset:
                raise CommandError(Status.INVALID_FIELD, f"offset={offset} on a {sequence.name} piece; it must be 0")
            target.incoming_state = bytearray()
        elif target.incoming_state is None:
            raise CommandError(Status.COMMAND_SEQUENCE_ERROR, f"a {sequence.name} piece of controller state "
                                                              "arrived before a FIRST piece")
        received = target.incoming_state
        if offset != len(received):
            raise CommandError(Status.INVALID_FIELD, f"offset={offset}, but {len(received)} bytes have arrived; "
                                                     "pieces must come in order")
        if len(received) + len(piece) > MAX_STATE_BYTES:
            target.incoming_state = None
            raise CommandError(Status.INVALID_FIELD, f"controller state larger than {MAX_STATE_BYTES} bytes")
        received += piece
        if sequence in (SequenceIndicator.LAST, SequenceIndicator.ENTIRE):
            target.incoming_state = None
            target.load(self._verified_state(target, bytes(received)))
        return 0, 0, b""

    def _verified_state(self, target: ControllerModel, stream: bytes) -> ControllerState:
        """The container in ``stream`` decoded and checked against ``target``, or CommandError."""
        try:
            end = container_length(stream)
            if end > len(stream):
                raise StateFormatError(f"controller state truncated: the container is {end} bytes, "
                                       f"{len(stream)} arrived")
            if len(stream) - end > 3 or any(stream[end:]):
                raise StateFormatError(f"controller state has {len(stream) - end} bytes after the {end}-byte "
                                       "container, more than the zero padding to a dword")
            state = decode_state(stream[:end])
        except StateFormatError as exc:
            raise CommandError(Status.INVALID_FIELD, str(exc)) from None
        if state.controller_id and target.name and state.controller_id != target.name:
            # An anonymous VF (no name) or a state from one (no identity) has nothing to compare.
            raise CommandError(Status.INVALID_FIELD, f"controller state is for controller {state.controller_id!r}, "
                                                     f"not {target.name!r}")
        capacity = target.namespace_bytes
        if state.namespace_bytes != capacity:
            raise CommandError(Status.INVALID_FIELD,
                               f"controller state has namespace_bytes={state.namespace_bytes}, but controller "
                               f"{target.name} has {capacity}; create the destination with the source's size")
        cq_ids = {q.qid for q in state.completion_queues}
        for sq in state.submission_queues:
            if sq.attributes >> 16 not in cq_ids:
                raise CommandError(Status.INVALID_FIELD, f"controller state: submission queue {sq.qid} is bound to "
                                                         f"completion queue {sq.attributes >> 16}, which it lacks")
        for q in (*state.submission_queues, *state.completion_queues):
            if q.size > MAX_QUEUE_ENTRIES:
                raise CommandError(Status.INVALID_FIELD, f"controller state: queue {q.qid} has {q.size} entries, "
                                                         f"more than the {MAX_QUEUE_ENTRIES} this controller supports")
        return state

    @staticmethod
    def _state_format(csvi: int, csuuidi: int, uuid_index: int) -> None:
        if csvi >= len(STATE_VERSIONS):
            raise CommandError(Status.INVALID_FIELD, f"CSVI={csvi}: Identify CNS 20h lists {len(STATE_VERSIONS)} "
                                                     "controller state version(s)")
        if csuuidi or uuid_index:
            raise CommandError(Status.INVALID_FIELD, f"CSUUIDI={csuuidi} UIDX={uuid_index}: no vendor-specific "
                                                     "controller state formats are supported")

    # ----- Migration Receive ----------------------------------------------------------------------

    def migration_receive(self, ctrl: ControllerModel, cmd: Sqe, data: bytes | None) -> Outcome:
        checks.no_nsid(cmd)
        sel, mos = _sel_mos(cmd)
        if sel != MigrationReceiveSelect.GET_CONTROLLER_STATE:
            raise CommandError(Status.INVALID_FIELD, f"Migration Receive SEL={sel}: only 0 (get controller state) "
                                                     "is supported")
        checks.reserved("MOS", mos, 0xFF00)
        checks.reserved("cdw14", cmd.cdw14, 0xFFFF_FF80)
        target = self._migratable(cmd.cdw11 & 0xFFFF)
        if cmd.cdw11 >> 24:
            raise CommandError(Status.INVALID_FIELD, f"CSUIDXP={cmd.cdw11 >> 24}: no vendor-specific controller "
                                                     "state formats are supported")
        self._state_format(mos & 0xFF, cmd.cdw11 >> 16 & 0xFF, cmd.cdw14)
        offset = checks.byte_offset(cmd)
        length = checks.transfer((cmd.cdw15 + 1) * 4, f"NUMD={cmd.cdw15}")
        stream = _padded(encode_state(target.state()))
        return int(target.suspended), 0, checks.piece(stream, offset, length)
