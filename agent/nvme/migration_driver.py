"""The host side of TP4159 host-managed live migration: one driver, whatever carries its commands.

A migration controller (the PF the host owns) moves a migratable controller (a VF, named by its
CNTLID) with admin commands.  This module issues them, once, for every backend:

- ``MigrationDriver``: Suspend and Resume (Migration Send SEL 0/1), Get Controller State in
  pieces (Migration Receive SEL 0: the container's header first, for its length, then pieces),
  Set Controller State in pieces (Migration Send SEL 2 with SEQIND first / middle / last, or
  entire), and whether the controller is suspended (the CSUP bit of Get Controller State);
- ``CdqChangedLbaLog``: the LBAs the guest changes, from a User Data Migration Queue.  ``start``
  allocates the queue memory, creates the queue (Controller Data Queue SEL 0) and starts logging
  (Track Send, LACT=start).  ``drain`` asks for the queue's feature first (Get Features FID 21h,
  an 8-byte {head pointer, tail pointer trigger} structure; it lets the emulated model post the
  range it is still coalescing, and the head it reports must be ours), consumes new entries by
  their phase tag (never by a tail pointer from the controller), keeps the ranges of its own
  namespace, hands the slots back (Set Features FID 21h, the head pointer in CDW12), and, when an
  entry says logging stopped because the queue filled up, turns logging on again: the "all LBAs
  changed" that came with it already covers every change in between.  ``stop`` stops logging
  (Track Send, LACT=stop) and deletes the queue (Controller Data Queue SEL 1).

Commands are built by the one encoder, ``agent.nvme.commands``, and carried by an
``AdminTransport``: ``agent.emulated.model_transport.ModelAdminTransport`` into the emulated
subsystem in this process, or ``agent.backends.nvme_passthru.NvmeAdminChannel`` through the
Linux NVMe admin passthrough ioctl to a real PF (the ``nvme-passthru`` backend, and the
changed-LBA log of the ``vfio`` backend).  A transport also provides the queue's memory: the
model's host memory in process, an mmap buffer for the ioctl.

Errors: a command that completes with an error status raises ``NvmeStatusError`` (status, DNR,
and the controller's explanation when it gives one); a refused Set Controller State raises its
subclass ``ControllerStateRejectedError``, which is also a ``StateFormatError``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from agent.controller_errors import DeviceCommandError, StateFormatError, WrongStateError
from agent.metrics import BACKEND_COMMAND_SECONDS
from agent.nvme import cdq, commands
from agent.nvme.cdq import EntrySequence, LbaChange
from agent.nvme.commands import Sqe, admin_command_name
from agent.nvme.error_log import ERROR_DETAIL_BYTES, parse_error_detail, parse_error_entry
from agent.nvme.spec import (
    CDQ_ENTRY_BYTES,
    CDQ_FEATURE_DATA_BYTES,
    ERROR_LOG_ENTRY_BYTES,
    LoggingAction,
    LogPageId,
    SequenceIndicator,
    Status,
    status_name,
)
from agent.nvme.state_format import HEADER_BYTES, container_length

log = logging.getLogger(__name__)

# Largest piece of controller state per command: within the MDTS of common controllers (and the
# model's 1 MiB); a backend whose device has a smaller MDTS sets state_piece_bytes.
DEFAULT_STATE_PIECE_BYTES = 64 * 1024
# 65536 entries, 2 MiB of queue: room for the ranges a busy guest changes between two dirty rounds.
# When it does fill nothing is lost (the controller reports "all LBAs changed"), but the next
# round is a full copy.  A transport may give fewer entries than asked for.
DEFAULT_CDQ_ENTRIES = 1 << 16


@dataclass(frozen=True)
class AdminResult:
    """What a successful admin command returns: completion DW0, DW1 and the data for the host."""

    dw0: int
    dw1: int
    data: bytes


class NvmeStatusError(DeviceCommandError):
    """A command completed with an error status; ``status`` is ``(SCT << 8) | SC`` as in spec.Status."""

    def __init__(self, what: str, where: str, status: int, dnr: bool, explanation: str = "") -> None:
        self.what = what
        self.where = where
        self.status = status
        self.dnr = dnr
        self.explanation = explanation
        name = status_name(status >> 8, status & 0xFF)
        retry = "do not retry (DNR)" if dnr else "it may succeed if retried"
        why = f": {explanation}" if explanation else ""
        super().__init__(f"{what} on {where} failed with status {name} ({status:#05x}){why}; {retry}")


class ControllerStateRejectedError(NvmeStatusError, StateFormatError):
    """The controller refused a Set Controller State piece (bad container, wrong size or identity)."""


class QueueMemory(Protocol):
    """Host memory for a Controller Data Queue: the controller writes entries there on its own."""

    @property
    def address(self) -> int:
        """What the Create command carries as the queue base (PRP1)."""
        ...

    @property
    def size_bytes(self) -> int: ...

    @property
    def contiguous(self) -> bool:
        """Physically contiguous, so that the Create command may say PC=1."""
        ...

    @property
    def view(self) -> memoryview:
        """The host's view of the entries."""
        ...

    def release(self) -> None:
        """Free the memory; only after the queue is deleted (the controller writes until then)."""
        ...


