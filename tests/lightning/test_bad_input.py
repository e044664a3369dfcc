"""Bad input gives one clear error: missing path, torch.save file, half-written directory, read-only target."""

from __future__ import annotations

import os
import shutil
import warnings

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from dcp_plugin import CheckpointNotFoundError
from dcp_plugin.lightning import DCPCheckpointIO, LightningCheckpointError
from tests.lightning.helpers import TinyModule, loader, seed_all, trainer


def test_ckpt_path_pointing_to_nothing(tmp_path):
    missing = str(tmp_path / "nope.ckpt")
    # Lightning's default plugin: code written for it matches on this text
    with pytest.raises(FileNotFoundError) as default:
        trainer(str(tmp_path), None, max_epochs=1).fit(TinyModule(), loader(), ckpt_path=missing)
    lightning_text = str(default.value)
    assert lightning_text == f"Checkpoint file not found: {missing}"

    run = trainer(str(tmp_path), DCPCheckpointIO(), max_epochs=1)
    with pytest.raises(CheckpointNotFoundError) as ours:
        run.fit(TinyModule(), loader(), ckpt_path=missing)
    assert isinstance(ours.value, FileNotFoundError)
    assert str(ours.value).startswith(lightning_text)
    assert "No checkpoint at" in str(ours.value) and "nope.ckpt" in str(ours.value)


def test_plain_torch_save_checkpoint_is_resumed(tmp_path):
    # a run that used Lightning's default TorchCheckpointIO, continued with the plugin
    seed_all(0)
    old = trainer(str(tmp_path), None, max_epochs=1, callbacks=[ModelCheckpoint(dirpath=str(tmp_path / "old"))])
    old.fit(TinyModule(), loader())
    file_path = old.checkpoint_callback.best_model_path
    assert os.path.isfile(file_path)

    module = TinyModule()
    new = trainer(str(tmp_path), DCPCheckpointIO(), max_epochs=2)
    new.fit(module, loader(), ckpt_path=file_path)
    assert new.global_step == 8 and module.extra_seen["steps"] == 4


def test_unreadable_file_says_what_to_do(tmp_path):
    bogus = tmp_path / "junk.ckpt"
    bogus.write_bytes(b"not a checkpoint")
    with pytest.raises(LightningCheckpointError, match="is a file, not a dcp-plugin checkpoint directory"):
        DCPCheckpointIO().load_checkpoint(str(bogus))


def test_half_written_directory_is_refused(tmp_path):
    plugin = DCPCheckpointIO(async_mode="sync")
    good = tmp_path / "good.ckpt"
    plugin.save_checkpoint({"global_step": 3, "state_dict": {"w": torch.ones(3)}}, str(good))
    half = tmp_path / "half.ckpt"
    shutil.copytree(good, half)
    os.remove(half / "dcp_plugin.json")  # as if the writer died before the commit
    run = trainer(str(tmp_path), DCPCheckpointIO(), max_epochs=1)
    with pytest.raises(CheckpointNotFoundError, match="never committed"):
        run.fit(TinyModule(), loader(), ckpt_path=str(half))


def test_read_only_target_directory(tmp_path):
    if os.geteuid() == 0:
        target = "/sys/dcp_plugin_test/ckpts"  # root may write anywhere but not into sysfs
    else:
        readonly = tmp_path / "readonly"
        readonly.mkdir()
        readonly.chmod(0o555)
        target = str(readonly / "ckpts")
    plugin = DCPCheckpointIO()
    with pytest.raises(OSError, match="Cannot create the checkpoint directory|not writable"):
        plugin.save_checkpoint({"global_step": 1, "state_dict": {"w": torch.ones(2)}}, f"{target}/a.ckpt")
    plugin.teardown()


def test_storage_options_must_be_a_mapping(tmp_path):
    plugin = DCPCheckpointIO()
    with pytest.raises(TypeError, match="storage_options must be a mapping"):
        plugin.save_checkpoint({"global_step": 1}, str(tmp_path / "a.ckpt"), storage_options="s3")


def test_weights_only_refuses_pickled_values(tmp_path):
    path = str(tmp_path / "p.ckpt")
    writer = DCPCheckpointIO(async_mode="sync", allow_pickle=True)
    writer.save_checkpoint({"global_step": 1, "obj": ValueError("kept")}, path)
    with pytest.raises(Exception, match="pickled Python objects"):
        DCPCheckpointIO().load_checkpoint(path, weights_only=True)
    assert repr(DCPCheckpointIO().load_checkpoint(path, weights_only=False)["obj"]) == "ValueError('kept')"


def test_dcp_fsdp_strategy_on_cpu_is_refused_when_the_trainer_is_built(tmp_path):
    from dcp_plugin.lightning import DCPFSDPStrategy

    with pytest.raises(ValueError, match=r"DCPFSDPStrategy needs a CUDA accelerator.*DCPModelParallelStrategy"):
        trainer(str(tmp_path), DCPCheckpointIO(), max_epochs=1, strategy=DCPFSDPStrategy())


def test_lightning_sharded_strategies_that_bypass_the_plugin_are_warned_about(tmp_path):
    """Lightning's own ModelParallelStrategy writes sharded checkpoints with its own dcp.save, never calling the
    plugin; with save_distributed_checkpoint=False it hands rank 0 a full state through the plugin."""
    from lightning.pytorch.strategies import ModelParallelStrategy

    from dcp_plugin.lightning import DCPModelParallelStrategy
    from dcp_plugin.lightning.compat import plugin_of

    def built(strategy):  # what ModelCheckpoint.setup and Trainer.save_checkpoint ask at fit setup and each save
        return trainer(str(tmp_path), DCPCheckpointIO(), max_epochs=1, strategy=strategy)

    bypassing = built(ModelParallelStrategy())
    with pytest.warns(UserWarning, match=r"ModelParallelStrategy .*never calls DCPCheckpointIO.*DCPModelParallel"):
        assert isinstance(plugin_of(bypassing), DCPCheckpointIO)
    for through_the_plugin in (ModelParallelStrategy(save_distributed_checkpoint=False), DCPModelParallelStrategy()):
        run = built(through_the_plugin)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert isinstance(plugin_of(run), DCPCheckpointIO)
