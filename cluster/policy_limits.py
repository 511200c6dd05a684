"""The bounds of a migration's convergence policy, checked on both sides of the API: by orchctl
before the round trip (a clear usage error) and by the orchestrator on every request (other
clients exist). Pure.

The ceilings are where a value stops meaning anything: QEMU caps its downtime limit at
2,000,000 ms; a guest that has not converged in ten thousand rounds never will. The bandwidth
floor is where a migration stops being one: at 64 KiB/s a 1 GiB namespace takes four and a half
hours, all of them with the controller unable to move again.
"""

from __future__ import annotations

MAX_DOWNTIME_MS = 2_000_000
MAX_ROUNDS = 10_000
MIN_BANDWIDTH_BYTES_PER_S = 64 * 1024
MAX_BANDWIDTH_BYTES_PER_S = 2**63 - 1

# field -> (least, most, unit for messages)
BOUNDS: dict[str, tuple[int, int, str]] = {
    "max_downtime_ms": (1, MAX_DOWNTIME_MS, "ms"),
    "max_rounds": (1, MAX_ROUNDS, "rounds"),
    "bandwidth_bytes_per_s": (MIN_BANDWIDTH_BYTES_PER_S, MAX_BANDWIDTH_BYTES_PER_S, "bytes/s"),
}


def policy_value_problem(field: str, value: int) -> str | None:
    """Why `value` cannot be the policy's `field`, or None."""
    least, most, unit = BOUNDS[field]
    if least <= value <= most:
        return None
    if field == "bandwidth_bytes_per_s" and 0 < value < least:
        return (f"bandwidth {value} bytes/s is below the floor of {least} bytes/s (64K): slower, a migration "
                "would hold its controller for hours; give at least 64K, or no limit at all")
    shown = str(value) if len(str(value)) <= 24 else f"{str(value)[:20]}... ({len(str(value))} digits)"
    return f"{field} {shown} is out of range: give {least} to {most} {unit}"
