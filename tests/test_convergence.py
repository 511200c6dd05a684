"""The convergence policy, table-driven and property-based."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from orchestrator.convergence import THROTTLE_STEPS, Action, RoundFacts, decide, estimated_downtime_ms
from orchestrator.jobs import OnNoConvergence, Policy

MB = 1_000_000


def facts(round_no: int, remaining: int, sent: int = 100 * MB, duration_s: float = 1.0,
          dirty_rate: float = 0.0) -> RoundFacts:
    return RoundFacts(round_no, sent, duration_s, remaining, dirty_rate)


def settled(remaining: int, dirty_rate: float = 0.0) -> list[RoundFacts]:
    """Precopy and two rounds, the last of which no longer halved what is left."""
    return [facts(0, 40 * MB), facts(1, remaining * 3 // 2, dirty_rate=dirty_rate),
            facts(2, remaining, dirty_rate=dirty_rate)]


def test_small_remainder_goes_to_stop_and_copy() -> None:
    # 100 MB/s measured, 1 MB left = 10 ms + overhead, under 50 ms
    d = decide(Policy(max_downtime_ms=50), settled(1 * MB), 0)
    assert d.action is Action.STOP_AND_COPY and d.estimated_downtime_ms < 50


def test_within_the_budget_a_round_that_halved_what_is_left_earns_another() -> None:
    shrinking = [facts(0, 40 * MB), facts(1, 1 * MB)]
    d = decide(Policy(max_downtime_ms=50), shrinking, 0)
    assert d.action is Action.NEXT_ROUND and d.estimated_downtime_ms < 50
    assert "at least halved what is left: one more to shorten the blackout" in d.reason
    # ... but not when no round is left, nor for what takes under a millisecond to send.
    assert decide(Policy(max_downtime_ms=50, max_rounds=1), shrinking, 0).action is Action.STOP_AND_COPY
    assert decide(Policy(max_downtime_ms=50), [facts(0, 40 * MB), facts(1, 50_000)], 0).action \
        is Action.STOP_AND_COPY
    # Over half the budget in fixed cost, the last blocks' allowance is shortened the same way.
    d = decide(Policy(max_downtime_ms=50), [facts(0, 40 * MB), facts(1, 2 * MB, dirty_rate=1 * MB)], 0, fixed_ms=80)
    assert d.action is Action.NEXT_ROUND and "one more to shorten the blackout" in d.reason


def test_precopy_alone_never_decides_stop_and_copy_while_blocks_changed() -> None:
    # the sequential precopy rate would promise 25 ms; scattered blocks must be timed first
    d = decide(Policy(max_downtime_ms=50), [facts(0, 1 * MB)], 0)
    assert d.action is Action.NEXT_ROUND and d.estimated_downtime_ms < 50
    assert decide(Policy(), [facts(0, 0)], 0).action is Action.STOP_AND_COPY


def test_the_latest_timed_round_sets_the_rate() -> None:
    slow_scattered = facts(1, 2 * MB, sent=2 * MB, duration_s=0.2)  # 10 MB/s for scattered blocks
    d = decide(Policy(max_downtime_ms=50), [facts(0, 40 * MB), slow_scattered], 0)
    assert d.estimated_downtime_ms > 200 and d.action is Action.NEXT_ROUND


def test_large_remainder_asks_for_another_round_while_progressing() -> None:
    d = decide(Policy(max_downtime_ms=50), [facts(0, 40 * MB), facts(1, 20 * MB, dirty_rate=5 * MB)], 0)
    assert d.action is Action.NEXT_ROUND


def test_stalled_rounds_throttle_step_by_step_under_throttle_policy() -> None:
    history = [facts(0, 40 * MB), facts(1, 40 * MB, dirty_rate=95 * MB)]
    throttle = 0
    seen = []
    for _ in THROTTLE_STEPS:
        d = decide(Policy(), history, throttle)
        assert d.action is Action.THROTTLE and d.throttle_percent > throttle
        throttle = d.throttle_percent
        seen.append(throttle)
    assert seen == list(THROTTLE_STEPS)
    assert decide(Policy(), history, throttle).action is Action.NEXT_ROUND  # at the top: keep trying


def test_rounds_exhausted_abort_or_force_per_policy() -> None:
    history = [facts(0, 40 * MB), facts(5, 40 * MB, dirty_rate=95 * MB)]
    for action, expected in ((OnNoConvergence.ABORT, Action.ABORT), (OnNoConvergence.THROTTLE, Action.ABORT),
                             (OnNoConvergence.FORCE, Action.STOP_AND_COPY)):
        d = decide(Policy(max_rounds=5, on_no_convergence=action), history, 40)
        assert d.action is expected
        assert "5 rounds" in d.reason


def test_abort_policy_never_throttles() -> None:
    history = [facts(0, 40 * MB), facts(1, 40 * MB, dirty_rate=95 * MB)]
    assert decide(Policy(on_no_convergence=OnNoConvergence.ABORT), history, 0).action is Action.NEXT_ROUND


def test_bandwidth_cap_bounds_the_rate_used_for_the_estimate() -> None:
    capped = Policy(bandwidth_bytes_per_s=10 * MB)
    assert estimated_downtime_ms([facts(0, 1 * MB)], capped) > estimated_downtime_ms([facts(0, 1 * MB)], Policy())
    history = settled(1 * MB)
    assert decide(Policy(max_downtime_ms=50), history, 0).action is Action.STOP_AND_COPY
    assert decide(Policy(max_downtime_ms=50, bandwidth_bytes_per_s=10 * MB), history, 0).action \
        is not Action.STOP_AND_COPY


@given(remaining=st.integers(0, 10**10), sent=st.integers(0, 10**10), duration=st.floats(0.0, 100.0),
       max_downtime=st.integers(1, 10_000), rounds=st.integers(0, 50), max_rounds=st.integers(1, 50),
       throttle=st.sampled_from((0, *THROTTLE_STEPS)), on=st.sampled_from(OnNoConvergence))
def test_decisions_are_consistent(remaining: int, sent: int, duration: float, max_downtime: int, rounds: int,
                                  max_rounds: int, throttle: int, on: OnNoConvergence) -> None:
    policy = Policy(max_downtime_ms=max_downtime, max_rounds=max_rounds, on_no_convergence=on)
    history = [facts(rounds, remaining, sent, duration)]
    d = decide(policy, history, throttle)
    if rounds == 0 and remaining > 0:
        assert d.action is Action.NEXT_ROUND
        return
    if d.estimated_downtime_ms <= max_downtime:
        assert d.action is Action.STOP_AND_COPY
    if d.action is Action.ABORT:
        assert on is not OnNoConvergence.FORCE and rounds >= max_rounds
    if d.action is Action.THROTTLE:
        assert on is OnNoConvergence.THROTTLE and d.throttle_percent > throttle
    else:
        assert d.throttle_percent == throttle
    if rounds >= max_rounds:
        assert d.action in (Action.STOP_AND_COPY, Action.ABORT)


def test_the_fixed_cost_measured_on_the_cluster_sets_the_estimate() -> None:
    history = settled(1 * MB)  # 10 ms of copying at 100 MB/s
    assert decide(Policy(max_downtime_ms=50), history, 0).estimated_downtime_ms == 25.0  # 15 ms until measured
    d = decide(Policy(max_downtime_ms=50), history, 0, fixed_ms=30.0)
    assert d.action is Action.STOP_AND_COPY and d.estimated_downtime_ms == 40.0


def test_a_fixed_cost_over_half_the_budget_stops_at_half_and_says_it_will_run_over() -> None:
    near = settled(2 * MB, dirty_rate=1 * MB)  # 20 ms of blocks
    far = settled(3 * MB, dirty_rate=1 * MB)  # 30 ms of blocks
    # 80 ms fixed against 50: rounds cannot help; the last blocks get half the budget, 25 ms.
    d = decide(Policy(max_downtime_ms=50), near, 0, fixed_ms=80.0)
    assert d.action is Action.STOP_AND_COPY and d.estimated_downtime_ms == 100.0
    assert "is over 50 ms" in d.reason and "80.0 ms, is more than rounds can take away" in d.reason
    assert decide(Policy(max_downtime_ms=50), far, 0, fixed_ms=80.0).action is Action.NEXT_ROUND
    # Below half the budget the fixed cost comes off the allowance in full.
    assert decide(Policy(max_downtime_ms=50), far, 0, fixed_ms=24.0).action is Action.NEXT_ROUND
    assert decide(Policy(max_downtime_ms=50), far, 0, fixed_ms=20.0).action is Action.STOP_AND_COPY


def test_rounds_that_shrink_too_slowly_for_the_rounds_left_throttle() -> None:
    # 20% less per round is progress, but 2 rounds leave ~26 MB: 256 ms, far over 50 ms.
    history = [facts(0, 50 * MB), facts(1, 40 * MB, dirty_rate=1 * MB)]
    assert decide(Policy(max_rounds=3), history, 0).action is Action.THROTTLE
    assert decide(Policy(max_rounds=100), history, 0).action is Action.NEXT_ROUND  # 0.8^99 gets there
