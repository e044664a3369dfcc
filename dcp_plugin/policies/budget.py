"""``OverheadBudget``: save as often as a budget of training time allows.

A fixed interval is either wasteful (saves that cost more than the work they protect) or risky (hours of work
lost at a failure). This policy measures what each save really costs the training loop and picks the interval
that keeps checkpointing within a fraction of training time, as CheckFreq does; with a mean time between
failures it uses the Young–Daly optimum ``sqrt(2 · cost · MTBF)`` when that is longer.

What a save costs is measured from the loop itself, with no cooperation from the writer: the policy is asked on
every step (``maybe_save``), so the time between two questions is one step, including anything the loop waited
for. After a save, steps run slower than steady training (the ``save`` call, waiting for staging, a writer
competing for CPU and disk) until the write is done. The cost of a save is the excess of the step times between
that save and the next over the baseline step time (a low quantile of recent steps). Noise only ever adds to the
estimate, so the budget errs on the side of saving less often.
"""

from __future__ import annotations

import math
import statistics
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from dcp_plugin.policies.save import SaveContext, SavePolicy


class OverheadBudget(SavePolicy):
    """Save whenever the time since the last checkpoint reaches the interval that keeps checkpointing within
    ``fraction`` of training time.

    Args:
        fraction: the share of training time checkpointing may cost (0.02: 2 %).
        max_interval: never go longer than this many seconds without a checkpoint (work you accept to lose).
        min_interval: never save more often than this.
        first_after: seconds before the first save, which measures the first cost (default:
            ``min(max_interval, 300)``).
        mtbf: mean time between failures in seconds; when given, the interval is at least the Young–Daly
            optimum ``sqrt(2 · cost · mtbf)``.
        window: how many recent step times the baseline is taken from.
        clock: returns seconds (default :func:`time.monotonic`); inject one in tests.

    Rank 0's measurements decide, so all ranks save together. :meth:`telemetry` reports the current estimate.
    """

    agreement = "coordinator"
    """Rank 0's measurements decide, so all ranks save the same step."""
    reason = "overhead_budget"
    """Saves it triggers are labelled ``overhead_budget``."""

    def __init__(
        self,
        fraction: float = 0.02,
        *,
        max_interval: float = 3600.0,
        min_interval: float = 0.0,
        first_after: float | None = None,
        mtbf: float | None = None,
        window: int = 64,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction < 1:
            raise ValueError(f"OverheadBudget(fraction) must be between 0 and 1 (e.g. 0.02), got {fraction!r}.")
        for name, value in (("max_interval", max_interval), ("min_interval", min_interval)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"OverheadBudget({name}) must be a non-negative number of seconds, got {value!r}.")
        if not max_interval > 0 or min_interval > max_interval:
            raise ValueError("OverheadBudget needs 0 <= min_interval <= max_interval and max_interval > 0.")
        if mtbf is not None and (isinstance(mtbf, bool) or not isinstance(mtbf, (int, float)) or not mtbf > 0):
            raise ValueError(f"OverheadBudget(mtbf) must be a positive number of seconds, got {mtbf!r}.")
        if isinstance(window, bool) or not isinstance(window, int) or window < 4:
            raise ValueError(f"OverheadBudget(window) must be an integer >= 4, got {window!r}.")
        if not callable(clock):
            raise TypeError("OverheadBudget(clock=...) must be a callable returning seconds.")
        self.fraction = float(fraction)
        """The share of training time checkpointing may cost (``0.02``: 2 %)."""
        self.max_interval = float(max_interval)
        """The longest time, in seconds, allowed between two checkpoints."""
        self.min_interval = float(min_interval)
        """The shortest time, in seconds, allowed between two checkpoints."""
        self.first_after = float(min(self.max_interval, 300.0) if first_after is None else first_after)
        """Seconds from the first step to the first save, whose cost is then measured."""
        self.mtbf = None if mtbf is None else float(mtbf)
        """Mean time between failures in seconds; when set, the interval is at least the Young–Daly optimum."""
        self.clock = clock
        """Returns the current time in seconds (:func:`time.monotonic` unless another was passed)."""
        self._steps: deque[float] = deque(maxlen=window)
        self._since_save: list[float] = []
        self._costs: deque[float] = deque(maxlen=8)
        self._last_question: float | None = None
        self._last_save: float | None = None
        self._started: float | None = None

    # -- measurements -------------------------------------------------------------------------------
    @property
    def baseline_step_s(self) -> float | None:
        """Steady step time: the 25th percentile of recent steps (``None`` until there are a few)."""
        if len(self._steps) < 4:
            return None
        return statistics.quantiles(self._steps, n=4)[0]

    @property
    def cost_s(self) -> float | None:
        """Estimated cost of one save to the loop, in seconds (median of the recent saves' costs)."""
        return statistics.median(self._costs) if self._costs else None

    @property
    def interval_s(self) -> float:
        """Seconds between saves that keeps within the budget (before the first cost: ``first_after``)."""
        cost = self.cost_s
        if cost is None:
            return self.first_after
        interval = cost / self.fraction
        if self.mtbf is not None:
            interval = max(interval, math.sqrt(2.0 * cost * self.mtbf))
        return min(self.max_interval, max(self.min_interval, interval))

    def telemetry(self) -> dict[str, Any]:
        """The current estimate, for loggers: cost per save, chosen interval, baseline step time."""
        return {"cost_s": self.cost_s, "interval_s": self.interval_s, "baseline_step_s": self.baseline_step_s}

    # -- the policy ---------------------------------------------------------------------------------
    def wants_save(self, ctx: SaveContext) -> bool:
        """Record this step's time; true once :attr:`interval_s` has passed since the last save."""
        if ctx.event != "step":
            return False
        now = self.clock()
        if self._last_question is not None:
            step_s = now - self._last_question
            self._steps.append(step_s)
            if self._last_save is not None:
                self._since_save.append(step_s)
        self._last_question = now
        if self._started is None:
            self._started = now
        since = now - (self._last_save if self._last_save is not None else self._started)
        return since >= self.interval_s

    def saved(self, ctx: SaveContext) -> None:
        """Charge the steps slowed by the previous save to its cost, and restart the interval."""
        baseline = self.baseline_step_s
        if self._last_save is not None and baseline is not None and self._since_save:
            self._costs.append(sum(max(0.0, step - baseline) for step in self._since_save))
        self._since_save = []
        self._last_save = self.clock()

    def __repr__(self) -> str:
        return f"OverheadBudget({self.fraction:g}, max_interval={self.max_interval:g})"


__all__ = ["OverheadBudget"]
