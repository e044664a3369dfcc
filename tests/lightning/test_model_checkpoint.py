"""ModelCheckpoint works unchanged with async writes: top-k pruning, save_last, ckpt_path="last"/"best"."""

from __future__ import annotations

import os

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from dcp_plugin import CheckpointStorage
from dcp_plugin.lightning import DCPCheckpointIO, load_lightning_module
from tests.lightning.helpers import TinyModule, loader, seed_all, trainer


def _committed(directory: str) -> list[str]:
    return sorted(info.name for info in CheckpointStorage(directory).list())


def _entries(directory: str) -> list[str]:
    return sorted(os.listdir(directory))


@pytest.mark.parametrize("mode", ["thread", "process"])
def test_top_k_pruning_with_async_writes_keeps_exactly_the_best(tmp_path, mode):
    ckpts = str(tmp_path / "ckpts")
    callback = ModelCheckpoint(
        dirpath=ckpts,
        every_n_train_steps=1,
        monitor="train_loss",
        save_top_k=2,
        save_last=True,
        filename="{step}",
    )
    seed_all(0)
    run = trainer(str(tmp_path), DCPCheckpointIO(async_mode=mode), max_epochs=2, callbacks=[callback])
    run.fit(TinyModule(), loader())

    expected = sorted([os.path.basename(p) for p in callback.best_k_models] + ["last.ckpt"])
    assert len(callback.best_k_models) == 2
    assert _entries(ckpts) == expected  # nothing else: no leftovers, no resurrected checkpoints
    assert _committed(ckpts) == expected
    best = DCPCheckpointIO().load_checkpoint(callback.best_model_path)
    assert best["global_step"] == int(os.path.basename(callback.best_model_path)[len("step=") : -len(".ckpt")])


def test_save_last_link_and_resume_from_last_and_best(tmp_path):
    ckpts = str(tmp_path / "ckpts")

    def callback() -> ModelCheckpoint:
        return ModelCheckpoint(
            dirpath=ckpts, every_n_train_steps=2, monitor="train_loss", save_top_k=1, save_last="link"
        )

    first_cb = callback()
    seed_all(0)
    first = trainer(str(tmp_path), DCPCheckpointIO(), max_epochs=1, callbacks=[first_cb])
    first.fit(TinyModule(), loader())
    last = os.path.join(ckpts, "last.ckpt")
    assert os.path.islink(last)
    assert os.path.realpath(last) == os.path.realpath(first_cb._last_checkpoint_saved)
    assert DCPCheckpointIO().load_checkpoint(last)["global_step"] == 4

    second = trainer(str(tmp_path), DCPCheckpointIO(), max_epochs=2, callbacks=[callback()])
    module = TinyModule()
    second.fit(module, loader(), ckpt_path="last")
    assert second.global_step == 8
    assert module.extra_seen["steps"] == 4  # resumed from the step-4 checkpoint

    tested = TinyModule()
    second.validate(tested, loader(), ckpt_path="best")
    assert tested.extra_seen is not None


def test_load_lightning_module_for_inference(tmp_path):
    ckpts = str(tmp_path / "ckpts")
    seed_all(0)
    module = TinyModule(lr=0.01, hidden=12)
    run = trainer(str(tmp_path), DCPCheckpointIO(), max_epochs=1, callbacks=[ModelCheckpoint(dirpath=ckpts)])
    run.fit(module, loader())
    path = run.checkpoint_callback.best_model_path

    with pytest.raises(IsADirectoryError):
        TinyModule.load_from_checkpoint(path)
    loaded = load_lightning_module(TinyModule, path)
    assert loaded.hparams.hidden == 12 and loaded.hparams.lr == 0.01
    for key, value in module.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value)


def test_remove_waits_for_the_write_of_the_same_path(tmp_path):
    plugin = DCPCheckpointIO(async_mode="thread")
    path = str(tmp_path / "ckpts" / "a.ckpt")
    plugin.save_checkpoint({"global_step": 1, "state_dict": {"w": torch.randn(64, 64)}}, path)
    plugin.remove_checkpoint(path)  # right away, while the write may still be in flight
    plugin.teardown()
    assert _entries(str(tmp_path / "ckpts")) == []


def test_saving_over_an_existing_path_replaces_it_only_when_committed(tmp_path):
    plugin = DCPCheckpointIO(async_mode="thread")
    path = str(tmp_path / "last.ckpt")
    plugin.save_checkpoint({"global_step": 1, "state_dict": {"w": torch.zeros(4)}}, path)
    plugin.wait()
    plugin.save_checkpoint({"global_step": 2, "state_dict": {"w": torch.ones(4)}}, path)
    assert DCPCheckpointIO().load_checkpoint(path)["global_step"] in (1, 2)  # always a whole checkpoint
    plugin.teardown()
    reloaded = DCPCheckpointIO().load_checkpoint(path)
    assert reloaded["global_step"] == 2 and torch.equal(reloaded["state_dict"]["w"], torch.ones(4))
    assert _entries(str(tmp_path)) == ["last.ckpt"]
