"""OverheadBudget: the interval follows what saves cost the loop (simulated loop, injected clock)."""

from __future__ import annotations

import statistics

import pytest

from dcp_plugin import EveryNSteps, OverheadBudget
from dcp_plugin.policies import SaveContext, decide


def simulate(save_cost_s: float, *, steps: int = 3000, step_s: float = 1.0, **options):
    """A loop of ``step_s`` steps; each save slows the next three steps by ``save_cost_s`` in total."""
    now = [0.0]
    policy = OverheadBudget(clock=lambda: now[0], **options)
    pending: list[float] = []
    saves: list[float] = []
    for step in range(1, steps + 1):
        now[0] += step_s + (pending.pop(0) if pending else 0.0)
        ctx = SaveContext(step=step)
        if decide(policy, ctx):
            saves.append(now[0])
            policy.saved(ctx)
            pending = [save_cost_s / 3] * 3
    intervals = [b - a for a, b in zip(saves[2:], saves[3:])]  # once the first costs are measured
    overhead = save_cost_s * (len(saves) - 3) / (saves[-1] - saves[2])
    return policy, statistics.median(intervals), overhead


def test_costlier_saves_get_proportionally_longer_intervals():
    cheap, cheap_interval, cheap_overhead = simulate(1.0, fraction=0.05, first_after=10)
    costly, costly_interval, costly_overhead = simulate(5.0, fraction=0.05, first_after=10)
    assert cheap.cost_s == pytest.approx(1.0) and costly.cost_s == pytest.approx(5.0)
    assert cheap_interval == pytest.approx(20.0, abs=2.0)  # cost / fraction
    assert costly_interval == pytest.approx(100.0, abs=6.0)
    assert cheap_overhead <= 0.05 * 1.01 and costly_overhead <= 0.05 * 1.01  # the budget holds either way


def test_a_tighter_budget_saves_less_often():
    _, loose, _ = simulate(2.0, fraction=0.10, first_after=10)
    _, tight, _ = simulate(2.0, fraction=0.01, first_after=10)
    assert tight > 5 * loose


def test_max_interval_caps_and_mtbf_lengthens_the_interval():
    _, capped, _ = simulate(5.0, fraction=0.01, first_after=10, max_interval=60)
    assert capped == pytest.approx(60.0, abs=2.0)
    policy, with_mtbf, _ = simulate(1.0, fraction=0.5, first_after=10, mtbf=5000.0)
    assert with_mtbf == pytest.approx((2 * 1.0 * 5000.0) ** 0.5, abs=6.0)  # Young-Daly beats cost / fraction
    assert policy.telemetry()["interval_s"] == pytest.approx(100.0)


def test_first_save_measures_and_composes_with_other_policies():
    now = [0.0]
    policy = OverheadBudget(0.02, first_after=30, clock=lambda: now[0]) | EveryNSteps(1000)
    fired = []
    for step in range(1, 40):
        now[0] += 1.0
        decision = decide(policy, SaveContext(step=step))
        if decision:
            fired.append((step, decision.reasons))
            policy.saved(SaveContext(step=step))
    assert fired == [(31, ("overhead_budget",))]  # 30 s after the first question, then waiting for a cost


@pytest.mark.parametrize(
    "options",
    [{"fraction": 0}, {"fraction": 1.5}, {"max_interval": 0}, {"min_interval": 10, "max_interval": 5}, {"mtbf": -1}],
)
def test_bad_options_are_refused(options):
    with pytest.raises(ValueError, match="OverheadBudget"):
        OverheadBudget(**options)


def test_drives_a_real_manager(tmp_path):
    import torch

    from dcp_plugin import CheckpointManager

    now = [0.0]
    budget = OverheadBudget(0.25, first_after=5, clock=lambda: now[0])
    model = torch.nn.Linear(4, 4)
    with CheckpointManager(str(tmp_path), async_mode="sync", save_policy=budget) as manager:
        for step in range(1, 60):
            now[0] += 1.0 + (3.0 if manager.steps and manager.steps[-1] == step - 1 else 0.0)  # a save slows a step
            manager.maybe_save(step, {"model": model})
        steps = manager.steps
    assert budget.cost_s == pytest.approx(3.0)
    assert steps[0] == 6 and all(b - a >= 9 for a, b in zip(steps[1:], steps[2:]))  # 3 s / 0.25 = 12 s apart
