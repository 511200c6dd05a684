from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Switchover(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SWITCHOVER_UNREPORTED: _ClassVar[Switchover]
    SWITCHOVER_COMMITTED: _ClassVar[Switchover]
    SWITCHOVER_UNKNOWN: _ClassVar[Switchover]
    SWITCHOVER_NOT_COMMITTED: _ClassVar[Switchover]
SWITCHOVER_UNREPORTED: Switchover
SWITCHOVER_COMMITTED: Switchover
SWITCHOVER_UNKNOWN: Switchover
SWITCHOVER_NOT_COMMITTED: Switchover

class GetInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class AgentInfo(_message.Message):
    __slots__ = ("node", "data_address", "capacity_bytes", "allocated_bytes", "controllers", "state_format_version", "sessions")
    NODE_FIELD_NUMBER: _ClassVar[int]
    DATA_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_BYTES_FIELD_NUMBER: _ClassVar[int]
    ALLOCATED_BYTES_FIELD_NUMBER: _ClassVar[int]
    CONTROLLERS_FIELD_NUMBER: _ClassVar[int]
    STATE_FORMAT_VERSION_FIELD_NUMBER: _ClassVar[int]
    SESSIONS_FIELD_NUMBER: _ClassVar[int]
    node: str
    data_address: str
    capacity_bytes: int
    allocated_bytes: int
    controllers: _containers.RepeatedCompositeFieldContainer[ControllerStatus]
    state_format_version: int
    sessions: _containers.RepeatedCompositeFieldContainer[SessionStatus]
    def __init__(self, node: _Optional[str] = ..., data_address: _Optional[str] = ..., capacity_bytes: _Optional[int] = ..., allocated_bytes: _Optional[int] = ..., controllers: _Optional[_Iterable[_Union[ControllerStatus, _Mapping]]] = ..., state_format_version: _Optional[int] = ..., sessions: _Optional[_Iterable[_Union[SessionStatus, _Mapping]]] = ...) -> None: ...

class WorkloadSpec(_message.Message):
    __slots__ = ("write_iops", "block_bytes", "pattern", "hot_fraction", "seed")
    WRITE_IOPS_FIELD_NUMBER: _ClassVar[int]
    BLOCK_BYTES_FIELD_NUMBER: _ClassVar[int]
    PATTERN_FIELD_NUMBER: _ClassVar[int]
    HOT_FRACTION_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    write_iops: int
    block_bytes: int
    pattern: str
    hot_fraction: float
    seed: int
    def __init__(self, write_iops: _Optional[int] = ..., block_bytes: _Optional[int] = ..., pattern: _Optional[str] = ..., hot_fraction: _Optional[float] = ..., seed: _Optional[int] = ...) -> None: ...

class CreateControllerRequest(_message.Message):
    __slots__ = ("controller_id", "namespace_bytes", "prefill", "workload", "limits")
    CONTROLLER_ID_FIELD_NUMBER: _ClassVar[int]
    NAMESPACE_BYTES_FIELD_NUMBER: _ClassVar[int]
    PREFILL_FIELD_NUMBER: _ClassVar[int]
    WORKLOAD_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    controller_id: str
    namespace_bytes: int
    prefill: bool
    workload: WorkloadSpec
    limits: IoLimits
    def __init__(self, controller_id: _Optional[str] = ..., namespace_bytes: _Optional[int] = ..., prefill: _Optional[bool] = ..., workload: _Optional[_Union[WorkloadSpec, _Mapping]] = ..., limits: _Optional[_Union[IoLimits, _Mapping]] = ...) -> None: ...

class IoLimits(_message.Message):
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

class SetControllerLimitsRequest(_message.Message):
    __slots__ = ("controller_id", "limits", "clear")
    CONTROLLER_ID_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    CLEAR_FIELD_NUMBER: _ClassVar[int]
    controller_id: str
    limits: IoLimits
    clear: bool
    def __init__(self, controller_id: _Optional[str] = ..., limits: _Optional[_Union[IoLimits, _Mapping]] = ..., clear: _Optional[bool] = ...) -> None: ...

class GetControllerRequest(_message.Message):
    __slots__ = ("controller_id", "with_stored_bytes")
    CONTROLLER_ID_FIELD_NUMBER: _ClassVar[int]
    WITH_STORED_BYTES_FIELD_NUMBER: _ClassVar[int]
    controller_id: str
    with_stored_bytes: bool
    def __init__(self, controller_id: _Optional[str] = ..., with_stored_bytes: _Optional[bool] = ...) -> None: ...

class StartWorkloadRequest(_message.Message):
    __slots__ = ("controller_id", "workload")
    CONTROLLER_ID_FIELD_NUMBER: _ClassVar[int]
    WORKLOAD_FIELD_NUMBER: _ClassVar[int]
    controller_id: str
    workload: WorkloadSpec
    def __init__(self, controller_id: _Optional[str] = ..., workload: _Optional[_Union[WorkloadSpec, _Mapping]] = ...) -> None: ...

class WorkloadStatus(_message.Message):
    __slots__ = ("running", "paused", "acked_writes", "throttle_percent", "max_gap_ms", "blackout_ms", "next_seq", "writes_per_s", "pauses", "run_id", "receipt")
    RUNNING_FIELD_NUMBER: _ClassVar[int]
    PAUSED_FIELD_NUMBER: _ClassVar[int]
    ACKED_WRITES_FIELD_NUMBER: _ClassVar[int]
    THROTTLE_PERCENT_FIELD_NUMBER: _ClassVar[int]
    MAX_GAP_MS_FIELD_NUMBER: _ClassVar[int]
    BLACKOUT_MS_FIELD_NUMBER: _ClassVar[int]
    NEXT_SEQ_FIELD_NUMBER: _ClassVar[int]
    WRITES_PER_S_FIELD_NUMBER: _ClassVar[int]
    PAUSES_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    RECEIPT_FIELD_NUMBER: _ClassVar[int]
    running: bool
    paused: bool
    acked_writes: int
    throttle_percent: int
    max_gap_ms: float
    blackout_ms: float
    next_seq: int
    writes_per_s: float
    pauses: int
    run_id: int
    receipt: Receipt
    def __init__(self, running: _Optional[bool] = ..., paused: _Optional[bool] = ..., acked_writes: _Optional[int] = ..., throttle_percent: _Optional[int] = ..., max_gap_ms: _Optional[float] = ..., blackout_ms: _Optional[float] = ..., next_seq: _Optional[int] = ..., writes_per_s: _Optional[float] = ..., pauses: _Optional[int] = ..., run_id: _Optional[int] = ..., receipt: _Optional[_Union[Receipt, _Mapping]] = ...) -> None: ...

class Receipt(_message.Message):
    __slots__ = ("run_id", "seq", "run_first_seq")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    RUN_FIRST_SEQ_FIELD_NUMBER: _ClassVar[int]
    run_id: int
    seq: int
    run_first_seq: int
    def __init__(self, run_id: _Optional[int] = ..., seq: _Optional[int] = ..., run_first_seq: _Optional[int] = ...) -> None: ...

class ControllerStatus(_message.Message):
    __slots__ = ("controller_id", "node", "vfio_state", "namespace_bytes", "workload", "stored_bytes", "limits")
    CONTROLLER_ID_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    VFIO_STATE_FIELD_NUMBER: _ClassVar[int]
    NAMESPACE_BYTES_FIELD_NUMBER: _ClassVar[int]
    WORKLOAD_FIELD_NUMBER: _ClassVar[int]
    STORED_BYTES_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    controller_id: str
    node: str
    vfio_state: str
    namespace_bytes: int
    workload: WorkloadStatus
    stored_bytes: int
    limits: IoLimits
    def __init__(self, controller_id: _Optional[str] = ..., node: _Optional[str] = ..., vfio_state: _Optional[str] = ..., namespace_bytes: _Optional[int] = ..., workload: _Optional[_Union[WorkloadStatus, _Mapping]] = ..., stored_bytes: _Optional[int] = ..., limits: _Optional[_Union[IoLimits, _Mapping]] = ...) -> None: ...

class VerifyRequest(_message.Message):
    __slots__ = ("controller_id", "receipts")
    CONTROLLER_ID_FIELD_NUMBER: _ClassVar[int]
    RECEIPTS_FIELD_NUMBER: _ClassVar[int]
    controller_id: str
    receipts: _containers.RepeatedCompositeFieldContainer[Receipt]
    def __init__(self, controller_id: _Optional[str] = ..., receipts: _Optional[_Iterable[_Union[Receipt, _Mapping]]] = ...) -> None: ...

class VerifyResponse(_message.Message):
    __slots__ = ("ok", "blocks_checked", "mismatches", "first_mismatch", "node", "digest", "controller", "receipts_checked")
    OK_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_CHECKED_FIELD_NUMBER: _ClassVar[int]
    MISMATCHES_FIELD_NUMBER: _ClassVar[int]
    FIRST_MISMATCH_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    CONTROLLER_FIELD_NUMBER: _ClassVar[int]
    RECEIPTS_CHECKED_FIELD_NUMBER: _ClassVar[int]
    ok: bool
    blocks_checked: int
    mismatches: int
    first_mismatch: str
    node: str
    digest: str
    controller: ControllerStatus
    receipts_checked: int
    def __init__(self, ok: _Optional[bool] = ..., blocks_checked: _Optional[int] = ..., mismatches: _Optional[int] = ..., first_mismatch: _Optional[str] = ..., node: _Optional[str] = ..., digest: _Optional[str] = ..., controller: _Optional[_Union[ControllerStatus, _Mapping]] = ..., receipts_checked: _Optional[int] = ...) -> None: ...

class MigrationRef(_message.Message):
    __slots__ = ("job_id", "epoch", "controller_id", "commit_never_sent", "plan")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    CONTROLLER_ID_FIELD_NUMBER: _ClassVar[int]
    COMMIT_NEVER_SENT_FIELD_NUMBER: _ClassVar[int]
    PLAN_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    epoch: int
    controller_id: str
    commit_never_sent: bool
    plan: SwitchoverPlan
    def __init__(self, job_id: _Optional[str] = ..., epoch: _Optional[int] = ..., controller_id: _Optional[str] = ..., commit_never_sent: _Optional[bool] = ..., plan: _Optional[_Union[SwitchoverPlan, _Mapping]] = ...) -> None: ...

class SwitchoverPlan(_message.Message):
    __slots__ = ("job_record", "job_revision", "controller_record", "controller_revision", "leader_term", "commit_timeout_s")
    JOB_RECORD_FIELD_NUMBER: _ClassVar[int]
    JOB_REVISION_FIELD_NUMBER: _ClassVar[int]
    CONTROLLER_RECORD_FIELD_NUMBER: _ClassVar[int]
    CONTROLLER_REVISION_FIELD_NUMBER: _ClassVar[int]
    LEADER_TERM_FIELD_NUMBER: _ClassVar[int]
    COMMIT_TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    job_record: bytes
    job_revision: int
    controller_record: bytes
    controller_revision: int
    leader_term: int
    commit_timeout_s: float
    def __init__(self, job_record: _Optional[bytes] = ..., job_revision: _Optional[int] = ..., controller_record: _Optional[bytes] = ..., controller_revision: _Optional[int] = ..., leader_term: _Optional[int] = ..., commit_timeout_s: _Optional[float] = ...) -> None: ...

class PrepareDestinationRequest(_message.Message):
    __slots__ = ("ref", "namespace_bytes", "state_format_version", "source_node")
    REF_FIELD_NUMBER: _ClassVar[int]
    NAMESPACE_BYTES_FIELD_NUMBER: _ClassVar[int]
    STATE_FORMAT_VERSION_FIELD_NUMBER: _ClassVar[int]
    SOURCE_NODE_FIELD_NUMBER: _ClassVar[int]
    ref: MigrationRef
    namespace_bytes: int
    state_format_version: int
    source_node: str
    def __init__(self, ref: _Optional[_Union[MigrationRef, _Mapping]] = ..., namespace_bytes: _Optional[int] = ..., state_format_version: _Optional[int] = ..., source_node: _Optional[str] = ...) -> None: ...

class PrepareDestinationResponse(_message.Message):
    __slots__ = ("data_address", "token")
    DATA_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    data_address: str
    token: str
    def __init__(self, data_address: _Optional[str] = ..., token: _Optional[str] = ...) -> None: ...

class StartPrecopyRequest(_message.Message):
    __slots__ = ("ref", "destination_data_address", "token", "bandwidth_bytes_per_s", "destination_node")
    REF_FIELD_NUMBER: _ClassVar[int]
    DESTINATION_DATA_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    BANDWIDTH_BYTES_PER_S_FIELD_NUMBER: _ClassVar[int]
    DESTINATION_NODE_FIELD_NUMBER: _ClassVar[int]
    ref: MigrationRef
    destination_data_address: str
    token: str
    bandwidth_bytes_per_s: int
    destination_node: str
    def __init__(self, ref: _Optional[_Union[MigrationRef, _Mapping]] = ..., destination_data_address: _Optional[str] = ..., token: _Optional[str] = ..., bandwidth_bytes_per_s: _Optional[int] = ..., destination_node: _Optional[str] = ...) -> None: ...

class DirtyRoundRequest(_message.Message):
    __slots__ = ("ref", "round", "bandwidth_bytes_per_s", "throttle_percent")
    REF_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    BANDWIDTH_BYTES_PER_S_FIELD_NUMBER: _ClassVar[int]
    THROTTLE_PERCENT_FIELD_NUMBER: _ClassVar[int]
    ref: MigrationRef
    round: int
    bandwidth_bytes_per_s: int
    throttle_percent: int
    def __init__(self, ref: _Optional[_Union[MigrationRef, _Mapping]] = ..., round: _Optional[int] = ..., bandwidth_bytes_per_s: _Optional[int] = ..., throttle_percent: _Optional[int] = ...) -> None: ...

class TransferResult(_message.Message):
    __slots__ = ("bytes_sent", "blocks_sent", "duration_s", "dirty_bytes_remaining", "dirty_rate_bytes_per_s", "state_bytes", "round", "total_bytes_sent", "switchover", "commit_revision", "switchover_note", "commit_ms", "pre_pause_ms", "pre_pause_bytes")
    BYTES_SENT_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_SENT_FIELD_NUMBER: _ClassVar[int]
    DURATION_S_FIELD_NUMBER: _ClassVar[int]
    DIRTY_BYTES_REMAINING_FIELD_NUMBER: _ClassVar[int]
    DIRTY_RATE_BYTES_PER_S_FIELD_NUMBER: _ClassVar[int]
    STATE_BYTES_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_SENT_FIELD_NUMBER: _ClassVar[int]
    SWITCHOVER_FIELD_NUMBER: _ClassVar[int]
    COMMIT_REVISION_FIELD_NUMBER: _ClassVar[int]
    SWITCHOVER_NOTE_FIELD_NUMBER: _ClassVar[int]
    COMMIT_MS_FIELD_NUMBER: _ClassVar[int]
    PRE_PAUSE_MS_FIELD_NUMBER: _ClassVar[int]
    PRE_PAUSE_BYTES_FIELD_NUMBER: _ClassVar[int]
    bytes_sent: int
    blocks_sent: int
    duration_s: float
    dirty_bytes_remaining: int
    dirty_rate_bytes_per_s: float
    state_bytes: int
    round: int
    total_bytes_sent: int
    switchover: Switchover
    commit_revision: int
    switchover_note: str
    commit_ms: float
    pre_pause_ms: float
    pre_pause_bytes: int
    def __init__(self, bytes_sent: _Optional[int] = ..., blocks_sent: _Optional[int] = ..., duration_s: _Optional[float] = ..., dirty_bytes_remaining: _Optional[int] = ..., dirty_rate_bytes_per_s: _Optional[float] = ..., state_bytes: _Optional[int] = ..., round: _Optional[int] = ..., total_bytes_sent: _Optional[int] = ..., switchover: _Optional[_Union[Switchover, str]] = ..., commit_revision: _Optional[int] = ..., switchover_note: _Optional[str] = ..., commit_ms: _Optional[float] = ..., pre_pause_ms: _Optional[float] = ..., pre_pause_bytes: _Optional[int] = ...) -> None: ...

class SessionStatus(_message.Message):
    __slots__ = ("job_id", "role", "stage", "epoch", "bytes_sent", "bytes_received", "digest", "error", "guest_blackout_ms", "digest_error")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    BYTES_SENT_FIELD_NUMBER: _ClassVar[int]
    BYTES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    GUEST_BLACKOUT_MS_FIELD_NUMBER: _ClassVar[int]
    DIGEST_ERROR_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    role: str
    stage: str
    epoch: int
    bytes_sent: int
    bytes_received: int
    digest: str
    error: str
    guest_blackout_ms: float
    digest_error: str
    def __init__(self, job_id: _Optional[str] = ..., role: _Optional[str] = ..., stage: _Optional[str] = ..., epoch: _Optional[int] = ..., bytes_sent: _Optional[int] = ..., bytes_received: _Optional[int] = ..., digest: _Optional[str] = ..., error: _Optional[str] = ..., guest_blackout_ms: _Optional[float] = ..., digest_error: _Optional[str] = ...) -> None: ...

class InjectFaultRequest(_message.Message):
    __slots__ = ("corrupt_frame", "stall_event_loop_ms", "health", "replay_frame", "hold_commit_ms", "exit_after_commit", "hold_final_ms")
    CORRUPT_FRAME_FIELD_NUMBER: _ClassVar[int]
    STALL_EVENT_LOOP_MS_FIELD_NUMBER: _ClassVar[int]
    HEALTH_FIELD_NUMBER: _ClassVar[int]
    REPLAY_FRAME_FIELD_NUMBER: _ClassVar[int]
    HOLD_COMMIT_MS_FIELD_NUMBER: _ClassVar[int]
    EXIT_AFTER_COMMIT_FIELD_NUMBER: _ClassVar[int]
    HOLD_FINAL_MS_FIELD_NUMBER: _ClassVar[int]
    corrupt_frame: int
    stall_event_loop_ms: int
    health: DriveHealthFault
    replay_frame: int
    hold_commit_ms: int
    exit_after_commit: bool
    hold_final_ms: int
    def __init__(self, corrupt_frame: _Optional[int] = ..., stall_event_loop_ms: _Optional[int] = ..., health: _Optional[_Union[DriveHealthFault, _Mapping]] = ..., replay_frame: _Optional[int] = ..., hold_commit_ms: _Optional[int] = ..., exit_after_commit: _Optional[bool] = ..., hold_final_ms: _Optional[int] = ...) -> None: ...

class DriveHealthFault(_message.Message):
    __slots__ = ("critical_warning", "temperature_k", "available_spare", "available_spare_threshold", "percentage_used", "media_errors")
    CRITICAL_WARNING_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_K_FIELD_NUMBER: _ClassVar[int]
    AVAILABLE_SPARE_FIELD_NUMBER: _ClassVar[int]
    AVAILABLE_SPARE_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    PERCENTAGE_USED_FIELD_NUMBER: _ClassVar[int]
    MEDIA_ERRORS_FIELD_NUMBER: _ClassVar[int]
    critical_warning: int
    temperature_k: int
    available_spare: int
    available_spare_threshold: int
    percentage_used: int
    media_errors: int
    def __init__(self, critical_warning: _Optional[int] = ..., temperature_k: _Optional[int] = ..., available_spare: _Optional[int] = ..., available_spare_threshold: _Optional[int] = ..., percentage_used: _Optional[int] = ..., media_errors: _Optional[int] = ...) -> None: ...

class InjectFaultResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ExportControllerResponse(_message.Message):
    __slots__ = ("uri",)
    URI_FIELD_NUMBER: _ClassVar[int]
    uri: str
    def __init__(self, uri: _Optional[str] = ...) -> None: ...
