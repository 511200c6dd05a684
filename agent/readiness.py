"""Whether an agent is ready for work, as /readyz answers it (agent.web). Pure: the node lease's
status, whether AgentService serves, and the time in; None (ready) or a one-line reason out.

Ready means the orchestrator can use this node: its AgentService serves, and its node record is in
etcd under a lease that is alive. The lease thread confirms the lease every third of its TTL; a
confirmation older than the TTL means etcd may have expired it already (etcd unreachable, or the
lease thread stuck), so the agent stops saying it is ready before the orchestrator can find its
record gone.
"""

from __future__ import annotations

from agent.node_lease import LeaseStatus

MAX_REASON_CHARS = 300


def one_line(text: str) -> str:
    line = text.strip().splitlines()[0] if text.strip() else ""
    return line if len(line) <= MAX_REASON_CHARS else line[:MAX_REASON_CHARS - 3] + "..."


def readiness_problem(lease: LeaseStatus, grpc_serving: bool, now: float) -> str | None:
    """Why the agent is not ready, or None when it is; `now` is time.monotonic()."""
    if not grpc_serving:
        return "AgentService (gRPC) is not serving"
    why = f": {one_line(lease.problem)}" if lease.problem else ""
    if lease.confirmed_at is None:
        return f"node not registered in etcd{why}"
    age_s = now - lease.confirmed_at
    if age_s >= lease.ttl_s:
        return (f"node lease not confirmed in etcd for {age_s:.1f} s (TTL {lease.ttl_s} s), it may have "
                f"expired{why}")
    return None
