"""How an agent's refusals travel to the orchestrator: a gRPC status whose code says what kind of
problem it is, and, where the caller must act on it, a google.rpc.ErrorInfo detail (the standard
rich status, `grpc-status-details-bin`; grpcurl prints it).

Today one refusal carries a detail: a stale epoch (reason STALE_EPOCH, domain nvmigrate.io, with
the job id, the epoch refused and the epoch that drives the job), on which an orchestrator
stops driving the job. Callers read it with `stale_epoch(error)`, never from the message text.
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

DOMAIN = "nvmigrate.io"
STALE_EPOCH = "STALE_EPOCH"


@dataclass(frozen=True)
class StaleEpochDetail:
    job_id: str
    refused_epoch: int
    current_epoch: int


def stale_epoch_status(message: str, detail: StaleEpochDetail) -> grpc.Status:
    """The status an agent aborts with when a command carries an older epoch than the job's."""
    info = error_details_pb2.ErrorInfo(reason=STALE_EPOCH, domain=DOMAIN, metadata={
        "job_id": detail.job_id, "refused_epoch": str(detail.refused_epoch),
        "current_epoch": str(detail.current_epoch)})
    packed = any_pb2.Any()
    packed.Pack(info)
    return rpc_status.to_status(status_pb2.Status(code=code_pb2.FAILED_PRECONDITION, message=message,
                                                  details=[packed]))


def stale_epoch(error: grpc.RpcError) -> StaleEpochDetail | None:
    """The stale-epoch detail of a failed call, or None when the refusal is something else."""
    try:
        status = rpc_status.from_call(error)  # type: ignore[arg-type]
    except ValueError:
        return None  # malformed detail: not ours
    if status is None:
        return None
    for packed in status.details:
        info = error_details_pb2.ErrorInfo()
        if packed.Is(info.DESCRIPTOR) and packed.Unpack(info) and info.domain == DOMAIN \
                and info.reason == STALE_EPOCH:
            meta = info.metadata
            return StaleEpochDetail(meta.get("job_id", ""), int(meta.get("refused_epoch", "0") or 0),
                                    int(meta.get("current_epoch", "0") or 0))
    return None
