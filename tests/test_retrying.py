"""`cluster.retrying.retry_transient`: tenacity's AsyncRetrying(stop_after_delay, wait_exponential,
reraise=True) rules, on a clock the test moves (each attempt costs time, each sleep passes)."""

from __future__ import annotations

import pytest

from cluster.retrying import of_types, retry_transient


class Transient(Exception):
    pass


class Fatal(Exception):
    pass


class World:
    """A clock, the sleeps asked for, and a call that fails as scripted (then answers 'ok')."""

    def __init__(self, failures: list[Exception], attempt_cost_s: float = 0.1) -> None:
        self.now = 100.0
        self.sleeps: list[float] = []
        self.attempts = 0
        self.failures = failures
        self.attempt_cost_s = attempt_cost_s

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds

    async def call(self) -> str:
        self.attempts += 1
        self.now += self.attempt_cost_s
        if self.failures:
            raise self.failures.pop(0)
        return "ok"

    async def run(self, budget_s: float = 3.0) -> str:
        return await retry_transient(self.call, transient=of_types(Transient), budget_s=budget_s, first_wait_s=0.05,
                                     max_wait_s=0.5, clock=self.clock, sleep=self.sleep)


async def test_transient_errors_are_retried_with_exponential_waits_until_an_answer() -> None:
    world = World([Transient(), Transient(), Transient()])
    assert await world.run() == "ok"
    assert world.attempts == 4 and world.sleeps == [0.05, 0.1, 0.2]


async def test_waits_are_capped_and_the_last_transient_error_is_raised_once_the_budget_passed() -> None:
    errors = [Transient(str(i)) for i in range(100)]
    world = World(list(errors))
    with pytest.raises(Transient) as raised:
        await world.run(budget_s=3.0)
    # attempts end at 100.1, 100.25, 100.45, 100.75, 101.25, 101.85, 102.45, 103.05 (>= 3 s: raised)
    assert world.sleeps == [0.05, 0.1, 0.2, 0.4, 0.5, 0.5, 0.5]
    assert raised.value is errors[7] and world.attempts == 8


async def test_other_errors_are_raised_at_once() -> None:
    world = World([Transient(), Fatal("no")])
    with pytest.raises(Fatal):
        await world.run()
    assert world.attempts == 2 and world.sleeps == [0.05]


async def test_a_zero_budget_makes_one_attempt() -> None:
    world = World([Transient()])
    with pytest.raises(Transient):
        await world.run(budget_s=0.0)
    assert world.attempts == 1 and world.sleeps == []
