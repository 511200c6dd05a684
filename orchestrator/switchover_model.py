"""What a switchover costs on this cluster, fitted to the switchovers it measured. Pure.

A switchover (guest paused on the source until it runs on the destination) costs a fixed part
(controller and guest state, the commit, the destination's claim and resume, the round trips
between them) plus the last changed blocks over the copy rate. The convergence policy predicts
with `predict_ms`; every completed job feeds back what its switchover really took (`observe`),
so the fixed part follows the cluster: a loaded orchestrator or a slow etcd raises it.

The fixed part used is a high quantile of the recent samples, not their mean: a prediction that
is met nine times in ten is worth more to an operator than one that is right on average.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

# Before anything was measured: what `orchctl demo` measured of the fixed part on a 2-core
# machine (blackout minus the last round's copy time).
DEFAULT_FIXED_MS = 15.0
# Samples kept: enough for a stable quantile, few enough to follow a change of load in minutes.
WINDOW = 32
QUANTILE = 0.9
# Samples before the fit replaces the default: one odd switchover must not decide alone.
MIN_SAMPLES = 3


@dataclass(frozen=True)
class Budget:
    """A switchover measured against its job's budget."""

    budget_ms: int
    predicted_ms: float
    downtime_ms: float
    guest_blackout_ms: float

    @property
    def worst_ms(self) -> float:
        return max(self.downtime_ms, self.guest_blackout_ms)

    @property
    def exceeded(self) -> bool:
        return self.worst_ms > self.budget_ms

    def message(self) -> str:
        """One line for the job's note, the log, the trace and `orchctl`."""
        measured = f"switchover {self.downtime_ms:.1f} ms"
        if self.guest_blackout_ms > 0:
            measured += f", guest blackout {self.guest_blackout_ms:.1f} ms"
        predicted = f"predicted {self.predicted_ms:.1f} ms" if self.predicted_ms > 0 else "not predicted"
        verdict = "over" if self.exceeded else "within"
        return f"{measured}: {verdict} the downtime budget of {self.budget_ms} ms ({predicted})"


class SwitchoverModel:
    """The fitted fixed cost of a switchover; one per orchestrator, shared by its job runners."""

    def __init__(self, default_fixed_ms: float = DEFAULT_FIXED_MS, window: int = WINDOW) -> None:
        self.default_fixed_ms = default_fixed_ms
        self._samples: deque[float] = deque(maxlen=window)

    @property
    def samples(self) -> int:
        return len(self._samples)

    @property
    def fixed_ms(self) -> float:
        if len(self._samples) < MIN_SAMPLES:
            return self.default_fixed_ms
        ordered = sorted(self._samples)
        return ordered[min(len(ordered) - 1, math.ceil(QUANTILE * len(ordered)) - 1)]

    def predict_ms(self, remaining_bytes: int, rate_bytes_per_s: float) -> float:
        if rate_bytes_per_s <= 0:
            return math.inf
        return remaining_bytes / rate_bytes_per_s * 1000.0 + self.fixed_ms

    def observe(self, downtime_ms: float, final_bytes: int, rate_bytes_per_s: float) -> None:
        """A measured switchover: what it took beyond sending its last `final_bytes` is fixed cost."""
        if downtime_ms <= 0 or not math.isfinite(downtime_ms) or rate_bytes_per_s <= 0:
            return
        copy_ms = final_bytes / rate_bytes_per_s * 1000.0
        self._samples.append(max(0.0, downtime_ms - copy_ms))
