"""Save and retention policies, driven from plain PyTorch loops through CheckpointManager (no Lightning)."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import uuid

import fsspec
import pytest
import torch
from fsspec.implementations.memory import MemoryFileSystem

from dcp_plugin import CheckpointManager
from dcp_plugin.policies import (
    AnyOf,
    EveryNSeconds,
    EveryNSteps,
    KeepBest,
    KeepEveryNSteps,
    KeepLast,
    OnEpochEnd,
    OnException,
    OnPreemption,
    SaveContext,
    decide,
)
from dcp_plugin.policies.retention import plan_retention
from dcp_plugin.storage import CheckpointInfo, step_name
from tests.models import make_training, train_step
from tests.multiproc import run_ranks
from tests.paths import REPO

ROOT = REPO


class FakeClock:
    """An injectable clock: time moves only when the test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def info(step: int, run_id: str = "run", **metrics: float) -> CheckpointInfo:
    return CheckpointInfo(
        name=step_name(step),
        url=f"/x/{step_name(step)}",
        manifest={"step": step, "run_id": run_id, "created": float(step), "metadata": {"metrics": metrics}},
    )


def steps_of(names) -> list[int]:
    return sorted(int(n.split("_")[1]) for n in names)


# -- save policies on their own ------------------------------------------------------------------
def test_every_n_steps_fires_on_multiples_only():
    policy = EveryNSteps(3)
    fired = [s for s in range(0, 13) if policy.wants_save(SaveContext(step=s))]
    assert fired == [3, 6, 9, 12]
    assert not policy.wants_save(SaveContext(step=6, event="epoch_end"))


def test_every_n_seconds_uses_the_injected_clock():
    clock = FakeClock()
    policy = EveryNSeconds(30, clock=clock)
    fired = []
    for step in range(1, 12):
        clock.advance(10)
        if policy.wants_save(SaveContext(step=step)):
            fired.append(step)
            policy.saved(SaveContext(step=step))
    # the timer starts at the first question (step 1), and restarts at every save
    assert fired == [4, 7, 10]


def test_every_n_seconds_timer_restarts_after_a_save_for_another_reason():
    clock = FakeClock()
    policy = EveryNSeconds(30, clock=clock)
    policy.wants_save(SaveContext(step=0))
    clock.advance(25)
    policy.saved(SaveContext(step=1))  # e.g. an epoch-end save
    clock.advance(25)
    assert not policy.wants_save(SaveContext(step=2))
    clock.advance(5)
    assert policy.wants_save(SaveContext(step=3))


def test_epoch_end_policy():
    policy = OnEpochEnd(every_n_epochs=2)
    assert not policy.wants_save(SaveContext(step=5, event="step"))
    assert not policy.wants_save(SaveContext(step=5, event="epoch_end", epoch=0))
    assert policy.wants_save(SaveContext(step=10, event="epoch_end", epoch=1))
    assert OnEpochEnd().wants_save(SaveContext(step=5, event="epoch_end"))


def test_composition_reports_every_reason():
    clock = FakeClock()
    policy = EveryNSteps(2) | EveryNSeconds(5, clock=clock) | OnEpochEnd()
    assert isinstance(policy, AnyOf) and len(policy.leaves()) == 3
    decide(policy, SaveContext(step=1))  # starts the timer
    clock.advance(5)
    decision = decide(policy, SaveContext(step=2))
    assert decision.save and decision.reasons == ("every_n_steps", "every_n_seconds")
    assert decide(None, SaveContext(step=2)).save is False


def test_agreement_rules_combine_votes_across_ranks():
    clock = FakeClock()
    preempt = OnPreemption()
    policy = EveryNSteps(100) | EveryNSeconds(5, clock=clock) | preempt

    def gather_with(other_rank_votes):
        return lambda votes: [votes, other_rank_votes]

    decide(policy, SaveContext(step=1), gather_with([False, False, False]))
    # this rank (rank 0) has no time vote; rank 1 claims it has: rank 0's clock decides
    assert not decide(policy, SaveContext(step=2), gather_with([False, True, False])).save
    # a signal seen by rank 1 only makes both save
    decision = decide(policy, SaveContext(step=3), gather_with([False, False, True]))
    assert decision.save and decision.preemption


