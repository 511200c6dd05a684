"""One controller of the emulated subsystem: registers, queues, features, error log, migration flags.

The queue registers advance as commands flow (submitted, fetched, completed, reaped), and they
are what Get Controller State captures.  Queue attribute bits (the ``attributes`` field of the
controller state, see ``state_format``): bit 0 physically contiguous; for submission queues bits
2:1 the priority and bits 31:16 the bound completion queue id; for completion queues bit 1
interrupts enabled, bit 2 the phase tag the controller writes next, bits 31:16 the interrupt
vector.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from agent.emulated.model.namespace import NamespaceStore
from agent.nvme.cdq import UserDataLog
from agent.nvme.spec import FeatureId, Status
from agent.nvme.state_format import ControllerRegisters, ControllerState, QueueState

ATTR_PC = 1 << 0
ATTR_IEN = 1 << 1
ATTR_PHASE = 1 << 2
ATTR_SQ_PRIORITY_SHIFT = 1

# Register values of an enabled controller: CC.EN=1, IOSQES=6 (64-byte SQEs), IOCQES=4 (16-byte
# CQEs); CSTS.RDY=1.
CC_ENABLED = 0x0046_0001
CSTS_READY = 0x1

MAX_QUEUES = 64  # per kind, admin queue included
MAX_QUEUE_ENTRIES = 1024  # CAP.MQES + 1
ERROR_LOG_ENTRIES = 16  # Identify ELPE + 1

# Feature values after a reset, keyed (FID, selector); the selector is THSEL for the
# temperature threshold (0 over, 1 under) and 0 for the rest.
DEFAULT_FEATURES: dict[tuple[int, int], int] = {
    (FeatureId.ARBITRATION, 0): 0,
    (FeatureId.TEMPERATURE_THRESHOLD, 0): 343,  # kelvin; WCTEMP
    (FeatureId.TEMPERATURE_THRESHOLD, 1): 0,
    (FeatureId.VOLATILE_WRITE_CACHE, 0): 1,
    (FeatureId.NUMBER_OF_QUEUES, 0): (MAX_QUEUES - 2) | (MAX_QUEUES - 2) << 16,  # zero-based, admin excluded
    (FeatureId.INTERRUPT_COALESCING, 0): 0,
}


class CommandError(Exception):
    """Abort the command with ``status``; ``detail`` is what the error detail log page says."""

    def __init__(self, status: Status, detail: str, *, dnr: bool = True) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.dnr = dnr


@dataclass
class Queue:
    """Mutable queue registers while the controller runs; frozen into QueueState on save."""

    qid: int
    base_address: int
    size: int
    head: int = 0
    tail: int = 0
    attributes: int = 0

    @property
    def bound_cq(self) -> int:
        return self.attributes >> 16

    def frozen(self) -> QueueState:
        return QueueState(self.qid, self.base_address, self.size, self.head, self.tail, self.attributes)

    @classmethod
    def thawed(cls, q: QueueState) -> Queue:
        return cls(q.qid, q.base_address, q.size, q.head, q.tail, q.attributes)


@dataclass(frozen=True)
class ErrorRecord:
    """One Error Information log entry, plus the text the error detail log page returns for it."""

    count: int
    sqid: int
    cid: int
    status: int
    nsid: int
    detail: str


@dataclass
class ControllerModel:
    """A controller: the primary (migration controller) or a secondary (migratable, a guest's VF)."""

    cntlid: int
    name: str
    primary: bool
    registers: ControllerRegisters = field(default_factory=ControllerRegisters)
    sqs: dict[int, Queue] = field(default_factory=dict)
    cqs: dict[int, Queue] = field(default_factory=dict)
    features: dict[tuple[int, int], int] = field(default_factory=lambda: dict(DEFAULT_FEATURES))
    namespaces: dict[int, NamespaceStore] = field(default_factory=dict)
    suspended: bool = False
    change_log: UserDataLog | None = None  # the user data migration queue logging this controller
    incoming_state: bytearray | None = None  # Set Controller State pieces received so far
    errors: deque[ErrorRecord] = field(default_factory=lambda: deque(maxlen=ERROR_LOG_ENTRIES))
    error_count: int = 0

    def enable(self, admin_entries: int, asq: int, acq: int) -> None:
        """What the driver's register writes do: AQA/ASQ/ACQ, then CC.EN=1 until CSTS.RDY=1."""
        if not 2 <= admin_entries <= 4096:
            raise ValueError(f"admin_entries={admin_entries} must be 2..4096 (AQA holds 12-bit zero-based sizes)")
        aqa = (admin_entries - 1) | (admin_entries - 1) << 16
        self.registers = ControllerRegisters(CC_ENABLED, CSTS_READY, aqa, asq, acq)
        self.sqs = {0: Queue(0, asq, admin_entries, attributes=ATTR_PC)}
        self.cqs = {0: Queue(0, acq, admin_entries, attributes=ATTR_PC | ATTR_IEN | ATTR_PHASE)}

    @property
    def namespace_bytes(self) -> int:
        """Capacity of the attached namespaces: what the controller state records and checks."""
        return sum(ns.size_bytes for ns in self.namespaces.values())

    def state(self) -> ControllerState:
        return ControllerState(
            controller_id=self.name,
            namespace_bytes=self.namespace_bytes,
            registers=self.registers,
            submission_queues=tuple(q.frozen() for q in sorted(self.sqs.values(), key=lambda q: q.qid)),
            completion_queues=tuple(q.frozen() for q in sorted(self.cqs.values(), key=lambda q: q.qid)),
        )

    def load(self, state: ControllerState) -> None:
        self.registers = state.registers
        self.sqs = {q.qid: Queue.thawed(q) for q in state.submission_queues}
        self.cqs = {q.qid: Queue.thawed(q) for q in state.completion_queues}

    def record_error(self, sqid: int, cid: int, nsid: int, error: CommandError) -> None:
        self.error_count += 1
        self.errors.appendleft(ErrorRecord(self.error_count, sqid, cid, error.status, nsid, error.detail))
