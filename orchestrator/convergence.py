"""The convergence policy: after each copy round, decide what comes next. Pure.

Facts in (what the rounds measured, the job's policy, the guest throttle now), a Decision out.
The estimated downtime is what the remaining changed data would take to send at the transfer
rate we measured, plus a fixed cost for the controller and guest state and the commit: the
caller passes that fixed cost as fitted to measured switchovers (`switchover_model`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

from orchestrator.jobs import OnNoConvergence, Policy
from orchestrator.switchover_model import DEFAULT_FIXED_MS

# Guest throttle steps, in percent of its write rate taken away (like auto-converge's CPU steps).
THROTTLE_STEPS = (20, 40, 60, 80, 90, 95)
# A round "makes progress" when what is left to send shrank by at least this factor.
PROGRESS_FACTOR = 0.9
# Within the budget, one more round is worth it while the last one at least halved what is left
# and that still takes this long to send: the guest's blackout shrinks with it, for the price of
# a round of a few milliseconds (a fast link leaves only what the guest wrote during the round).
SETTLE_FACTOR = 0.5
SETTLE_MIN_MS = 1.0


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


def estimated_downtime_ms(history: Sequence[RoundFacts], policy: Policy,
                          fixed_ms: float = DEFAULT_FIXED_MS) -> float:
    if not history:
        return float("inf")
    rate = transfer_rate_bytes_per_s(history, policy)
    return history[-1].dirty_bytes_remaining / rate * 1000.0 + fixed_ms


def _making_progress(history: Sequence[RoundFacts], rate: float) -> bool:
    last = history[-1]
    if last.dirty_rate_bytes_per_s >= PROGRESS_FACTOR * rate:
        return False
    if len(history) < 2:
        return True
    return last.dirty_bytes_remaining <= PROGRESS_FACTOR * history[-2].dirty_bytes_remaining


def _worth_another_round(history: Sequence[RoundFacts], data_ms: float) -> bool:
    if len(history) < 2 or history[-1].round == 0 or data_ms < SETTLE_MIN_MS:
        return False
    return history[-1].dirty_bytes_remaining <= SETTLE_FACTOR * history[-2].dirty_bytes_remaining


def data_allowance_ms(policy: Policy, fixed_ms: float) -> float:
    """How long the last blocks may take to send: the budget less the fixed cost, but never under
    half the budget. Rounds cannot shrink the fixed cost; when this cluster's is over half the
    budget, the policy stops at half and says in advance that the switchover will run over (a
    fitted cost that rose under load must not strand every job, and with it the samples that
    would bring it down again)."""
    return max(policy.max_downtime_ms - fixed_ms, policy.max_downtime_ms / 2.0)


def _on_course(policy: Policy, history: Sequence[RoundFacts], rate: float, fixed_ms: float) -> bool:
    """Will the rounds left, shrinking what remains as the last one did, get within the allowance?"""
    last = history[-1]
    if len(history) < 2 or history[-2].dirty_bytes_remaining <= 0:
        return True
    shrink = min(1.0, last.dirty_bytes_remaining / history[-2].dirty_bytes_remaining)
    rounds_left = max(0, policy.max_rounds - last.round)
    projected = last.dirty_bytes_remaining * shrink ** rounds_left
    return projected / rate * 1000.0 <= data_allowance_ms(policy, fixed_ms)


def next_throttle(current_percent: int) -> int | None:
    for step in THROTTLE_STEPS:
        if step > current_percent:
            return step
    return None


def decide(policy: Policy, history: Sequence[RoundFacts], throttle_percent: int,
           fixed_ms: float = DEFAULT_FIXED_MS) -> Decision:
    """What to do after the last round in `history` (which must not be empty); `fixed_ms` is the
    switchover's fixed cost beyond its last blocks, as measured on this cluster."""
    if not history:
        raise ValueError("decide() needs at least the precopy pass in history")
    estimate = estimated_downtime_ms(history, policy, fixed_ms)
    rounds_done = history[-1].round
    if rounds_done == 0 and history[-1].dirty_bytes_remaining > 0:
        # Precopy timed a sequential stream; changed blocks are scattered and cost more per byte.
        # One round of them measures the rate that the stop-and-copy will really see.
        return Decision(Action.NEXT_ROUND, throttle_percent, estimate,
                        "precopy done: one round of changed blocks to measure their copy rate")
    if estimate <= policy.max_downtime_ms:
        if rounds_done < policy.max_rounds and _worth_another_round(history, estimate - fixed_ms):
            return Decision(Action.NEXT_ROUND, throttle_percent, estimate,
                            f"estimated downtime {estimate:.1f} ms is within {policy.max_downtime_ms} ms, and the "
                            "last round at least halved what is left: one more to shorten the blackout")
        return Decision(Action.STOP_AND_COPY, throttle_percent, estimate,
                        f"estimated downtime {estimate:.1f} ms is within {policy.max_downtime_ms} ms")
    if estimate - fixed_ms <= data_allowance_ms(policy, fixed_ms):
        if rounds_done < policy.max_rounds and _worth_another_round(history, estimate - fixed_ms):
            return Decision(Action.NEXT_ROUND, throttle_percent, estimate,
                            f"estimated downtime {estimate:.1f} ms, and the last round at least halved what is "
                            "left: one more to shorten the blackout")
        return Decision(Action.STOP_AND_COPY, throttle_percent, estimate,
                        f"estimated downtime {estimate:.1f} ms is over {policy.max_downtime_ms} ms: the fixed "
                        f"switchover cost measured here, {fixed_ms:.1f} ms, is more than rounds can take away")
    if rounds_done >= policy.max_rounds:
        if policy.on_no_convergence is OnNoConvergence.FORCE:
            return Decision(Action.STOP_AND_COPY, throttle_percent, estimate,
                            f"forced stop-and-copy after {rounds_done} rounds; estimated downtime "
                            f"{estimate:.1f} ms exceeds {policy.max_downtime_ms} ms")
        return Decision(Action.ABORT, throttle_percent, estimate,
                        f"did not converge in {rounds_done} rounds (throttle {throttle_percent}%): "
                        f"estimated downtime {estimate:.1f} ms exceeds {policy.max_downtime_ms} ms")
    rate = transfer_rate_bytes_per_s(history, policy)
    stalled = not _making_progress(history, rate)
    if policy.on_no_convergence is OnNoConvergence.THROTTLE and (
            stalled or not _on_course(policy, history, rate, fixed_ms)):
        step = next_throttle(throttle_percent)
        if step is not None:
            why = (f"guest dirties {history[-1].dirty_rate_bytes_per_s / 1e6:.1f} MB/s against a "
                   f"copy rate of {rate / 1e6:.1f} MB/s" if stalled else
                   f"at this pace the {max(0, policy.max_rounds - rounds_done)} rounds left do not bring the "
                   f"estimated downtime ({estimate:.1f} ms) within {policy.max_downtime_ms} ms")
            return Decision(Action.THROTTLE, step, estimate, f"{why}: throttling the guest to {100 - step}%")
    return Decision(Action.NEXT_ROUND, throttle_percent, estimate,
                    f"estimated downtime {estimate:.1f} ms > {policy.max_downtime_ms} ms: another round")
