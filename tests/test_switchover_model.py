"""The switchover model and the budget verdict (pure), and a job's record of them."""

from __future__ import annotations

import math

import pytest

from orchestrator.jobs import Policy, pending_job
from orchestrator.switchover_model import DEFAULT_FIXED_MS, MIN_SAMPLES, WINDOW, Budget, SwitchoverModel

MB = 1_000_000


def test_the_default_holds_until_enough_switchovers_were_measured() -> None:
    model = SwitchoverModel()
    for _ in range(MIN_SAMPLES - 1):
        model.observe(80.0, 0, 100 * MB)
        assert model.fixed_ms == DEFAULT_FIXED_MS
    model.observe(80.0, 0, 100 * MB)
    assert model.fixed_ms == 80.0


def test_the_fixed_part_is_what_a_switchover_took_beyond_its_last_blocks() -> None:
    model = SwitchoverModel()
    for _ in range(MIN_SAMPLES):
        model.observe(30.0, 2 * MB, 100 * MB)  # 2 MB at 100 MB/s is 20 ms of copying
    assert model.fixed_ms == pytest.approx(10.0)
    assert model.predict_ms(5 * MB, 100 * MB) == pytest.approx(60.0)


def test_a_high_quantile_is_used_so_predictions_are_rarely_beaten() -> None:
    model = SwitchoverModel()
    for ms in range(1, 11):  # 1..10 ms fixed costs
        model.observe(float(ms), 0, MB)
    assert model.fixed_ms == 9.0  # the 90th percentile, not the mean 5.5


def test_old_samples_leave_the_window_so_the_fit_follows_the_load() -> None:
    model = SwitchoverModel()
    for _ in range(WINDOW):
        model.observe(200.0, 0, MB)
    for _ in range(WINDOW):
        model.observe(5.0, 0, MB)
    assert model.fixed_ms == 5.0 and model.samples == WINDOW


@pytest.mark.parametrize(("downtime", "rate"), [(0.0, MB), (-3.0, MB), (math.inf, MB), (math.nan, MB), (10.0, 0.0)])
def test_what_was_not_measured_is_not_a_sample(downtime: float, rate: float) -> None:
    model = SwitchoverModel()
    model.observe(downtime, 0, rate)
    assert model.samples == 0


def test_the_verdict_uses_the_worse_of_switchover_and_guest_blackout() -> None:
    within = Budget(50, 30.0, 40.0, 45.0)
    assert not within.exceeded and "within the downtime budget of 50 ms" in within.message()
    over = Budget(50, 30.0, 40.0, 61.5)
    assert over.exceeded
    assert over.message() == ("switchover 40.0 ms, guest blackout 61.5 ms: over the downtime budget of 50 ms "
                              "(predicted 30.0 ms)")


def test_a_job_records_prediction_and_verdict() -> None:
    job = pending_job("j1", controller_id="c1", source_node="n1", namespace_bytes=MB,
                      policy=Policy(max_downtime_ms=20), now=1.0)
    assert job.predicted(math.inf).predicted_downtime_ms == 0.0
    job = job.predicted(12.3456)
    assert job.predicted_downtime_ms == 12.346
    assert not job.switched_over(19.0, 20.0, 2.0).downtime_budget_exceeded
    assert job.switched_over(21.0, 0.0, 2.0).downtime_budget_exceeded
    assert job.switched_over(5.0, 20.5, 2.0).downtime_budget_exceeded
    again = type(job).from_bytes(job.switched_over(21.0, 0.0, 2.0).to_bytes())
    assert again.downtime_budget_exceeded and again.predicted_downtime_ms == 12.346
