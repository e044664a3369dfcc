"""What keeps training fast while checkpoints are written: the background write runs at lower priority (the
training threads keep theirs), repeat saves reuse DCP's save plan without changing a byte, staging buffers are
prepared before the first save, and the default staging follows the hardware."""

from __future__ import annotations

import glob
import os
import sys
import threading

import pytest
import torch
from torch.distributed.checkpoint.planner import SavePlanner

from dcp_plugin import CheckpointConfig, CheckpointManager
from dcp_plugin.engine import plans, priority
from dcp_plugin.policies import EveryNSteps
from dcp_plugin.storage import record_writer
from tests.models import assert_same, make_training, snapshot, train_step

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice values are Linux's")


def _record_writing_threads(monkeypatch) -> list[tuple[int, int]]:
    """(native thread id, nice value) of every thread that opens a checkpoint file for writing."""
    seen: list[tuple[int, int]] = []
    original = record_writer.FileWriting._write_file

    def write_file(self, planner, path, storage_key, items):
        seen.append((threading.get_native_id(), priority.thread_nice()))
        return original(self, planner, path, storage_key, items)

    monkeypatch.setattr(record_writer.FileWriting, "_write_file", write_file)
    return seen


@linux_only
@pytest.mark.parametrize("writer_nice", [5, 0])
def test_background_writer_threads_run_at_lower_priority_and_training_keeps_its_own(tmp_path, monkeypatch, writer_nice):
    seen = _record_writing_threads(monkeypatch)
    training_nice = priority.thread_nice()
    model, optimizer, _ = make_training()
    train_step(model, optimizer)
    with CheckpointManager(str(tmp_path), async_mode="thread", thread_count=2, writer_nice=writer_nice) as manager:
        for step in (1, 2):
            manager.save(step, {"model": model, "optim": optimizer})
            train_step(model, optimizer)
            manager.wait()
    assert seen, "no checkpoint file was written"
    assert threading.get_native_id() not in {tid for tid, _ in seen}
    assert {nice for _, nice in seen} == {min(priority.MAX_NICE, training_nice + writer_nice)}
    assert priority.thread_nice() == training_nice


@linux_only
def test_sync_saves_write_on_the_training_thread_without_changing_its_priority(tmp_path, monkeypatch):
    seen = _record_writing_threads(monkeypatch)
    training_nice = priority.thread_nice()
    model, optimizer, _ = make_training()
    with CheckpointManager(str(tmp_path), async_mode="sync", thread_count=1, writer_nice=10) as manager:
        manager.save(1, {"model": model, "optim": optimizer})
    assert {tid for tid, _ in seen} == {threading.get_native_id()}
    assert priority.thread_nice() == training_nice


def _nice_values_of(pid: int) -> list[int]:
    values = []
    for stat in glob.glob(f"/proc/{pid}/task/*/stat"):
        with open(stat) as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
        values.append(int(fields[16]))  # field 19 of proc(5), counted after "pid (comm)"
    return values


@linux_only
@pytest.mark.slow
def test_the_writer_process_keeps_its_main_thread_at_the_training_priority(tmp_path):
    from torch.distributed.checkpoint import _async_process_executor

    training_nice = priority.thread_nice()
    model, optimizer, _ = make_training()
    train_step(model, optimizer)
    with CheckpointManager(str(tmp_path), async_mode="process", writer_nice=7) as manager:
        for step in (1, 2):
            manager.save(step, {"model": model, "optim": optimizer})
            manager.wait()
        daemon_pid = _async_process_executor._CHECKPOINT_PROCESS._save_process.pid
        # the write ran in short-lived threads of lower priority; the thread that takes the next save does not
        assert set(_nice_values_of(daemon_pid)) == {training_nice}
        assert manager.steps == [1, 2]
    assert set(_nice_values_of(os.getpid())) == {training_nice}


