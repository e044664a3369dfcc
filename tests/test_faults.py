"""Failures never lose a committed checkpoint, never look committed, and always reach the caller."""

from __future__ import annotations

import glob
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import tests.faultyfs  # noqa: F401 - registers faulty://
from dcp_plugin import CheckpointManager, CheckpointSaveError
from tests.models import assert_same, make_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def bias_model(value: float) -> torch.nn.Module:
    model = make_model()
    with torch.no_grad():
        model[0].bias.fill_(value)
    return model


@pytest.mark.parametrize("mode", ["thread", pytest.param("process", marks=pytest.mark.slow)])
def test_background_write_error_reaches_the_caller_with_the_path(tmp_path, mode):
    directory = f"faulty://{tmp_path}/ckpts"
    with CheckpointManager(directory, async_mode=mode) as manager:
        manager.save(1, {"model": bias_model(1.0)})
        manager.wait()
        (tmp_path / ".fail-writes").touch()
        manager.save(2, {"model": bias_model(2.0)})  # returns; the write fails in the background
        with pytest.raises(CheckpointSaveError, match=r"step_000000002.*No space left on device") as excinfo:
            manager.save(3, {"model": bias_model(3.0)})  # the next call reports it
        assert excinfo.value.__cause__ is not None
        (tmp_path / ".fail-writes").unlink()
        assert manager.steps == [1]
        assert manager.storage.incomplete() == []  # the failed write was cleaned up
        manager.save(3, {"model": bias_model(3.0)})
        manager.wait()
        assert manager.steps == [1, 3]
        restored = make_model(seed=7)
        manager.load({"model": restored}, step=1)
    assert torch.all(restored[0].bias == 1.0)


def test_error_of_the_last_save_is_raised_by_close(tmp_path):
    manager = CheckpointManager(f"faulty://{tmp_path}/ckpts", async_mode="thread")
    (tmp_path / ".fail-writes").touch()
    manager.save(1, {"model": make_model()})
    with pytest.raises(CheckpointSaveError, match="step_000000001"):
        manager.close()


def test_sync_write_error_is_raised_by_save(tmp_path):
    (tmp_path / ".fail-writes").touch()
    with CheckpointManager(f"faulty://{tmp_path}/ckpts", async_mode="sync") as manager:
        with pytest.raises(CheckpointSaveError, match="step_000000004.*No space left"):
            manager.save(4, {"model": make_model()})
        assert manager.steps == []


def run_and_kill(directory: str, mode: str, megabytes: int, slow_flag=None, wait_for_files: str | None = None) -> None:
    """Run tests/scripts/save_then_hang.py and SIGKILL its whole process group while step 2 is being saved."""
    args = [directory, mode, str(megabytes)] + ([str(slow_flag)] if slow_flag else [])
    child = subprocess.Popen(
        [sys.executable, "-m", "tests.scripts.save_then_hang", *args],
        cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=ROOT),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )
    try:
        line = child.stdout.readline()
        assert line.strip() == "SAVING", f"child exited early (code {child.poll()})"
        deadline = time.monotonic() + 60
        while wait_for_files and not glob.glob(wait_for_files):  # the write has begun
            assert time.monotonic() < deadline, "the second save never started writing"
            time.sleep(0.05)
    finally:
        os.killpg(child.pid, signal.SIGKILL)  # the trainer and its writer daemon, as a node failure would
        child.wait(30)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["thread", "process"])
def test_sigkill_during_async_save_keeps_previous_checkpoint(tmp_path, mode):
    directory = f"faulty://{tmp_path}/ckpts"
    step2_files = str(tmp_path / "ckpts" / ".dcp-plugin" / "objects" / "step_000000002.*" / "*.distcp")
    run_and_kill(directory, mode, 1, slow_flag=tmp_path / ".slow-writes", wait_for_files=step2_files)
    with CheckpointManager(directory, async_mode="sync") as manager:
        assert manager.steps == [1]
        [leftover] = manager.storage.incomplete()  # half-written, not listed
        assert leftover.startswith(".dcp-plugin/objects/step_000000002.")
        assert manager.storage.purge() == [leftover] and manager.steps == [1]
        loaded = torch.nn.ParameterDict({"w": torch.nn.Parameter(torch.zeros(2**18))})
        manager.load({"model": loaded}, step=1)
    torch.manual_seed(0)
    assert_same(loaded["w"].detach(), torch.randn(2**18))


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["thread", "process"])
def test_sigkill_during_large_local_save_never_lists_a_partial_checkpoint(tmp_path, mode):
    directory = str(tmp_path / "ckpts")
    run_and_kill(directory, mode, megabytes=64)
    with CheckpointManager(directory, async_mode="sync") as manager:
        steps = manager.steps
        assert steps[0] == 1 and set(steps) <= {1, 2}
        for step in steps:
            loaded = torch.nn.ParameterDict({"w": torch.nn.Parameter(torch.zeros(64 * 2**18))})
            manager.load({"model": loaded}, step=step)
            torch.manual_seed(0)
            assert_same(loaded["w"].detach(), torch.randn(64 * 2**18) + (step - 1))
