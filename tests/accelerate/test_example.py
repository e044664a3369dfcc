"""The Accelerate example trains, checkpoints in process mode (chosen by environment), and resumes."""

from __future__ import annotations

import os

import pytest

from tests.accelerate.launch import ROOT, launch

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

EXAMPLE = ROOT / "examples" / "accelerate_train.py"


def test_example_trains_saves_and_resumes(tmp_path):
    project = str(tmp_path / "run")
    env = {"DCP_PLUGIN_ASYNC_MODE": "process", "DCP_PLUGIN_KEEP_LAST": "2"}
    first = launch(["--project-dir", project, "--epochs", "2"], env=env, script=EXAMPLE)
    assert "epoch 2:" in first.stdout and "resumed" not in first.stdout
    second = launch(["--project-dir", project, "--epochs", "3"], env=env, script=EXAMPLE)
    assert "resumed from checkpoint_1 at epoch 2" in second.stdout
    assert "epoch 3:" in second.stdout and "epoch 1:" not in second.stdout
    assert sorted(os.listdir(os.path.join(project, "checkpoints"))) == ["checkpoint_1", "checkpoint_2"]
