"""The convergence policy: after each copy round, decide what comes next. Pure.

Facts in (what the rounds measured, the job's policy, the guest throttle now), a Decision out.
The estimated downtime is what the remaining changed data would take to send at the transfer
rate we measured, plus a fixed cost for the controller and guest state and the commit.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

from orchestrator.jobs import OnNoConvergence, Policy

# The fixed part of a switchover beyond copying the last blocks: controller and guest state,
# the commit transaction, the destination's claim and resume. `orchctl demo` measured 10-20 ms
# of it on a 2-core machine (blackout minus the last round's copy time).
SWITCHOVER_OVERHEAD_MS = 15.0
# Guest throttle steps, in percent of its write rate taken away (like auto-converge's CPU steps).
THROTTLE_STEPS = (20, 40, 60, 80, 90, 95)
# A round "makes progress" when what is left to send shrank by at least this factor.
PROGRESS_FACTOR = 0.9


class Action(StrEnum):
    NEXT_ROUND = "NEXT_ROUND"
    THROTTLE = "THROTTLE"
    STOP_AND_COPY = "STOP_AND_COPY"
    ABORT = "ABORT"


@dataclass(frozen=True)
class RoundFacts:
    round: int  # 0 is the precopy pass
    bytes_sent: int
    duration_s: float
    dirty_bytes_remaining: int
    dirty_rate_bytes_per_s: float


@dataclass(frozen=True)
class Decision:
    action: Action
    throttle_percent: int
    estimated_downtime_ms: float
    reason: str


def transfer_rate_bytes_per_s(history: Sequence[RoundFacts], policy: Policy) -> float:
    """The best recent measure of how fast we copy; rounds too small to time are skipped."""
    rate = 0.0
    for facts in reversed(history):
        if facts.duration_s > 0.001 and facts.bytes_sent > 0:
            rate = facts.bytes_sent / facts.duration_s
            break
    if rate <= 0.0:
        rate = float(policy.bandwidth_bytes_per_s) or 1e9  # nothing measured yet: assume a fast link
    if policy.bandwidth_bytes_per_s:
        rate = min(rate, float(policy.bandwidth_bytes_per_s))
    return rate


def estimated_downtime_ms(history: Sequence[RoundFacts], policy: Policy) -> float:
    if not history:
        return float("inf")
    rate = transfer_rate_bytes_per_s(history, policy)
    return history[-1].dirty_bytes_remaining / rate * 1000.0 + SWITCHOVER_OVERHEAD_MS


def _making_progress(history: Sequence[RoundFacts], rate: float) -> bool:
    last = history[-1]
    if last.dirty_rate_bytes_per_s >= PROGRESS_FACTOR * rate:
        return False
    if len(history) < 2:
        return True
    return last.dirty_bytes_remaining <= PROGRESS_FACTOR * history[-2].dirty_bytes_remaining


def next_throttle(current_percent: int) -> int | None:
    for step in THROTTLE_STEPS:
        if step > current_percent:
            return step
    return None


def decide(policy: Policy, history: Sequence[RoundFacts], throttle_percent: int) -> Decision:
    """What to do after the last round in `history` (which must not be empty)."""
    if not history:
        raise ValueError("decide() needs at least the precopy pass in history")
    estimate = estimated_downtime_ms(history, policy)
    rounds_done = history[-1].round
    if rounds_done == 0 and history[-1].dirty_bytes_remaining > 0:
        # Precopy timed a sequential stream; changed blocks are scattered and cost more per byte.
        # One round of them measures the rate that the stop-and-copy will really see.
        return Decision(Action.NEXT_ROUND, throttle_percent, estimate,
                        "precopy done: one round of changed blocks to measure their copy rate")
    if estimate <= policy.max_downtime_ms:
        return Decision(Action.STOP_AND_COPY, throttle_percent, estimate,
                        f"estimated downtime {estimate:.1f} ms is within {policy.max_downtime_ms} ms")
    if rounds_done >= policy.max_rounds:
        if policy.on_no_convergence is OnNoConvergence.FORCE:
            return Decision(Action.STOP_AND_COPY, throttle_percent, estimate,
                            f"forced stop-and-copy after {rounds_done} rounds; estimated downtime "
                            f"{estimate:.1f} ms exceeds {policy.max_downtime_ms} ms")
        return Decision(Action.ABORT, throttle_percent, estimate,
                        f"did not converge in {rounds_done} rounds (throttle {throttle_percent}%): "
                        f"estimated downtime {estimate:.1f} ms exceeds {policy.max_downtime_ms} ms")
    rate = transfer_rate_bytes_per_s(history, policy)
    if policy.on_no_convergence is OnNoConvergence.THROTTLE and not _making_progress(history, rate):
        step = next_throttle(throttle_percent)
        if step is not None:
            return Decision(Action.THROTTLE, step, estimate,
                            f"guest dirties {history[-1].dirty_rate_bytes_per_s / 1e6:.1f} MB/s against a "
                            f"copy rate of {rate / 1e6:.1f} MB/s: throttling the guest to {100 - step}%")
    return Decision(Action.NEXT_ROUND, throttle_percent, estimate,
                    f"estimated downtime {estimate:.1f} ms > {policy.max_downtime_ms} ms: another round")