class AdminTransport(Protocol):
    """Carries admin commands to a migration controller and provides queue memory."""

    @property
    def name(self) -> str:
        """The controller as messages name it, e.g. ``/dev/nvme0``."""
        ...

    def submit(self, sqe: Sqe, what: str, *, data: bytes | None = None, read_bytes: int = 0,
               queue: QueueMemory | None = None) -> AdminResult:
        """Run one admin command (the transport owns the command identifier).

        ``data`` goes to the controller; a buffer of ``read_bytes`` takes what comes back (data
        beyond it is lost, as a DMA past the host's buffer would be); ``queue`` is memory the
        controller keeps using after the command (the Controller Data Queue).  An error status
        raises ``NvmeStatusError``.
        """
        ...

    def allocate_queue(self, preferred_bytes: int) -> QueueMemory:
        """Zeroed, page-aligned queue memory of at most ``preferred_bytes`` (possibly less)."""
        ...

    def close(self) -> None: ...


def timed_submit(transport: AdminTransport, sqe: Sqe, what: str, **kwargs: Any) -> AdminResult:
    """`transport.submit`, its latency observed by command (agent.metrics), failed or not: every
    command this driver sends goes through here, whichever backend carries it."""
    started = time.perf_counter()
    try:
        return transport.submit(sqe, what, **kwargs)
    finally:
        BACKEND_COMMAND_SECONDS.labels(admin_command_name(sqe)).observe(time.perf_counter() - started)


def read_explanation(read_log: Callable[[int, int], bytes], status: int) -> str:
    """The controller's explanation of the error it just reported, or "" when it gives none.

    ``read_log(lid, length)`` reads a log page.  The newest Error Information entry must be about
    ``status`` and name our error detail page (LID C0h) in VSIA, whose error count must match it.
    """
    try:
        entry = parse_error_entry(read_log(LogPageId.ERROR_INFORMATION, ERROR_LOG_ENTRY_BYTES))
        if entry.status != status or entry.vendor_page != LogPageId.ERROR_DETAIL:
            return ""
        count, text = parse_error_detail(read_log(LogPageId.ERROR_DETAIL, ERROR_DETAIL_BYTES))
    except (DeviceCommandError, ValueError, OSError):
        return ""
    return text if count == entry.count else ""


