"""The plugin's threads live no longer than its work: saves inside ``fit`` are written in the background, saves
outside a running stage are written before ``save_checkpoint`` returns, and a plugin that is garbage-collected
first lets its save in flight commit."""

from __future__ import annotations

import gc
import os
import threading
import warnings

import lightning.pytorch as pl
import pytest
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import ModelCheckpoint

from dcp_plugin import CheckpointStorage
from dcp_plugin.lightning import DCPCheckpointIO
from tests.holds import hold_commits
from tests.lightning.helpers import TinyModule, loader, trainer


class _SaveInFit(pl.Callback):
    """Saves once during ``fit`` and notes whether that save was still in flight when the call returned."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.in_flight_after_call: bool | None = None

    def on_train_batch_end(self, trainer: pl.Trainer, *args: object) -> None:
        if trainer.global_step == 2 and self.in_flight_after_call is None:
            trainer.save_checkpoint(self.path)
            self.in_flight_after_call = trainer.strategy.checkpoint_io.in_flight is not None


@pytest.mark.parametrize("enable_checkpointing", [True, False], ids=["with_callback", "without_callback"])
def test_saves_outside_fit_leave_no_thread_and_saves_in_fit_stay_in_the_background(
    tmp_path, monkeypatch, enable_checkpointing
):
    """With or without a checkpoint callback (the plugin learns the trainer from Trainer.save_checkpoint)."""
    hold_commits(monkeypatch, 0.3)  # every commit waits: a background save is surely still in flight
    before = set(threading.enumerate())
    plugin = DCPCheckpointIO(async_mode="thread")
    in_fit = _SaveInFit(str(tmp_path / "in_fit.ckpt"))
    run = trainer(str(tmp_path), plugin, max_epochs=1, callbacks=[in_fit], enable_checkpointing=enable_checkpointing)
    module = TinyModule()
    run.fit(module, loader())
    assert in_fit.in_flight_after_call is True  # the async benefit inside fit is kept

    run.save_checkpoint(str(tmp_path / "after_fit.ckpt"))
    # a ModelCheckpoint that fit never set up, driven by hand after fit (as Lightning's own tests do)
    standalone = ModelCheckpoint(dirpath=str(tmp_path / "by_hand"), save_on_train_epoch_end=True, save_last=True)
    standalone.on_train_epoch_end(run, module)
    run.validate(module, loader())
    run.save_checkpoint(str(tmp_path / "after_validate.ckpt"))

    assert plugin.in_flight is None
    assert set(threading.enumerate()) - before == set()  # nothing left running, without waiting for anything
    storage = CheckpointStorage(str(tmp_path))
    assert storage.is_committed("after_fit.ckpt") and storage.is_committed("after_validate.ckpt")
    assert sorted(os.listdir(tmp_path / "by_hand")) == ["epoch=1-step=4.ckpt", "last.ckpt"]
    assert DCPCheckpointIO().load_checkpoint(str(tmp_path / "after_validate.ckpt"))["global_step"] == run.global_step
    assert DCPCheckpointIO().load_checkpoint(in_fit.path)["global_step"] == 2


def test_a_garbage_collected_plugin_commits_its_save_in_flight(tmp_path, monkeypatch):
    hold_commits(monkeypatch, 0.3)
    plugin = DCPCheckpointIO(async_mode="thread")
    plugin.save_checkpoint({"global_step": 5, "state_dict": {"w": torch.ones(4)}}, str(tmp_path / "a.ckpt"))
    assert plugin.in_flight is not None
    del plugin
    gc.collect()
    assert CheckpointStorage(str(tmp_path)).is_committed("a.ckpt")  # committed before the plugin was gone
    assert DCPCheckpointIO().load_checkpoint(str(tmp_path / "a.ckpt"))["global_step"] == 5


class _LooksAtDistributed(TinyModule):
    """User code that behaves differently in a distributed run: it notes ``dist.is_initialized()`` in its hooks and
    logs an epoch-level metric (Lightning warns about ``sync_dist`` for those when a process group exists)."""

    def __init__(self) -> None:
        super().__init__()
        self.initialized: list[tuple[str, bool]] = []

    def _note(self, hook: str) -> None:
        self.initialized.append((hook, dist.is_available() and dist.is_initialized()))

    def on_train_start(self) -> None:
        self._note("on_train_start")

    def training_step(self, batch, batch_idx):
        self._note("training_step")
        loss = super().training_step(batch, batch_idx)
        self.log("epoch_loss", loss, on_step=False, on_epoch=True)
        return loss

    def on_save_checkpoint(self, checkpoint) -> None:
        super().on_save_checkpoint(checkpoint)
        self._note("on_save_checkpoint")

    def on_train_epoch_end(self) -> None:
        self._note("on_train_epoch_end")

    def on_train_end(self) -> None:
        self._note("on_train_end")


@pytest.mark.slow
def test_process_mode_leaves_a_single_device_run_without_torch_distributed(tmp_path):
    """Process mode starts a writer daemon with its own process group; the training process must look as it would
    without dcp-plugin: no default process group in any user hook, no sync_dist warning."""
    module = _LooksAtDistributed()
    callback = ModelCheckpoint(dirpath=str(tmp_path / "ckpts"), every_n_train_steps=2, save_top_k=-1)
    run = trainer(str(tmp_path), DCPCheckpointIO(async_mode="process"), max_epochs=2, callbacks=[callback])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run.fit(module, loader())
    assert {hook for hook, _ in module.initialized} == {
        "on_train_start",
        "training_step",
        "on_save_checkpoint",
        "on_train_epoch_end",
        "on_train_end",
    }
    assert [entry for entry in module.initialized if entry[1]] == []
    assert not dist.is_initialized()
    assert [str(w.message) for w in caught if "sync_dist" in str(w.message)] == []
    assert sorted(os.listdir(tmp_path / "ckpts")) == [f"epoch={s // 5}-step={s}.ckpt" for s in (2, 4, 6, 8)]
    assert DCPCheckpointIO().load_checkpoint(str(tmp_path / "ckpts" / "epoch=1-step=8.ckpt"))["global_step"] == 8