def test_preemption_handler_chains_to_the_previous_handler():
    seen = []
    previous = signal.signal(signal.SIGUSR1, lambda signum, frame: seen.append(signum))
    policy = OnPreemption(signals=(signal.SIGUSR1,))
    try:
        policy.install()
        os.kill(os.getpid(), signal.SIGUSR1)
        assert policy.received == signal.SIGUSR1
        assert seen == [signal.SIGUSR1]
        assert policy.wants_save(SaveContext(step=1))
        policy.uninstall()
        assert signal.getsignal(signal.SIGUSR1) is not policy._handle
    finally:
        policy.uninstall()
        signal.signal(signal.SIGUSR1, previous)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: EveryNSteps(0), "positive integer"),
        (lambda: EveryNSteps(2.5), "positive integer"),
        (lambda: EveryNSeconds(0), "positive number"),
        (lambda: OnEpochEnd(0), "positive integer"),
        (lambda: KeepLast(0), "positive integer"),
        (lambda: KeepBest("", 1), "name a logged metric"),
        (lambda: KeepBest("loss", 1, mode="avg"), "'min' or 'max'"),
        (lambda: EveryNSteps(1) | KeepLast(1), "unsupported operand"),
    ],
)
def test_bad_policy_arguments_say_what_is_wrong(make, message):
    with pytest.raises((ValueError, TypeError), match=message):
        make()


def test_manager_rejects_wrong_policy_types(ckpt_dir):
    with pytest.raises(TypeError, match="save_policy must be a SavePolicy"):
        CheckpointManager(ckpt_dir, save_policy=KeepLast(2))
    with pytest.raises(TypeError, match="retention must be a RetentionPolicy"):
        CheckpointManager(ckpt_dir, retention=EveryNSteps(2))
    with (
        CheckpointManager(ckpt_dir, save_policy=EveryNSteps(2)) as manager,
        pytest.raises(ValueError, match="event must be one of"),
    ):
        manager.maybe_save(1, {"x": 1}, event="validation")


# -- retention policies on their own -------------------------------------------------------------
def test_keep_last_every_n_and_union():
    infos = [info(s) for s in range(1, 11)]
    assert steps_of(KeepLast(3).keep(infos)) == [8, 9, 10]
    assert steps_of(KeepEveryNSteps(4).keep(infos)) == [4, 8]
    assert steps_of((KeepLast(2) | KeepEveryNSteps(4)).keep(infos)) == [4, 8, 9, 10]


@pytest.mark.parametrize("mode, expected", [("min", [2, 5]), ("max", [3, 6])])
def test_keep_best_min_and_max(mode, expected):
    losses = {1: 0.9, 2: 0.1, 3: 2.0, 4: 0.5, 5: 0.2, 6: 1.5, 7: float("nan")}
    infos = [info(s, val=v) for s, v in losses.items()] + [info(8)]  # step 8 logged no metric
    assert steps_of(KeepBest("val", k=2, mode=mode).keep(infos)) == expected


def test_keep_best_reads_top_level_metadata_too():
    plain = CheckpointInfo("a", "/a", {"step": 1, "metadata": {"acc": 0.5}})
    better = CheckpointInfo("b", "/b", {"step": 2, "metadata": {"acc": 0.7}})
    assert KeepBest("acc", 1, mode="max").keep([plain, better]) == {"b"}


def test_retention_plan_protects_newest_and_other_runs():
    infos = [info(1), info(2, run_id="other"), info(3), info(4), info(5, run_id="other")]
    plan = plan_retention(KeepBest("missing", 1), infos, run_id="run", protected={step_name(3)})
    # newest of ours (4) and the protected one (3) stay; other runs are never candidates
    assert steps_of(plan.keep) == [3, 4]
    assert steps_of(plan.delete) == [1]