def _dword_ceil(length: int) -> int:
    return -(-length // 4) * 4


def _sequence(index: int, count: int) -> SequenceIndicator:
    if count == 1:
        return SequenceIndicator.ENTIRE
    if index == 0:
        return SequenceIndicator.FIRST
    return SequenceIndicator.LAST if index == count - 1 else SequenceIndicator.MIDDLE


class MigrationDriver:
    """The migration controller's commands about one migratable controller (CNTLID)."""

    def __init__(self, transport: AdminTransport, cntlid: int, *, label: str = "",
                 state_piece_bytes: int = DEFAULT_STATE_PIECE_BYTES) -> None:
        if not isinstance(cntlid, int) or not 0 <= cntlid <= 0xFFFF:
            raise ValueError(f"cntlid={cntlid!r} is not a controller id (0..65535)")
        self.transport = transport
        self.cntlid = cntlid
        self.label = label
        self.state_piece_bytes = state_piece_bytes

    @property
    def state_piece_bytes(self) -> int:
        return self._piece_bytes

    @state_piece_bytes.setter
    def state_piece_bytes(self, value: int) -> None:
        if not isinstance(value, int) or value <= 0 or value % 4:
            raise ValueError(f"state_piece_bytes={value!r} must be a positive multiple of 4 (state moves in dwords)")
        self._piece_bytes = value

    def what(self, command: str) -> str:
        named = f" (controller {self.label})" if self.label else ""
        return f"{command} for CNTLID {self.cntlid}{named}"

    # ----- Migration Send: Suspend, Resume ------------------------------------------------------

    def suspend(self) -> None:
        """Suspend: the controller stops fetching commands and its state stands still."""
        timed_submit(self.transport, commands.migration_suspend(self.cntlid), self.what("Suspend"))

    def resume(self) -> None:
        timed_submit(self.transport, commands.migration_resume(self.cntlid), self.what("Resume"))

    # ----- Migration Receive: Get Controller State -------------------------------------------

    def _state_piece(self, offset: int, length: int) -> AdminResult:
        return timed_submit(self.transport, commands.get_controller_state(self.cntlid, offset, length),
                            self.what("Get Controller State"), read_bytes=length)

    def suspended(self) -> bool:
        """Whether the controller is suspended: CSUP of a Get Controller State of the header."""
        return bool(self._state_piece(0, HEADER_BYTES).dw0 & 1)

    def get_state(self) -> bytes:
        """The controller state container: the header first (for its length), then the rest in
        pieces of ``state_piece_bytes``.  The controller must be suspended (CSUP=1)."""
        head = self._state_piece(0, HEADER_BYTES)
        if not head.dw0 & 1:
            raise WrongStateError(f"{self.what('Get Controller State')}: completion CSUP=0, the controller is not "
                                  "suspended, so its state is not stable; suspend it (set_state(STOP)) first")
        total = container_length(head.data)
        parts = [head.data[:total]]
        offset = HEADER_BYTES
        while offset < total:
            length = min(self._piece_bytes, total - offset)
            parts.append(self._state_piece(offset, _dword_ceil(length)).data[:length])
            offset += length
        return b"".join(parts)

    # ----- Migration Send: Set Controller State ------------------------------------------------

    def set_state(self, blob: bytes) -> None:
        """Set Controller State in pieces (SEQIND first / middle / last, or entire), padded to a
        whole dword; the controller checks the whole before it applies any of it."""
        if not blob:
            raise StateFormatError(f"{self.what('Set Controller State')}: an empty controller state cannot be loaded")
        padded = bytes(blob) + bytes(_dword_ceil(len(blob)) - len(blob))
        offsets = range(0, len(padded), self._piece_bytes)
        for index, offset in enumerate(offsets):
            sequence = _sequence(index, len(offsets))
            piece = padded[offset:offset + self._piece_bytes]
            what = self.what(f"Set Controller State ({sequence.name.lower()} piece)")
            try:
                timed_submit(self.transport, commands.set_controller_state(self.cntlid, offset, len(piece), sequence),
                             what, data=piece)
            except NvmeStatusError as exc:
                raise ControllerStateRejectedError(exc.what, exc.where, exc.status, exc.dnr,
                                                   exc.explanation) from None

    # ----- the changed-LBA log ------------------------------------------------------------------

    def change_log(self, nsid: int, namespace_blocks: int, *, queue_entries: int = DEFAULT_CDQ_ENTRIES,
                   owns_transport: bool = False) -> CdqChangedLbaLog:
        return CdqChangedLbaLog(self.transport, self.cntlid, nsid, namespace_blocks=namespace_blocks,
                                queue_entries=queue_entries, owns_transport=owns_transport, label=self.label)


class CdqChangedLbaLog:
    """Changed LBAs of one namespace of a migratable controller, from a User Data Migration Queue.

    Satisfies ``agent.backends.device_controller.ChangedLbaLog``.  Not thread safe: the owner
    (a controller) serializes calls under its lock.
    """

    def __init__(self, transport: AdminTransport, cntlid: int, nsid: int, *, namespace_blocks: int,
                 queue_entries: int = DEFAULT_CDQ_ENTRIES, owns_transport: bool = False, label: str = "") -> None:
        if not isinstance(cntlid, int) or not 0 <= cntlid <= 0xFFFF:
            raise ValueError(f"cntlid={cntlid!r} is not a controller id (0..65535)")
        if not isinstance(nsid, int) or not 0 < nsid < 0xFFFF_FFFF:
            raise ValueError(f"nsid={nsid!r} is not a namespace id")
        if namespace_blocks <= 0:
            raise ValueError(f"namespace_blocks={namespace_blocks} must be positive")
        self._transport = transport
        self._owns_transport = owns_transport
        self._cntlid = cntlid
        self._nsid = nsid
        self._blocks = namespace_blocks
        self._label = f" (controller {label})" if label else ""
        self.queue_entries = queue_entries  # asked for at the next start; the transport may give fewer
        self._queue: QueueMemory | None = None
        self._reader: cdq.CdqReader | None = None
        self._cdqid = 0
        self._changed: set[int] = set()  # consumed from the queue, not yet taken
        self._all_changed = False

    @property
    def queue_entries(self) -> int:
        return self._queue_entries

    @queue_entries.setter
    def queue_entries(self, value: int) -> None:
        if not isinstance(value, int) or value < cdq.MIN_ENTRIES:
            raise ValueError(f"queue_entries={value!r} must be at least {cdq.MIN_ENTRIES}")
        self._queue_entries = value

    @property
    def active(self) -> bool:
        return self._queue is not None

    @property
    def entries(self) -> int:
        """Entries of the queue in use (0 while inactive)."""
        return self._reader.entries if self._reader is not None else 0

    @property
    def contiguous(self) -> bool:
        """Whether the queue in use was created physically contiguous (PC=1)."""
        return self._queue is not None and self._queue.contiguous

    def _what(self, command: str) -> str:
        return f"{command} (CDQID {self._cdqid}, CNTLID {self._cntlid}{self._label})"

    def start(self) -> None:
        """A new, empty queue with logging on."""
        if self._queue is not None:
            raise WrongStateError(f"{self._what('Controller Data Queue create')}: a queue already exists; "
                                  "stop it first")
        queue = self._transport.allocate_queue(self._queue_entries * CDQ_ENTRY_BYTES)
        entries = queue.size_bytes // CDQ_ENTRY_BYTES
        try:
            created = timed_submit(
                self._transport,
                commands.cdq_create(self._cntlid, entries * CDQ_ENTRY_BYTES // 4, queue.address,
                                    contiguous=queue.contiguous),
                f"Controller Data Queue create for CNTLID {self._cntlid}{self._label}", queue=queue)
        except BaseException:
            queue.release()
            raise
        self._queue, self._cdqid = queue, created.dw0 & 0xFFFF
        self._reader = cdq.CdqReader(queue.view, entries)
        self._changed = set()
        self._all_changed = False
        try:
            self._log_changes()
        except BaseException:
            self._delete_queue()
            raise

    def _log_changes(self) -> None:
        """Track Send start.  A suspended controller refuses it, and may: it runs no guest I/O, and
        the Resume that ends its suspension ends this log too (nothing is migrating any more)."""
        try:
            timed_submit(self._transport, commands.track_send(self._cdqid, LoggingAction.START),
                         self._what("Track Send start"))
        except NvmeStatusError as exc:
            if exc.status != Status.CONTROLLER_SUSPENDED:
                raise

    def waiting(self, count: int) -> bool:
        """Whether at least ``count`` new entries are posted (one look at a phase tag, no command)."""
        return self._reader is not None and self._reader.has_at_least(count)

    def drain(self, *, refresh: bool = True) -> None:
        """Consume the posted entries and hand their slots back.

        ``refresh`` first reads the queue's feature (Get Features FID 21h); the head it reports
        must be the one we last set, or someone else is moving it.
        """
        reader = self._reader
        if reader is None:
            raise WrongStateError(f"controller {self._cntlid}: no changed-LBA log; start it first")
        if refresh:
            got = timed_submit(self._transport, commands.get_cdq_pointers(self._cdqid),
                               self._what("Get Features (CDQ)"), read_bytes=CDQ_FEATURE_DATA_BYTES)
            head, _ = cdq.decode_pointers(got.data)
            if head != reader.head:
                raise DeviceCommandError(f"{self._what('Get Features (CDQ)')}: the controller reports head pointer "
                                         f"{head}, the host set {reader.head}; another host is using this queue")
        restart = consumed = False
        changed = self._changed
        for nsid, slba, nlb, attributes in reader.take():
            consumed = True
            change = cdq.change_of(attributes)
            if change == LbaChange.ALL_CHANGED:
                self._all_changed = True
            elif change == LbaChange.RANGE_VALID and nsid == self._nsid:
                try:
                    changed.update(cdq.entry_lbas(slba, nlb, self._blocks))
                except ValueError as exc:
                    raise DeviceCommandError(f"{self._what('User Data Migration Queue')}: the controller posted "
                                             f"an entry the host cannot use: {exc}") from None
            if cdq.sequence_of(attributes) == EntrySequence.LAST_QUEUE_FULL:
                restart = True
        if consumed:
            timed_submit(self._transport, commands.set_cdq_head(self._cdqid, reader.head),
                         self._what("Set Features (CDQ head)"))
        if restart:
            # Logging stopped when the queue filled up; the "all LBAs changed" it reported covers
            # everything until now, so turning it back on loses nothing.
            self._log_changes()

    def take(self) -> list[int]:
        """The changed LBAs since the last take, sorted; clears them."""
        self.drain()
        taken = list(range(self._blocks)) if self._all_changed else sorted(self._changed)
        self._changed = set()
        self._all_changed = False
        return taken

    def pending(self) -> int:
        """How many changed LBAs are logged and not taken."""
        self.drain()
        return self._blocks if self._all_changed else len(self._changed)

    def stop(self) -> None:
        """Track Send stop and Controller Data Queue delete; what was not taken is dropped."""
        if self._queue is None:
            return
        try:
            timed_submit(self._transport, commands.track_send(self._cdqid, LoggingAction.STOP),
                         self._what("Track Send stop"))
        finally:
            self._delete_queue()

    def forget(self) -> None:
        """Drop the queue without commands: the controller is gone (released), so is its queue."""
        queue, self._queue, self._reader = self._queue, None, None
        self._changed = set()
        self._all_changed = False
        if queue is not None:
            queue.release()

    def close(self) -> None:
        if self._owns_transport:
            self._transport.close()

    def _delete_queue(self) -> None:
        cdqid, queue = self._cdqid, self._queue
        try:
            timed_submit(self._transport, commands.cdq_delete(cdqid), self._what("Controller Data Queue delete"))
        finally:
            # The controller may write the queue until Delete completes: free the memory only after.
            self._queue, self._reader = None, None
            self._changed = set()
            self._all_changed = False
            if queue is not None:
                queue.release()
