"""Migration data plane: framed, checksummed, rate-limited TCP streams between agents.

The source agent's ``DataSender`` streams namespace extents and, at the end, controller and guest
state straight to the destination agent's ``DataReceiver`` (no gRPC, no orchestrator in the path).
"""

from agent.dataplane.framing import (
    ChecksumError,
    Frame,
    FrameError,
    FrameType,
    encode_frame,
    encode_header,
    read_frame,
)
from agent.dataplane.ratelimit import TokenBucket
from agent.dataplane.receiver import DataReceiver, DestinationSink, ReceiverStats
from agent.dataplane.sender import DataPlaneError, DataSender, stream_extents

__all__ = [
    "ChecksumError",
    "DataPlaneError",
    "DataReceiver",
    "DataSender",
    "DestinationSink",
    "Frame",
    "FrameError",
    "FrameType",
    "ReceiverStats",
    "TokenBucket",
    "encode_frame",
    "encode_header",
    "read_frame",
    "stream_extents",
]
