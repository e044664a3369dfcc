"""Schedule: the one save decision and the after-commit work, with an injected clock and a fake directory."""

from __future__ import annotations

import pytest

from dcp_plugin.policies import EveryNSeconds, EveryNSteps, OnException, OnPreemption, SaveContext
from dcp_plugin.policies.retention import KeepLast
from dcp_plugin.policies.schedule import Schedule
from dcp_plugin.storage import CheckpointInfo, step_name


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class FakeDirectory:
    """What retention needs from a storage: a listing and deletes (with a record of them)."""

    root_url = "/fake"

    def __init__(self) -> None:
        self.infos: list[CheckpointInfo] = []
        self.deleted: list[str] = []

    def add(self, step: int, run_id: str = "run", name: str | None = None) -> None:
        name = name or step_name(step)
        self.infos.append(CheckpointInfo(name, f"/fake/{name}", {"step": step, "run_id": run_id, "created": step}))

    def list(self) -> list[CheckpointInfo]:
        return list(self.infos)

    def delete(self, name: str) -> None:
        self.deleted.append(name)
        self.infos = [info for info in self.infos if info.name != name]

    def url(self, name: str) -> str:
        return f"/fake/{name}"


def never_gather(votes):
    raise AssertionError("no collective may run here")


def run(schedule: Schedule, step: int, event: str = "step", world_size: int = 1, gather=None):
    ctx = SaveContext(step=step, event=event, world_size=world_size)
    verdict = schedule.decide(ctx, gather)
    if verdict.save:
        schedule.saved(step)
    schedule.acknowledge(ctx, verdict)
    return verdict


def test_steps_and_time_decide_with_an_injected_clock():
    clock = FakeClock()
    schedule = Schedule(EveryNSteps(4) | EveryNSeconds(25, clock=clock))
    saved = []
    for step in range(1, 13):
        clock.now += 10
        verdict = run(schedule, step)
        if verdict:
            saved.append((step, verdict.decision.reasons))
    assert saved == [
        (4, ("every_n_steps", "every_n_seconds")),  # the timer started at step 1
        (7, ("every_n_seconds",)),
        (8, ("every_n_steps",)),
        (11, ("every_n_seconds",)),  # 30 s after the save at step 8
        (12, ("every_n_steps",)),
    ]
    assert schedule.last_saved_step == 12 and schedule.last_decision.reasons == ("every_n_steps",)


def test_a_step_already_saved_is_not_saved_again_but_counts_for_the_policies():
    clock = FakeClock()
    schedule = Schedule(EveryNSteps(5) | EveryNSeconds(30, clock=clock))
    assert not run(schedule, 1)  # starts the timer
    assert run(schedule, 5)
    clock.now += 30
    again = run(schedule, 5)
    assert again.decision and not again.save
    clock.now += 29
    assert not run(schedule, 6)  # the timer restarted when step 5 was acknowledged


def test_preemption_flushes_and_stops_and_fires_once():
    preempt = OnPreemption()
    schedule = Schedule(EveryNSteps(100) | preempt)
    preempt.trigger()
    verdict = run(schedule, 3)
    assert verdict.save and verdict.flush and verdict.stop and verdict.decision.preemption
    assert not run(schedule, 4)


def test_exception_saves_only_alone_and_never_gathers():
    schedule = Schedule(OnException())
    verdict = run(schedule, 3, event="exception", gather=never_gather)
    assert verdict.save and verdict.flush and not verdict.stop
    several = Schedule(OnException())
    verdict = run(several, 3, event="exception", world_size=2, gather=never_gather)
    assert verdict.decision and not verdict.save and not verdict.flush


def test_votes_are_agreed_through_the_given_gather():
    clock = FakeClock()
    schedule = Schedule(EveryNSeconds(5, clock=clock))
    run(schedule, 1, gather=lambda votes: [votes, [False]])
    clock.now += 10
    # rank 0's clock decides, whatever rank 1 says
    assert run(schedule, 2, world_size=2, gather=lambda votes: [votes, [False]])
    assert not run(schedule, 3, world_size=2, gather=lambda votes: [[False], [True]])


def test_bad_events_and_policy_types_are_refused():
    with pytest.raises(ValueError, match="event must be one of"):
        Schedule(EveryNSteps(1)).decide(SaveContext(step=1, event="validation"))
    with pytest.raises(TypeError, match="save_policy must be a SavePolicy"):
        Schedule(KeepLast(1))
    with pytest.raises(TypeError, match="retention must be a RetentionPolicy"):
        Schedule(retention=EveryNSteps(1))


def test_retention_runs_once_per_save_on_the_coordinator_when_nothing_is_written():
    directory = FakeDirectory()
    schedule = Schedule(retention=KeepLast(2), run_id="run")
    for step in (1, 2, 3):
        directory.add(step)
    directory.add(9, run_id="someone-else")
    assert schedule.after_commit(directory) is None  # nothing saved yet: nothing due
    schedule.saved(3)
    assert schedule.after_commit(directory, writing=True) is None
    assert schedule.after_commit(directory, coordinator=False) is None
    plan = schedule.after_commit(directory)
    assert plan is not None and plan.delete == [step_name(1)] and directory.deleted == [step_name(1)]
    assert schedule.after_commit(directory) is None  # done until the next save


def test_retention_over_what_the_schedule_owns():
    directory = FakeDirectory()
    for index in range(4):
        directory.add(index, run_id=f"run-{index}", name=f"checkpoint_{index}")
    directory.add(10, name="best")
    schedule = Schedule(retention=KeepLast(2), owned=lambda info: info.name.startswith("checkpoint_"))
    schedule.saved(3)
    schedule.after_commit(directory)
    assert directory.deleted == ["checkpoint_0", "checkpoint_1"]  # any run's, never "best"
