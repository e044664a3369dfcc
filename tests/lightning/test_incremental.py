"""Lightning saves through ``DCPCheckpointIO`` are incremental: a LoRA-style module's frozen base is written once.

A real Trainer fits a LightningModule whose frozen base holds ~95 % of the bytes, with ``ModelCheckpoint`` saving
every two steps; bytes written are the sizes of a checkpoint's own files and of the shared files it is the first
to refer to.
"""

from __future__ import annotations

import os

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import BaseFinetuning, Callback, ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from dcp_plugin.lightning import DCPCheckpoint, DCPCheckpointIO
from dcp_plugin.storage import CheckpointStorage
from tests.lightning.helpers import trainer as make_trainer
from tests.models import assert_same, make_lora

WIDTH = 384


class LoRAModule(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = make_lora(0, width=WIDTH)

    def training_step(self, batch, batch_idx):
        (x,) = batch
        return self.net(x).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-2)


class Saved(Callback):
    """What each checkpoint held when Lightning saved it, and an optional change to the base between the two saves."""

    def __init__(self, change=None) -> None:
        self.weights: dict[int, dict[str, torch.Tensor]] = {}
        self.change = change

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        self.weights[checkpoint["global_step"]] = {k: v.detach().clone() for k, v in checkpoint["state_dict"].items()}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.change is not None and trainer.global_step == 3:  # after the step-2 save
            self.change(trainer, pl_module.net[0].base)


def data() -> DataLoader:
    torch.manual_seed(1)
    return DataLoader(  # two steps an epoch: the step-2 checkpoint ends an epoch, so resuming repeats the run
        TensorDataset(torch.randn(8, WIDTH)), batch_size=4, shuffle=False
    )


def fit(root: str, plugin, *, steps: int = 4, change=None, ckpt_path=None) -> tuple[pl.Trainer, Saved]:
    saved = Saved(change)
    checkpoint = ModelCheckpoint(dirpath=os.path.join(root, "ckpts"), every_n_train_steps=2, save_top_k=-1)
    trainer = make_trainer(root, plugin, max_epochs=2, max_steps=steps, callbacks=[checkpoint, saved])
    trainer.fit(LoRAModule(), train_dataloaders=data(), ckpt_path=ckpt_path)
    return trainer, saved


def written(dirpath: str, names: tuple[str, ...] = ("epoch=0-step=2.ckpt", "epoch=1-step=4.ckpt")) -> list[int]:
    """Bytes each checkpoint added, in step order: its own files and the shared files no earlier one refers to."""
    storage = CheckpointStorage(dirpath)
    sizes, seen = [], set()
    for name in names:
        blobs = storage.read_manifest(name).get("blobs", {})
        own = sum(  # the directory's links to shared files are counted once, below
            os.path.getsize(os.path.join(folder, f))
            for folder, _, files in os.walk(os.path.join(dirpath, name))
            for f in files
            if f not in blobs
        )
        sizes.append(own + sum(record["size"] for blob, record in blobs.items() if blob not in seen))
        seen |= set(blobs)
    return sizes


@pytest.mark.parametrize("mode", ["sync", "thread"])
def test_second_lightning_checkpoint_writes_a_fraction_and_every_checkpoint_loads_exactly(tmp_path, mode):
    plugin = DCPCheckpointIO(mode)
    trainer, saved = fit(str(tmp_path / "dcp"), plugin)
    first, second = written(trainer.checkpoint_callback.dirpath)
    assert second <= 0.15 * first

    checkpoint = trainer.checkpoint_callback
    names = sorted(n for n in os.listdir(checkpoint.dirpath) if not n.startswith("."))  # .dcp-plugin: shared files
    assert names == ["epoch=0-step=2.ckpt", "epoch=1-step=4.ckpt"]
    for step in (2, 4):
        loaded = plugin.load_checkpoint(os.path.join(checkpoint.dirpath, f"epoch={step // 4}-step={step}.ckpt"))
        assert_same(loaded["state_dict"], saved.weights[step])

    # Lightning's own bookkeeping is the same as with its default plugin.
    stock, _ = fit(str(tmp_path / "stock"), None)
    assert names == sorted(os.listdir(stock.checkpoint_callback.dirpath))
    for attribute in ("best_model_path", "last_model_path", "kth_best_model_path"):
        ours, theirs = getattr(checkpoint, attribute), getattr(stock.checkpoint_callback, attribute)
        assert os.path.basename(ours) == os.path.basename(theirs)
    assert sorted(map(os.path.basename, checkpoint.best_k_models)) == sorted(
        map(os.path.basename, stock.checkpoint_callback.best_k_models)
    )
    assert_same(trainer.lightning_module.state_dict(), stock.lightning_module.state_dict())

    # Resuming from the incremental step-2 checkpoint reaches the uninterrupted run's weights.
    resumed_plugin = DCPCheckpointIO(mode)
    first_path = os.path.join(checkpoint.dirpath, "epoch=0-step=2.ckpt")
    resumed, _ = fit(str(tmp_path / "resumed"), resumed_plugin, ckpt_path=first_path)
    resumed_plugin.wait()
    assert_same(resumed.lightning_module.state_dict(), trainer.lightning_module.state_dict())
    plugin.teardown()
    resumed_plugin.teardown()


def _edit_in_place(trainer: pl.Trainer, base: torch.nn.Module) -> None:
    with torch.no_grad():
        base.weight.add_(1.0)


def _unfreeze(trainer: pl.Trainer, base: torch.nn.Module) -> None:
    BaseFinetuning.unfreeze_and_add_param_group(base, trainer.optimizers[0], lr=1e-2)  # trained from step 4


@pytest.mark.parametrize("change", [_edit_in_place, _unfreeze], ids=["edited", "unfrozen"])
def test_a_changed_or_unfrozen_base_is_written_again(tmp_path, change):
    plugin = DCPCheckpointIO("sync")
    trainer, saved = fit(str(tmp_path), plugin, change=change)
    first, second = written(trainer.checkpoint_callback.dirpath)
    assert second > 0.15 * first
    assert second >= WIDTH * WIDTH * 4  # the first base layer's weight is written again
    loaded = plugin.load_checkpoint(os.path.join(trainer.checkpoint_callback.dirpath, "epoch=1-step=4.ckpt"))
    assert_same(loaded["state_dict"], saved.weights[4])
    plugin.teardown()


def test_saves_of_the_dcp_checkpoint_callback_are_incremental(tmp_path):
    plugin = DCPCheckpointIO("thread")
    dirpath = str(tmp_path / "ckpts")
    callback = DCPCheckpoint(dirpath, every_n_train_steps=2, save_last=False, auto_resume=False)
    saved = Saved()
    make_trainer(str(tmp_path), plugin, max_epochs=2, max_steps=4, callbacks=[callback, saved]).fit(
        LoRAModule(), train_dataloaders=data()
    )
    infos = sorted(CheckpointStorage(dirpath).list(), key=lambda info: info.manifest["step"])
    assert [info.manifest["step"] for info in infos] == [2, 4]
    first, second = written(dirpath, tuple(info.name for info in infos))
    assert second <= 0.15 * first
    for info in infos:
        loaded = plugin.load_checkpoint(os.path.join(dirpath, info.name))
        assert_same(loaded["state_dict"], saved.weights[info.manifest["step"]])
    plugin.teardown()