# -- the manager in a plain loop -----------------------------------------------------------------
def _trigger_run(rank: int, world_size: int, directory: str) -> list[tuple[int, tuple[str, ...]]]:
    """Train with every trigger at once. Rank 0's clock moves 10 s a step, the others' stand still;
    the last rank receives SIGUSR1 after step 13."""
    clock = FakeClock()
    preempt = OnPreemption(signals=(signal.SIGUSR1,))
    policy = EveryNSteps(4) | EveryNSeconds(25, clock=clock) | OnEpochEnd(every_n_epochs=2) | preempt
    model, optimizer, _ = make_training(0)
    state = {"model": model, "optim": optimizer}
    saved = []
    step = 0
    with CheckpointManager(directory, save_policy=policy, async_mode="thread") as manager:
        for epoch in range(4):
            for _ in range(5):
                train_step(model, optimizer)
                step += 1
                if rank == 0:
                    clock.advance(10)
                if step == 13 and rank == world_size - 1:
                    os.kill(os.getpid(), signal.SIGUSR1)
                stats = manager.maybe_save(step, state)
                if stats is not None:
                    saved.append((step, tuple(manager.last_decision.reasons)))
                if manager.should_stop:
                    break
            if manager.should_stop:
                break
            if manager.maybe_save(step, state, event="epoch_end", epoch=epoch) is not None:
                saved.append((step, tuple(manager.last_decision.reasons)))
        assert manager.should_stop
        assert preempt.received == (signal.SIGUSR1 if rank == world_size - 1 else None)
        # the preemption save completed before maybe_save returned
        committed = manager.steps
    assert signal.getsignal(signal.SIGUSR1) is not preempt._handle  # close() restored the handler
    return [saved, committed]


EXPECTED_TRIGGERS = [
    (4, ("every_n_steps", "every_n_seconds")),  # timer started at step 1: 30 s at step 4
    (7, ("every_n_seconds",)),
    (8, ("every_n_steps",)),
    (10, ("epoch_end",)),  # end of epoch 1 (every 2nd epoch)
    (12, ("every_n_steps",)),
    (13, ("preemption",)),
]


def test_every_trigger_fires_when_it_should_on_one_rank(ckpt_dir):
    saved, committed = _trigger_run(0, 1, ckpt_dir)
    assert saved == EXPECTED_TRIGGERS
    assert committed == [s for s, _ in EXPECTED_TRIGGERS]
    reasons = {i.step: tuple(i.metadata["reasons"]) for i in CheckpointManager(ckpt_dir).list()}
    assert reasons == dict(EXPECTED_TRIGGERS)


@pytest.mark.slow
def test_every_trigger_fires_together_on_two_ranks(ckpt_dir):
    results = run_ranks(_trigger_run, ckpt_dir, world_size=2)
    for saved, committed in results:
        assert saved == EXPECTED_TRIGGERS
        assert committed == [s for s, _ in EXPECTED_TRIGGERS]


def test_epoch_end_at_a_saved_step_does_not_save_twice(ckpt_dir):
    model, optimizer, _ = make_training(0)
    with CheckpointManager(ckpt_dir, save_policy=EveryNSteps(5) | OnEpochEnd(), async_mode="sync") as manager:
        train_step(model, optimizer)
        assert manager.maybe_save(5, {"model": model}) is not None
        assert manager.maybe_save(5, {"model": model}, event="epoch_end", epoch=0) is None
        assert manager.steps == [5]


def test_save_on_exception_is_synchronous_and_opt_in(ckpt_dir):
    model, optimizer, _ = make_training(0)
    state = {"model": model, "optim": optimizer}
    with CheckpointManager(ckpt_dir, save_policy=EveryNSteps(100), async_mode="thread") as manager:
        assert manager.maybe_save(3, state, event="exception") is None
    with CheckpointManager(ckpt_dir, save_policy=EveryNSteps(100) | OnException(), async_mode="thread") as manager:
        try:
            train_step(model, optimizer)
            raise RuntimeError("loss is nan")
        except RuntimeError:
            stats = manager.maybe_save(3, state, event="exception")
        assert stats is not None and stats.durable_s is not None  # committed before maybe_save returned
        assert manager.steps == [3] and not manager.should_stop


def test_preemption_in_process_saves_synchronously_and_asks_to_stop(ckpt_dir):
    model, optimizer, _ = make_training(0)
    preempt = OnPreemption(signals=(signal.SIGUSR1,))
    with CheckpointManager(ckpt_dir, save_policy=preempt, async_mode="thread") as manager:
        assert manager.maybe_save(1, {"model": model}) is None
        os.kill(os.getpid(), signal.SIGUSR1)
        stats = manager.maybe_save(2, {"model": model})
        assert stats is not None and stats.durable_s is not None
        assert manager.should_stop and manager.steps == [2]
        assert manager.engine.in_flight is None