@linux_only
def test_a_lowered_write_returns_its_result_and_raises_its_error_on_the_caller():
    assert priority.run_lowered(3, lambda: threading.get_native_id()) != threading.get_native_id()
    with pytest.raises(ZeroDivisionError):
        priority.run_lowered(3, lambda: 1 / 0)
    assert priority.run_lowered(0, lambda: threading.get_native_id()) == threading.get_native_id()


def test_writer_nice_is_validated():
    with pytest.raises(Exception, match="writer_nice"):
        CheckpointConfig(writer_nice=20)
    assert CheckpointConfig.from_env({"DCP_PLUGIN_WRITER_NICE": "3"}).writer_nice == 3


# -- plan caching ---------------------------------------------------------------------------------------------
def _data_files(directory: str) -> dict[str, bytes]:
    out = {}
    for path in sorted(glob.glob(os.path.join(directory, "*.distcp"))):
        with open(path, "rb") as handle:
            out[os.path.basename(path)] = handle.read()
    return out


def test_repeat_saves_with_a_cached_plan_write_the_same_checkpoint_as_without(tmp_path, monkeypatch):
    model, optimizer, _ = make_training()
    train_step(model, optimizer)
    state = {"model": model, "optim": optimizer}
    cached = CheckpointManager(str(tmp_path / "cached"), async_mode="thread")
    for step in (1, 2, 3):  # the 2nd and 3rd save reuse the plan of the 1st
        cached.save(step, state)
        cached.wait()
    if plans.PLAN_CACHING:
        assert cached.engine.plan_keys.current in SavePlanner._cached_metadata
    monkeypatch.setattr(plans, "PLAN_CACHING", False)
    with CheckpointManager(str(tmp_path / "plain"), async_mode="thread") as plain:
        plain.save(3, state)
    assert _data_files(str(tmp_path / "cached" / "step_000000003")) == _data_files(
        str(tmp_path / "plain" / "step_000000003")
    )
    expected = snapshot(model, optimizer)
    for step in (1, 3):
        fresh_model, fresh_optimizer, _ = make_training(seed=5)
        cached.load({"model": fresh_model, "optim": fresh_optimizer}, step=step)
        assert_same(snapshot(fresh_model, fresh_optimizer), expected)
    cached.close()
    assert cached.engine.plan_keys.current not in getattr(SavePlanner, "_cached_metadata", {})


def test_a_changed_state_after_cached_plans_is_saved_whole(tmp_path):
    model, optimizer, _ = make_training()
    train_step(model, optimizer)
    with CheckpointManager(str(tmp_path), async_mode="thread") as manager:
        manager.save(1, {"model": model})
        manager.wait()
        manager.save(2, {"model": model, "optim": optimizer, "extra": torch.arange(5.0)})
        manager.wait()
        fresh_model, fresh_optimizer, _ = make_training(seed=3)
        extra = torch.zeros(5)
        manager.load({"model": fresh_model, "optim": fresh_optimizer, "extra": extra}, step=2)
    assert_same(snapshot(fresh_model, fresh_optimizer), snapshot(model, optimizer))
    assert torch.equal(extra, torch.arange(5.0))


# -- staging buffers ready before the first save ------------------------------------------------------------------
def _staged_storages(manager: CheckpointManager) -> int:
    stager = manager.engine._stagers._default
    return len(stager._state_dict_stager._cached_storage_mapping)  # DCP's buffer cache, keyed by live storage


def test_prepared_buffers_are_reused_by_the_first_save_which_holds_the_state_at_save_time(tmp_path):
    model, optimizer, _ = make_training()
    train_step(model, optimizer)
    state = {"model": model, "optim": optimizer}
    with CheckpointManager(str(tmp_path), async_mode="thread") as manager:
        manager.prepare(state)
        manager.engine._stagers._prestage.finish()  # wait for the background staging
        prepared = _staged_storages(manager)
        assert prepared > 0
        train_step(model, optimizer)  # the state changes after the buffers were prepared
        expected = snapshot(model, optimizer)
        manager.save(1, state)
        assert _staged_storages(manager) == prepared  # no buffer allocated at the first save
        train_step(model, optimizer)
        fresh_model, fresh_optimizer, _ = make_training(seed=9)
        manager.load({"model": fresh_model, "optim": fresh_optimizer}, step=1)
    assert_same(snapshot(fresh_model, fresh_optimizer), expected)


