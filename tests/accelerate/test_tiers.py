"""The Accelerate adapter with a remote tier: save_state replicates to S3 (moto), load_state on a fresh machine."""

from __future__ import annotations

import json
import shutil

import pytest
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration

import dcp_plugin.accelerate as dpa
from dcp_plugin import CheckpointStorage
from tests.models import assert_same, make_training, snapshot, train_step

pytestmark = pytest.mark.s3


def _accelerator(project: str) -> Accelerator:
    config = ProjectConfiguration(project_dir=project, automatic_checkpoint_naming=True)
    return Accelerator(cpu=True, project_config=config)


def test_save_state_replicates_and_load_state_on_a_fresh_machine_takes_the_newest_from_s3(tmp_path, s3_url):
    url, options = s3_url
    project = str(tmp_path / "project")
    accelerator = _accelerator(project)
    dpa.enable(accelerator, environ={}, async_mode="thread", remote=url, remote_storage_options=options)
    model, optimizer, scheduler = accelerator.prepare(*make_training(0))
    for _ in range(3):
        train_step(model, optimizer, scheduler)
        accelerator.save_state()
    expected = snapshot(model, optimizer)
    accelerator.end_training()  # waits for the copies
    assert [i.name for i in CheckpointStorage(url, options).list()] == [f"checkpoint_{i}" for i in range(3)]
    shutil.rmtree(project)  # a new machine

    fresh = _accelerator(project)
    environ = {"DCP_PLUGIN_REMOTE": url, "DCP_PLUGIN_REMOTE_STORAGE_OPTIONS": json.dumps(options)}
    checkpointer = dpa.enable(fresh, environ=environ, async_mode="sync")
    model, optimizer, scheduler = fresh.prepare(*make_training(7))
    assert checkpointer.latest().name == "checkpoint_2"
    fresh.load_state()
    assert_same(snapshot(model, optimizer), expected)
    assert fresh.project_configuration.iteration == 3  # naming continues after the remote checkpoints
    fresh.end_training()