def _run_loop(directory: str, *args: str, **popen) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.Popen(
        [sys.executable, "-m", "tests.preempt_loop", directory, *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **popen,
    )


@pytest.mark.slow
def test_sigterm_to_a_real_loop_leaves_a_committed_checkpoint_that_resumes_exactly(tmp_path):
    run_dir, ref_dir = str(tmp_path / "run"), str(tmp_path / "reference")
    process = _run_loop(run_dir, "--until-stopped")
    try:
        for line in process.stdout:
            if line.startswith("step ") and int(line.split()[1]) >= 3:
                process.send_signal(signal.SIGTERM)
                break
        out, err = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, err
    stopped = int(next(line for line in out.splitlines() if line.startswith("stopped")).split()[1])
    manager = CheckpointManager(run_dir)
    latest = manager.latest()
    assert latest is not None and latest.step == stopped
    assert latest.metadata["reasons"] == ["preemption"]

    target = stopped + 4
    resumed = _run_loop(run_dir, "--steps", str(target))
    reference = _run_loop(ref_dir, "--steps", str(target))
    for proc in (resumed, reference):
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        assert f"done {target}" in out
    final = torch.load(f"{run_dir}.final.pt")
    expected = torch.load(f"{ref_dir}.final.pt")
    for key in expected:
        assert torch.equal(final[key], expected[key]), key


@pytest.mark.parametrize("keep", [1, 2, 3])
def test_keep_last_with_async_writes(ckpt_dir, keep):
    model, optimizer, _ = make_training(0)
    state = {"model": model, "optim": optimizer}
    with CheckpointManager(
        ckpt_dir, save_policy=EveryNSteps(1), retention=KeepLast(keep), async_mode="thread"
    ) as manager:
        for step in range(1, 8):
            train_step(model, optimizer)
            manager.maybe_save(step, state)
            committed = manager.steps
            # the newest committed checkpoint is never deleted while the next one is being written
            assert step - 1 in committed or step in committed or step == 1
            # at most K committed plus the one just saved
            assert len(committed) <= keep + 1
    assert manager.steps == list(range(8 - keep, 8))
    CheckpointManager(ckpt_dir).load({"model": model, "optim": optimizer})


def test_retention_leaves_another_runs_checkpoints_alone(ckpt_dir):
    model, optimizer, _ = make_training(0)
    with CheckpointManager(ckpt_dir, run_id="other-run", async_mode="sync") as other:
        other.save(2, {"model": model})
        other.save(100, {"model": model})
    with CheckpointManager(
        ckpt_dir, run_id="this-run", save_policy=EveryNSteps(1), retention=KeepLast(1), async_mode="thread"
    ) as manager:
        for step in range(3, 8):
            manager.maybe_save(step, {"model": model})
    runs = {i.step: i.manifest["run_id"] for i in CheckpointManager(ckpt_dir).list()}
    assert runs == {2: "other-run", 7: "this-run", 100: "other-run"}


def test_retention_carries_over_a_resumed_run_with_the_same_run_id(ckpt_dir):
    model, _, _ = make_training(0)
    for start in (1, 4):
        with CheckpointManager(
            ckpt_dir, run_id="job-42", save_policy=EveryNSteps(1), retention=KeepLast(2), async_mode="thread"
        ) as manager:
            for step in range(start, start + 3):
                manager.maybe_save(step, {"model": model})
    assert CheckpointManager(ckpt_dir).steps == [5, 6]


@pytest.mark.parametrize(
    "mode, losses, expected",
    [
        ("min", [0.5, 0.2, 0.9, 0.1, 0.7, 0.8], [2, 4, 6]),
        ("max", [0.5, 0.2, 0.9, 0.1, 0.7, 0.3], [3, 5, 6]),
    ],
)
def test_keep_best_in_a_loop(ckpt_dir, mode, losses, expected):
    model, _, _ = make_training(0)
    with CheckpointManager(
        ckpt_dir,
        save_policy=EveryNSteps(1),
        retention=KeepBest("val_loss", k=2, mode=mode),
        async_mode="thread",
    ) as manager:
        for step, loss in enumerate(losses, start=1):
            manager.maybe_save(step, {"model": model}, metrics={"val_loss": torch.tensor(loss)})
    # the best two by val_loss, plus the newest (never deleted)
    assert manager.steps == expected
    assert manager.latest().metadata["metrics"] == {"val_loss": pytest.approx(losses[-1])}


def test_keep_last_or_every_n(ckpt_dir):
    model, _, _ = make_training(0)
    with CheckpointManager(
        ckpt_dir, save_policy=EveryNSteps(1), retention=KeepLast(2) | KeepEveryNSteps(3), async_mode="thread"
    ) as manager:
        for step in range(1, 9):
            manager.maybe_save(step, {"model": model})
    assert manager.steps == [3, 6, 7, 8]


class FlakyMemoryFileSystem(MemoryFileSystem):
    """memory:// on which deleting a checkpoint (its manifest or its directory) fails for names in
    ``failing``: an injected storage fault. Renames (rm of one data file) still work."""

    protocol = "flakymem"
    failing: set[str] = set()

    def rm(self, path, recursive=False, maxdepth=None):  # noqa: D401
        paths = path if isinstance(path, list) else [path]
        deleting = recursive or any(str(p).endswith("dcp_plugin.json") for p in paths)
        if deleting and any(name in str(p) for p in paths for name in self.failing):
            raise PermissionError(f"injected: cannot delete {path}")
        return super().rm(path, recursive=recursive, maxdepth=maxdepth)


def test_a_failed_delete_is_logged_not_fatal(caplog):
    fsspec.register_implementation("flakymem", FlakyMemoryFileSystem, clobber=True)
    url = f"flakymem://flaky-{uuid.uuid4().hex[:8]}/run"
    FlakyMemoryFileSystem.failing = {step_name(1)}
    model, _, _ = make_training(0)
    try:
        with (
            caplog.at_level(logging.WARNING, logger="dcp_plugin.policies.retention"),
            CheckpointManager(url, save_policy=EveryNSteps(1), retention=KeepLast(1), async_mode="thread") as manager,
        ):
            for step in range(1, 5):
                manager.maybe_save(step, {"model": model})
        assert any("could not delete" in r.getMessage() and step_name(1) in r.getMessage() for r in caplog.records)
        # step 1 could not go; everything else retention wanted gone is gone
        assert manager.steps == [1, 4]
        FlakyMemoryFileSystem.failing = set()
        with CheckpointManager(url, save_policy=EveryNSteps(1), retention=KeepLast(1), run_id=manager.run_id) as again:
            again.maybe_save(5, {"model": model})
        assert again.steps == [5]
    finally:
        FlakyMemoryFileSystem.failing = set()
        fs, root = FlakyMemoryFileSystem(), "/" + url.removeprefix("flakymem://").split("/")[0]
        if fs.exists(root):
            fs.rm(root, recursive=True)


def test_retention_on_memory_storage(memory_url):
    model, _, _ = make_training(0)
    with CheckpointManager(
        memory_url, save_policy=EveryNSteps(2), retention=KeepLast(2), async_mode="thread"
    ) as manager:
        for step in range(1, 11):
            manager.maybe_save(step, {"model": model})
    assert manager.steps == [8, 10]


@pytest.mark.s3
def test_retention_on_s3(s3_url):
    url, options = s3_url
    model, _, _ = make_training(0)
    with CheckpointManager(
        url, save_policy=EveryNSteps(1), retention=KeepLast(2), async_mode="thread", storage_options=options
    ) as manager:
        for step in range(1, 5):
            manager.maybe_save(step, {"model": model})
    assert manager.steps == [3, 4]
    restored, _, _ = make_training(1)
    CheckpointManager(url, storage_options=options).load({"model": restored})
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), restored.state_dict().values()))


def test_plain_save_calls_are_retained_too(ckpt_dir):
    model, _, _ = make_training(0)
    with CheckpointManager(ckpt_dir, retention=KeepLast(1), async_mode="thread") as manager:
        for step in range(1, 4):
            manager.save(step, {"model": model})
        manager.wait()
        assert manager.steps == [3]


def test_time_trigger_in_a_loop_with_injected_clock(ckpt_dir):
    clock = FakeClock()
    model, _, _ = make_training(0)
    with CheckpointManager(ckpt_dir, save_policy=EveryNSeconds(60, clock=clock), async_mode="sync") as manager:
        for step in range(1, 10):
            clock.advance(25)
            manager.maybe_save(step, {"model": model})
    assert manager.steps == [4, 7]


def test_preemption_fires_once_per_signal():
    policy = OnPreemption(signals=(signal.SIGUSR1,))
    policy.trigger(signal.SIGUSR1)
    assert policy.wants_save(SaveContext(step=3))
    policy.saved(SaveContext(step=3))
    assert not policy.wants_save(SaveContext(step=4))
    policy.trigger(signal.SIGUSR1)
    assert policy.wants_save(SaveContext(step=5))
