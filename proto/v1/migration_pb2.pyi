from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Phase(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PHASE_UNSPECIFIED: _ClassVar[Phase]
    PENDING: _ClassVar[Phase]
    PREPARING: _ClassVar[Phase]
    PRECOPY: _ClassVar[Phase]
    DIRTY_ITERATION: _ClassVar[Phase]
    STOP_AND_COPY: _ClassVar[Phase]
    COMMIT: _ClassVar[Phase]
    RESUMING: _ClassVar[Phase]
    COMPLETED: _ClassVar[Phase]
    ROLLED_BACK: _ClassVar[Phase]
    FAILED: _ClassVar[Phase]
    CANCELLED: _ClassVar[Phase]

class NoConvergenceAction(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    NO_CONVERGENCE_ACTION_UNSPECIFIED: _ClassVar[NoConvergenceAction]
    THROTTLE: _ClassVar[NoConvergenceAction]
    ABORT: _ClassVar[NoConvergenceAction]
    FORCE: _ClassVar[NoConvergenceAction]

class Verification(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    VERIFICATION_UNSPECIFIED: _ClassVar[Verification]
    VERIFICATION_PENDING: _ClassVar[Verification]
    VERIFICATION_PASSED: _ClassVar[Verification]
    VERIFICATION_FAILED: _ClassVar[Verification]

class EvacuationReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    EVACUATION_REASON_UNSPECIFIED: _ClassVar[EvacuationReason]
    PREDICTED_FAILURE: _ClassVar[EvacuationReason]
    MANUAL: _ClassVar[EvacuationReason]
    REBALANCE: _ClassVar[EvacuationReason]

class EvacuationState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    EVACUATION_STATE_UNSPECIFIED: _ClassVar[EvacuationState]
    EVACUATION_PLANNED: _ClassVar[EvacuationState]
    EVACUATION_RUNNING: _ClassVar[EvacuationState]
    EVACUATION_DONE: _ClassVar[EvacuationState]
    EVACUATION_FAILED: _ClassVar[EvacuationState]
    EVACUATION_CANCELLED: _ClassVar[EvacuationState]
PHASE_UNSPECIFIED: Phase
PENDING: Phase
PREPARING: Phase
PRECOPY: Phase
DIRTY_ITERATION: Phase
STOP_AND_COPY: Phase
COMMIT: Phase
RESUMING: Phase
COMPLETED: Phase
ROLLED_BACK: Phase
FAILED: Phase
CANCELLED: Phase
NO_CONVERGENCE_ACTION_UNSPECIFIED: NoConvergenceAction
THROTTLE: NoConvergenceAction
ABORT: NoConvergenceAction
FORCE: NoConvergenceAction
VERIFICATION_UNSPECIFIED: Verification
VERIFICATION_PENDING: Verification
VERIFICATION_PASSED: Verification
VERIFICATION_FAILED: Verification
EVACUATION_REASON_UNSPECIFIED: EvacuationReason
PREDICTED_FAILURE: EvacuationReason
MANUAL: EvacuationReason
REBALANCE: EvacuationReason
EVACUATION_STATE_UNSPECIFIED: EvacuationState
EVACUATION_PLANNED: EvacuationState
EVACUATION_RUNNING: EvacuationState
EVACUATION_DONE: EvacuationState
EVACUATION_FAILED: EvacuationState
EVACUATION_CANCELLED: EvacuationState

class ConvergencePolicy(_message.Message):
    __slots__ = ("max_downtime_ms", "max_rounds", "bandwidth_bytes_per_s", "on_no_convergence")
    MAX_DOWNTIME_MS_FIELD_NUMBER: _ClassVar[int]
    MAX_ROUNDS_FIELD_NUMBER: _ClassVar[int]
    BANDWIDTH_BYTES_PER_S_FIELD_NUMBER: _ClassVar[int]
    ON_NO_CONVERGENCE_FIELD_NUMBER: _ClassVar[int]
    max_downtime_ms: int
    max_rounds: int
    bandwidth_bytes_per_s: int
    on_no_convergence: NoConvergenceAction
    def __init__(self, max_downtime_ms: _Optional[int] = ..., max_rounds: _Optional[int] = ..., bandwidth_bytes_per_s: _Optional[int] = ..., on_no_convergence: _Optional[_Union[NoConvergenceAction, str]] = ...) -> None: ...

class CreateMigrationRequest(_message.Message):
    __slots__ = ("controller_id", "destination_node", "policy")
    CONTROLLER_ID_FIELD_NUMBER: _ClassVar[int]
    DESTINATION_NODE_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    controller_id: str
    destination_node: str
    policy: ConvergencePolicy
    def __init__(self, controller_id: _Optional[str] = ..., destination_node: _Optional[str] = ..., policy: _Optional[_Union[ConvergencePolicy, _Mapping]] = ...) -> None: ...

class PhaseRecord(_message.Message):
    __slots__ = ("phase", "started_at", "duration_ms", "bytes", "rounds", "note")
    PHASE_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    DURATION_MS_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    ROUNDS_FIELD_NUMBER: _ClassVar[int]
    NOTE_FIELD_NUMBER: _ClassVar[int]
    phase: Phase
    started_at: float
    duration_ms: float
    bytes: int
    rounds: int
    note: str
    def __init__(self, phase: _Optional[_Union[Phase, str]] = ..., started_at: _Optional[float] = ..., duration_ms: _Optional[float] = ..., bytes: _Optional[int] = ..., rounds: _Optional[int] = ..., note: _Optional[str] = ...) -> None: ...

class Migration(_message.Message):
    __slots__ = ("id", "controller_id", "source_node", "destination_node", "phase", "reason", "phases", "bytes_transferred", "namespace_bytes", "rounds", "throttle_percent", "dirty_rate_bytes_per_s", "created_at", "updated_at", "epoch", "cancel_requested", "policy", "source_digest", "destination_digest", "downtime_ms", "trace_id", "guest_blackout_ms", "verification", "verification_note", "predicted_downtime_ms", "downtime_budget_exceeded")
    ID_FIELD_NUMBER: _ClassVar[int]
    CONTROLLER_ID_FIELD_NUMBER: _ClassVar[int]
    SOURCE_NODE_FIELD_NUMBER: _ClassVar[int]
    DESTINATION_NODE_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    PHASES_FIELD_NUMBER: _ClassVar[int]
    BYTES_TRANSFERRED_FIELD_NUMBER: _ClassVar[int]
    NAMESPACE_BYTES_FIELD_NUMBER: _ClassVar[int]
    ROUNDS_FIELD_NUMBER: _ClassVar[int]
    THROTTLE_PERCENT_FIELD_NUMBER: _ClassVar[int]
    DIRTY_RATE_BYTES_PER_S_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    CANCEL_REQUESTED_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    SOURCE_DIGEST_FIELD_NUMBER: _ClassVar[int]
    DESTINATION_DIGEST_FIELD_NUMBER: _ClassVar[int]
    DOWNTIME_MS_FIELD_NUMBER: _ClassVar[int]
    TRACE_ID_FIELD_NUMBER: _ClassVar[int]
    GUEST_BLACKOUT_MS_FIELD_NUMBER: _ClassVar[int]
    VERIFICATION_FIELD_NUMBER: _ClassVar[int]
    VERIFICATION_NOTE_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_DOWNTIME_MS_FIELD_NUMBER: _ClassVar[int]
    DOWNTIME_BUDGET_EXCEEDED_FIELD_NUMBER: _ClassVar[int]
    id: str
    controller_id: str
    source_node: str
    destination_node: str
    phase: Phase
    reason: str
    phases: _containers.RepeatedCompositeFieldContainer[PhaseRecord]
    bytes_transferred: int
    namespace_bytes: int
    rounds: int
    throttle_percent: int
    dirty_rate_bytes_per_s: float
    created_at: float
    updated_at: float
    epoch: int
    cancel_requested: bool
    policy: ConvergencePolicy
    source_digest: str
    destination_digest: str
    downtime_ms: float
    trace_id: str
    guest_blackout_ms: float
    verification: Verification
    verification_note: str
    predicted_downtime_ms: float
    downtime_budget_exceeded: bool
    def __init__(self, id: _Optional[str] = ..., controller_id: _Optional[str] = ..., source_node: _Optional[str] = ..., destination_node: _Optional[str] = ..., phase: _Optional[_Union[Phase, str]] = ..., reason: _Optional[str] = ..., phases: _Optional[_Iterable[_Union[PhaseRecord, _Mapping]]] = ..., bytes_transferred: _Optional[int] = ..., namespace_bytes: _Optional[int] = ..., rounds: _Optional[int] = ..., throttle_percent: _Optional[int] = ..., dirty_rate_bytes_per_s: _Optional[float] = ..., created_at: _Optional[float] = ..., updated_at: _Optional[float] = ..., epoch: _Optional[int] = ..., cancel_requested: _Optional[bool] = ..., policy: _Optional[_Union[ConvergencePolicy, _Mapping]] = ..., source_digest: _Optional[str] = ..., destination_digest: _Optional[str] = ..., downtime_ms: _Optional[float] = ..., trace_id: _Optional[str] = ..., guest_blackout_ms: _Optional[float] = ..., verification: _Optional[_Union[Verification, str]] = ..., verification_note: _Optional[str] = ..., predicted_downtime_ms: _Optional[float] = ..., downtime_budget_exceeded: _Optional[bool] = ...) -> None: ...

class GetMigrationRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class ListMigrationsRequest(_message.Message):
    __slots__ = ("active_only", "controller_id")
    ACTIVE_ONLY_FIELD_NUMBER: _ClassVar[int]
    CONTROLLER_ID_FIELD_NUMBER: _ClassVar[int]
    active_only: bool
    controller_id: str
    def __init__(self, active_only: _Optional[bool] = ..., controller_id: _Optional[str] = ...) -> None: ...

class ListMigrationsResponse(_message.Message):
    __slots__ = ("migrations",)
    MIGRATIONS_FIELD_NUMBER: _ClassVar[int]
    migrations: _containers.RepeatedCompositeFieldContainer[Migration]
    def __init__(self, migrations: _Optional[_Iterable[_Union[Migration, _Mapping]]] = ...) -> None: ...

class WatchMigrationRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class MigrationEvent(_message.Message):
    __slots__ = ("migration",)
    MIGRATION_FIELD_NUMBER: _ClassVar[int]
    migration: Migration
    def __init__(self, migration: _Optional[_Union[Migration, _Mapping]] = ...) -> None: ...

class CancelMigrationRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class Node(_message.Message):
    __slots__ = ("name", "address", "data_address", "live", "cordoned", "capacity_bytes", "allocated_bytes", "controllers", "predicted_failure", "http_address")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    DATA_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    LIVE_FIELD_NUMBER: _ClassVar[int]
    CORDONED_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_BYTES_FIELD_NUMBER: _ClassVar[int]
    ALLOCATED_BYTES_FIELD_NUMBER: _ClassVar[int]
    CONTROLLERS_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_FAILURE_FIELD_NUMBER: _ClassVar[int]
    HTTP_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    name: str
    address: str
    data_address: str
    live: bool
    cordoned: bool
    capacity_bytes: int
    allocated_bytes: int
    controllers: _containers.RepeatedScalarFieldContainer[str]
    predicted_failure: str
    http_address: str
    def __init__(self, name: _Optional[str] = ..., address: _Optional[str] = ..., data_address: _Optional[str] = ..., live: _Optional[bool] = ..., cordoned: _Optional[bool] = ..., capacity_bytes: _Optional[int] = ..., allocated_bytes: _Optional[int] = ..., controllers: _Optional[_Iterable[str]] = ..., predicted_failure: _Optional[str] = ..., http_address: _Optional[str] = ...) -> None: ...

class ListNodesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListNodesResponse(_message.Message):
    __slots__ = ("nodes",)
    NODES_FIELD_NUMBER: _ClassVar[int]
    nodes: _containers.RepeatedCompositeFieldContainer[Node]
    def __init__(self, nodes: _Optional[_Iterable[_Union[Node, _Mapping]]] = ...) -> None: ...

class Controller(_message.Message):
    __slots__ = ("id", "node", "namespace_bytes", "state", "limits")
    ID_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    NAMESPACE_BYTES_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    id: str
    node: str
    namespace_bytes: int
    state: str
    limits: ControllerIoLimits
    def __init__(self, id: _Optional[str] = ..., node: _Optional[str] = ..., namespace_bytes: _Optional[int] = ..., state: _Optional[str] = ..., limits: _Optional[_Union[ControllerIoLimits, _Mapping]] = ...) -> None: ...

class ListControllersRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListControllersResponse(_message.Message):
    __slots__ = ("controllers",)
    CONTROLLERS_FIELD_NUMBER: _ClassVar[int]
    controllers: _containers.RepeatedCompositeFieldContainer[Controller]
    def __init__(self, controllers: _Optional[_Iterable[_Union[Controller, _Mapping]]] = ...) -> None: ...

class ExportControllerRequest(_message.Message):
    __slots__ = ("controller_id",)
    CONTROLLER_ID_FIELD_NUMBER: _ClassVar[int]
    controller_id: str
    def __init__(self, controller_id: _Optional[str] = ...) -> None: ...

class ControllerExport(_message.Message):
    __slots__ = ("controller_id", "node", "uri")
    CONTROLLER_ID_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    URI_FIELD_NUMBER: _ClassVar[int]
    controller_id: str
    node: str
    uri: str
    def __init__(self, controller_id: _Optional[str] = ..., node: _Optional[str] = ..., uri: _Optional[str] = ...) -> None: ...

class CordonNodeRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class PredictNodeFailureRequest(_message.Message):
    __slots__ = ("name", "reason", "clear")
    NAME_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    CLEAR_FIELD_NUMBER: _ClassVar[int]
    name: str
    reason: str
    clear: bool
    def __init__(self, name: _Optional[str] = ..., reason: _Optional[str] = ..., clear: _Optional[bool] = ...) -> None: ...

class GuestOptions(_message.Message):
    __slots__ = ("write_iops", "pattern", "seed")
    WRITE_IOPS_FIELD_NUMBER: _ClassVar[int]
    PATTERN_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    write_iops: int
    pattern: str
    seed: int
    def __init__(self, write_iops: _Optional[int] = ..., pattern: _Optional[str] = ..., seed: _Optional[int] = ...) -> None: ...

class NewControllerRequest(_message.Message):
    __slots__ = ("controller_id", "namespace_bytes", "node", "prefill", "guest", "limits")
    CONTROLLER_ID_FIELD_NUMBER: _ClassVar[int]
    NAMESPACE_BYTES_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    PREFILL_FIELD_NUMBER: _ClassVar[int]
    GUEST_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    controller_id: str
    namespace_bytes: int
    node: str
    prefill: bool
    guest: GuestOptions
    limits: ControllerIoLimits
    def __init__(self, controller_id: _Optional[str] = ..., namespace_bytes: _Optional[int] = ..., node: _Optional[str] = ..., prefill: _Optional[bool] = ..., guest: _Optional[_Union[GuestOptions, _Mapping]] = ..., limits: _Optional[_Union[ControllerIoLimits, _Mapping]] = ...) -> None: ...

class ControllerIoLimits(_message.Message):
    __slots__ = ("read_iops", "read_bytes_per_s", "write_iops", "write_bytes_per_s", "trim_iops", "trim_bytes_per_s")
    READ_IOPS_FIELD_NUMBER: _ClassVar[int]
    READ_BYTES_PER_S_FIELD_NUMBER: _ClassVar[int]
    WRITE_IOPS_FIELD_NUMBER: _ClassVar[int]
    WRITE_BYTES_PER_S_FIELD_NUMBER: _ClassVar[int]
    TRIM_IOPS_FIELD_NUMBER: _ClassVar[int]
    TRIM_BYTES_PER_S_FIELD_NUMBER: _ClassVar[int]
    read_iops: int
    read_bytes_per_s: int
    write_iops: int
    write_bytes_per_s: int
    trim_iops: int
    trim_bytes_per_s: int
    def __init__(self, read_iops: _Optional[int] = ..., read_bytes_per_s: _Optional[int] = ..., write_iops: _Optional[int] = ..., write_bytes_per_s: _Optional[int] = ..., trim_iops: _Optional[int] = ..., trim_bytes_per_s: _Optional[int] = ...) -> None: ...

class ControllerLimitsRequest(_message.Message):
    __slots__ = ("controller_id", "limits", "clear")
    CONTROLLER_ID_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    CLEAR_FIELD_NUMBER: _ClassVar[int]
    controller_id: str
    limits: ControllerIoLimits
    clear: bool
    def __init__(self, controller_id: _Optional[str] = ..., limits: _Optional[_Union[ControllerIoLimits, _Mapping]] = ..., clear: _Optional[bool] = ...) -> None: ...

class DeleteControllerRequest(_message.Message):
    __slots__ = ("controller_id",)
    CONTROLLER_ID_FIELD_NUMBER: _ClassVar[int]
    controller_id: str
    def __init__(self, controller_id: _Optional[str] = ...) -> None: ...

class EvacuateNodeRequest(_message.Message):
    __slots__ = ("node", "reason", "note", "dry_run")
    NODE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    NOTE_FIELD_NUMBER: _ClassVar[int]
    DRY_RUN_FIELD_NUMBER: _ClassVar[int]
    node: str
    reason: EvacuationReason
    note: str
    dry_run: bool
    def __init__(self, node: _Optional[str] = ..., reason: _Optional[_Union[EvacuationReason, str]] = ..., note: _Optional[str] = ..., dry_run: _Optional[bool] = ...) -> None: ...

class EvacuationAttempt(_message.Message):
    __slots__ = ("job_id", "destination_node", "outcome", "reason")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    DESTINATION_NODE_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    destination_node: str
    outcome: str
    reason: str
    def __init__(self, job_id: _Optional[str] = ..., destination_node: _Optional[str] = ..., outcome: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class ControllerEvacuation(_message.Message):
    __slots__ = ("controller_id", "namespace_bytes", "attempts", "result", "note")
    CONTROLLER_ID_FIELD_NUMBER: _ClassVar[int]
    NAMESPACE_BYTES_FIELD_NUMBER: _ClassVar[int]
    ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    NOTE_FIELD_NUMBER: _ClassVar[int]
    controller_id: str
    namespace_bytes: int
    attempts: _containers.RepeatedCompositeFieldContainer[EvacuationAttempt]
    result: str
    note: str
    def __init__(self, controller_id: _Optional[str] = ..., namespace_bytes: _Optional[int] = ..., attempts: _Optional[_Iterable[_Union[EvacuationAttempt, _Mapping]]] = ..., result: _Optional[str] = ..., note: _Optional[str] = ...) -> None: ...

class Evacuation(_message.Message):
    __slots__ = ("node", "reason", "state", "note", "created_at", "updated_at", "finished_at", "failure", "controllers", "moved", "in_flight", "failed", "waiting", "total")
    NODE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    NOTE_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_FIELD_NUMBER: _ClassVar[int]
    FINISHED_AT_FIELD_NUMBER: _ClassVar[int]
    FAILURE_FIELD_NUMBER: _ClassVar[int]
    CONTROLLERS_FIELD_NUMBER: _ClassVar[int]
    MOVED_FIELD_NUMBER: _ClassVar[int]
    IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    FAILED_FIELD_NUMBER: _ClassVar[int]
    WAITING_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    node: str
    reason: EvacuationReason
    state: EvacuationState
    note: str
    created_at: float
    updated_at: float
    finished_at: float
    failure: str
    controllers: _containers.RepeatedCompositeFieldContainer[ControllerEvacuation]
    moved: int
    in_flight: int
    failed: int
    waiting: int
    total: int
    def __init__(self, node: _Optional[str] = ..., reason: _Optional[_Union[EvacuationReason, str]] = ..., state: _Optional[_Union[EvacuationState, str]] = ..., note: _Optional[str] = ..., created_at: _Optional[float] = ..., updated_at: _Optional[float] = ..., finished_at: _Optional[float] = ..., failure: _Optional[str] = ..., controllers: _Optional[_Iterable[_Union[ControllerEvacuation, _Mapping]]] = ..., moved: _Optional[int] = ..., in_flight: _Optional[int] = ..., failed: _Optional[int] = ..., waiting: _Optional[int] = ..., total: _Optional[int] = ...) -> None: ...

class PlannedMove(_message.Message):
    __slots__ = ("controller_id", "destination_node", "starts_now", "why")
    CONTROLLER_ID_FIELD_NUMBER: _ClassVar[int]
    DESTINATION_NODE_FIELD_NUMBER: _ClassVar[int]
    STARTS_NOW_FIELD_NUMBER: _ClassVar[int]
    WHY_FIELD_NUMBER: _ClassVar[int]
    controller_id: str
    destination_node: str
    starts_now: bool
    why: str
    def __init__(self, controller_id: _Optional[str] = ..., destination_node: _Optional[str] = ..., starts_now: _Optional[bool] = ..., why: _Optional[str] = ...) -> None: ...

class EvacuationPlan(_message.Message):
    __slots__ = ("evacuation", "moves", "dry_run")
    EVACUATION_FIELD_NUMBER: _ClassVar[int]
    MOVES_FIELD_NUMBER: _ClassVar[int]
    DRY_RUN_FIELD_NUMBER: _ClassVar[int]
    evacuation: Evacuation
    moves: _containers.RepeatedCompositeFieldContainer[PlannedMove]
    dry_run: bool
    def __init__(self, evacuation: _Optional[_Union[Evacuation, _Mapping]] = ..., moves: _Optional[_Iterable[_Union[PlannedMove, _Mapping]]] = ..., dry_run: _Optional[bool] = ...) -> None: ...

class GetEvacuationRequest(_message.Message):
    __slots__ = ("node",)
    NODE_FIELD_NUMBER: _ClassVar[int]
    node: str
    def __init__(self, node: _Optional[str] = ...) -> None: ...

class ListEvacuationsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListEvacuationsResponse(_message.Message):
    __slots__ = ("evacuations",)
    EVACUATIONS_FIELD_NUMBER: _ClassVar[int]
    evacuations: _containers.RepeatedCompositeFieldContainer[Evacuation]
    def __init__(self, evacuations: _Optional[_Iterable[_Union[Evacuation, _Mapping]]] = ...) -> None: ...
