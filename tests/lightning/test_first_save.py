"""A Lightning run gets its first save ready ahead of time: after the first optimizer step the plugin's staging
buffers are prepared in the background, and what is saved later is still the state at save time."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from dcp_plugin.lightning import DCPCheckpointIO
from tests.lightning.helpers import TinyModule, loader, seed_all, trainer


class _PreparedProbe(pl.Callback):
    """Records, after the first training batch, whether the plugin still needs its buffers prepared."""

    def __init__(self, plugin: DCPCheckpointIO) -> None:
        self.plugin = plugin
        self.needs_prepare: list[bool] = []

    def on_train_batch_end(self, trainer: pl.Trainer, *args: object) -> None:
        if trainer.global_step == 1:
            self.needs_prepare.append(self.plugin.engine().needs_prepare)


def test_fit_prepares_the_staging_buffers_after_the_first_step_and_saves_the_state_at_save_time(tmp_path):
    seed_all(0)
    plugin = DCPCheckpointIO(async_mode="thread")
    probe = _PreparedProbe(plugin)
    checkpoint = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), filename="last-epoch", every_n_epochs=1)
    module = TinyModule()
    run = trainer(str(tmp_path), plugin, max_epochs=1, callbacks=[checkpoint, probe], limit_val_batches=0)
    run.fit(module, loader())
    assert probe.needs_prepare == [False]  # prepared after step 1, before any save
    expected = {key: value.detach().clone() for key, value in module.state_dict().items()}
    loaded = DCPCheckpointIO().load_checkpoint(checkpoint.best_model_path or checkpoint.last_model_path)
    assert set(loaded["state_dict"]) == set(expected)
    for key, value in expected.items():
        assert torch.equal(loaded["state_dict"][key], value), key
