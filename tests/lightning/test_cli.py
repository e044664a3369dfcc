"""The plugin configured from a LightningCLI YAML file (trainer.plugins with class_path / init_args)."""

from __future__ import annotations

import pytest

pytest.importorskip("jsonargparse")

from lightning.pytorch.cli import LightningCLI  # noqa: E402

from dcp_plugin import CheckpointStorage  # noqa: E402
from dcp_plugin.lightning import DCPCheckpoint, DCPCheckpointIO  # noqa: E402
from tests.lightning.helpers import TinyModule, loader  # noqa: E402


class CLIModule(TinyModule):
    def train_dataloader(self):
        return loader()


CONFIG = """
seed_everything: 0
trainer:
  accelerator: cpu
  devices: 1
  max_epochs: {epochs}
  logger: false
  enable_progress_bar: false
  enable_model_summary: false
  default_root_dir: {root}
  plugins:
    - class_path: dcp_plugin.lightning.DCPCheckpointIO
      init_args:
        async_mode: thread
        thread_count: 1
        storage_options: {{}}
  callbacks:
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args:
        dirpath: {root}/ckpts
        save_last: true
model:
  lr: 0.02
"""


CALLBACK = """
    - class_path: dcp_plugin.lightning.DCPCheckpoint
      init_args:
        dirpath: {root}/dcp
        every_n_train_steps: 2
        signals: [SIGTERM, USR1, 12]
        remote: {root}/remote
        remote_storage_options: {{}}
        replicate_every_n_steps: 4
        remote_keep_last: 1
"""


def _run(tmp_path, epochs: int, *extra: str, config_text: str = CONFIG) -> LightningCLI:
    config = tmp_path / f"config{epochs}.yaml"
    config.write_text(config_text.format(root=tmp_path, epochs=epochs))
    return LightningCLI(
        CLIModule, args=["fit", "--config", str(config), *extra], save_config_kwargs={"overwrite": True}
    )


def test_plugin_from_yaml_trains_and_resumes(tmp_path):
    cli = _run(tmp_path, 1)
    plugin = cli.trainer.strategy.checkpoint_io
    assert isinstance(plugin, DCPCheckpointIO)
    assert plugin.config.async_mode == "thread" and plugin.config.thread_count == 1
    assert {info.name for info in CheckpointStorage(str(tmp_path / "ckpts")).list()} == {
        "epoch=0-step=4.ckpt",
        "last.ckpt",
    }

    resumed = _run(tmp_path, 2, "--ckpt_path", "last")
    assert resumed.trainer.global_step == 8
    assert resumed.model.extra_seen["steps"] == 4


def test_callback_from_yaml_with_signal_names(tmp_path):
    # every argument must be representable in YAML (the saved config.yaml included): signals as names/numbers
    start = CONFIG.index("    - class_path: lightning.pytorch.callbacks.ModelCheckpoint")
    cli = _run(tmp_path, 1, config_text=CONFIG[:start] + CALLBACK + "model:\n  lr: 0.02\n")
    callback = next(c for c in cli.trainer.callbacks if isinstance(c, DCPCheckpoint))
    assert [int(s) for s in callback.save_options.signals] == [15, 10, 12]
    assert {i.step for i in CheckpointStorage(str(tmp_path / "dcp")).list()} == {2, 4}
    saved_config = (tmp_path / "config.yaml").read_text()  # the config Lightning saved
    assert "SIGTERM" in saved_config and "replicate_every_n_steps: 4" in saved_config
    assert [i.step for i in CheckpointStorage(str(tmp_path / "remote")).list()] == [4]  # the remote tier
