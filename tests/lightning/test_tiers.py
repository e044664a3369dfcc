"""DCPCheckpoint with a remote tier: a real Trainer replicates to S3 (moto), a fresh machine resumes from it."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from dcp_plugin import CheckpointStorage
from dcp_plugin.lightning import DCPCheckpoint, DCPCheckpointIO
from tests.lightning.helpers import TinyModule, loader, seed_all, trainer

pytestmark = pytest.mark.s3


def _weights(module: TinyModule) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_checkpoints_are_replicated_and_a_fresh_machine_resumes_from_s3(tmp_path, s3_url, monkeypatch):
    url, options = s3_url
    local = str(tmp_path / "local")
    seed_all(0)
    first_module = TinyModule()
    callback = DCPCheckpoint(local, every_n_train_steps=2, remote=url, remote_storage_options=options)
    first = trainer(str(tmp_path), DCPCheckpointIO(), max_epochs=1, callbacks=[callback])
    first.fit(first_module, loader())
    assert first.global_step == 4
    # fit returns once the copies are committed remotely
    assert [i.step for i in CheckpointStorage(url, options).list()] == [2, 4]
    shutil.rmtree(local)  # a new machine: the local tier is empty

    # configured through the environment only, as a launcher would
    monkeypatch.setenv("DCP_PLUGIN_REMOTE", url)
    monkeypatch.setenv("DCP_PLUGIN_REMOTE_STORAGE_OPTIONS", json.dumps(options))
    seed_all(99)
    second_module = TinyModule()
    resumed = DCPCheckpoint(local, every_n_train_steps=2)
    second = trainer(str(tmp_path), DCPCheckpointIO(), max_epochs=1, callbacks=[resumed])
    second.fit(second_module, loader())  # auto-resume: nothing left to train after step 4
    assert second.ckpt_path == CheckpointStorage(local).url("step_000000004")  # copied back to the local tier
    assert second.global_step == 4
    assert resumed.run_id == callback.run_id
    for key, value in _weights(first_module).items():
        assert torch.equal(_weights(second_module)[key], value), key


def test_replicate_every_n_steps_and_remote_keep_last(tmp_path, s3_url):
    url, options = s3_url
    local = str(tmp_path / "local")
    callback = DCPCheckpoint(
        local,
        every_n_train_steps=1,
        keep_last=1,
        remote=url,
        remote_storage_options=options,
        replicate_every_n_steps=2,
        remote_keep_last=1,
        auto_resume=False,
    )
    trainer(str(tmp_path), DCPCheckpointIO(), max_epochs=1, callbacks=[callback]).fit(TinyModule(), loader())
    assert [i.step for i in CheckpointStorage(local).list()] == [4]
    assert [i.step for i in CheckpointStorage(url, options).list()] == [4]