def test_maybe_save_prepares_at_the_first_step_it_does_not_save(tmp_path):
    model, optimizer, _ = make_training()
    state = {"model": model, "optim": optimizer}
    with CheckpointManager(str(tmp_path), async_mode="thread", save_policy=EveryNSteps(3)) as manager:
        assert manager.engine.needs_prepare
        train_step(model, optimizer)
        assert manager.maybe_save(1, state) is None
        assert not manager.engine.needs_prepare
        for step in (2, 3):
            train_step(model, optimizer)
            manager.maybe_save(step, state)
        manager.wait()
        assert manager.steps == [3]


def test_sync_mode_and_fresh_buffers_prepare_nothing(tmp_path):
    for options in ({"async_mode": "sync"}, {"async_mode": "thread", "reuse_buffers": False}):
        with CheckpointManager(str(tmp_path / options["async_mode"]), **options) as manager:
            assert not manager.engine.needs_prepare


# -- defaults follow the hardware ---------------------------------------------------------------------------------
def test_staging_runs_in_the_background_by_default_in_every_asynchronous_mode_on_every_host():
    assert CheckpointConfig().async_staging is None
    assert CheckpointConfig().stages_in_background  # with or without CUDA
    assert CheckpointConfig(async_mode="process").stages_in_background
    assert not CheckpointConfig(async_mode="sync").stages_in_background
    assert CheckpointConfig(async_staging=True).stages_in_background
    assert not CheckpointConfig(async_staging=False).stages_in_background
    assert CheckpointConfig.from_env({"DCP_PLUGIN_ASYNC_STAGING": "auto"}).async_staging is None
    assert CheckpointConfig.from_env({"DCP_PLUGIN_ASYNC_STAGING": "1"}).stages_in_background


# -- loads without a live tensor take over what was read -----------------------------------------------------------
def test_a_lightning_load_holds_the_stored_values_and_live_tensors_are_filled_in_place(tmp_path):
    from dcp_plugin.lightning import DCPCheckpointIO

    model, optimizer, _ = make_training()
    train_step(model, optimizer)
    expected = snapshot(model, optimizer)
    plugin = DCPCheckpointIO(async_mode="sync")
    path = str(tmp_path / "a.ckpt")
    plugin.save_checkpoint({"state_dict": model.state_dict(), "optimizer_states": [optimizer.state_dict()]}, path)
    loaded = plugin.load_checkpoint(path, weights_only=True)
    for key, value in expected["model"].items():
        assert torch.equal(loaded["state_dict"][key], value)
        assert not hasattr(loaded["state_dict"][key], "_dcp_plugin_placeholder")
    with CheckpointManager(str(tmp_path / "m"), async_mode="sync") as manager:
        manager.save(1, {"model": model})
        pointers = {name: p.data_ptr() for name, p in model.named_parameters()}
        train_step(model, optimizer)
        manager.load({"model": model}, step=1)
    assert {name: p.data_ptr() for name, p in model.named_parameters()} == pointers
    assert_same(snapshot(model)["model"], expected["model"])


def test_the_automatic_writer_priority_lowers_only_the_writer_process():
    """Writer threads share the GIL with training: lowered, they hold it while the loop waits (a 10x larger loop
    stall in the goodput benchmark), so only the writer process is lowered by default."""
    assert CheckpointConfig(async_mode="thread").background_nice == 0
    assert CheckpointConfig(async_mode="process").background_nice == 10
    assert CheckpointConfig(async_mode="sync", writer_nice=5).background_nice == 0
    assert CheckpointConfig(async_mode="thread", writer_nice=5).background_nice == 5
    assert CheckpointConfig.from_env({"DCP_PLUGIN_WRITER_NICE": "auto"}).writer_nice is None
