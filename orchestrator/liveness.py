"""When a node counts as lost. Pure: what was seen of it in, a verdict out.

A node's record lives under its agent's lease, so the record vanishes whenever the lease expires:
when the agent died, but also when it was merely slow to refresh (a busy host, a pause) or when
etcd itself stalled and expired every lease at once on waking. The agent registers again within
moments in the latter cases, so a missing record alone does not make a node lost: it must have
been missing for a grace window (longer than the agents' lease TTL, so that a live agent has had
time to register again), and then must not answer a direct ping at the address it last had.
"""

from __future__ import annotations

from enum import StrEnum

GRACE_OVER_LEASE_TTL_S = 2.0  # the default grace window is the agents' lease TTL plus this


class Liveness(StrEnum):
    REGISTERED = "REGISTERED"  # its record is in etcd: call it at the recorded address
    IN_GRACE = "IN_GRACE"  # missing for less than the grace window: not lost; use its last address, or wait
    ASK = "ASK"  # missing past the grace window: ping its last address before deciding
    ANSWERS = "ANSWERS"  # missing past the grace window, but it answered the ping: alive
    LOST = "LOST"  # missing past the grace window and silent (or never seen at any address)


def default_grace_s(lease_ttl_s: float) -> float:
    return lease_ttl_s + GRACE_OVER_LEASE_TTL_S


def judge_node(*, registered: bool, missing_for_s: float, grace_s: float, last_address: str,
               answered: bool | None) -> Liveness:
    """`missing_for_s`: how long the record has been seen missing (0 when it just was);
    `answered`: the ping's outcome, None when not pinged yet."""
    if registered:
        return Liveness.REGISTERED
    if missing_for_s < grace_s:
        return Liveness.IN_GRACE
    if not last_address:
        return Liveness.LOST
    if answered is None:
        return Liveness.ASK
    return Liveness.ANSWERS if answered else Liveness.LOST
