"""Drop-in behaviour that Lightning's own code and tests rely on: loads and existence checks see saves in flight
(whichever instance writes), copies, switching from torch.save files, YAML configuration, conversion to one
``.ckpt`` file, and what is logged."""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import pickle
import shutil
import subprocess
import sys

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from dcp_plugin import CheckpointExistsError, CheckpointStorage
from dcp_plugin.lightning import DCPCheckpoint, DCPCheckpointIO
from tests.holds import hold_commits
from tests.lightning.helpers import TinyModule, loader, seed_all, trainer


@contextlib.contextmanager
def held_commits(monkeypatch, seconds: float = 0.5):
    yield hold_commits(monkeypatch, seconds)


def _state(step: int, value: float) -> dict:
    weights = {"w": torch.full((8,), value)}
    return {"global_step": step, "pytorch-lightning_version": pl.__version__, "state_dict": weights}


# -- item 1: a load from another instance waits for the save in flight ------------------------------------------
def test_another_plugin_loads_a_checkpoint_still_being_written(tmp_path, monkeypatch):
    path = str(tmp_path / "manual.ckpt")
    writer = DCPCheckpointIO(async_mode="thread")
    with held_commits(monkeypatch):
        writer.save_checkpoint(_state(3, 1.0), path)
        assert writer.in_flight is not None
        loaded = DCPCheckpointIO().load_checkpoint(path)  # a new instance, while the write is in flight
    assert loaded["global_step"] == 3 and torch.equal(loaded["state_dict"]["w"], torch.ones(8))
    writer.teardown()


def test_new_trainer_resumes_from_a_checkpoint_saved_right_before(tmp_path, monkeypatch):
    seed_all(0)
    first = trainer(str(tmp_path), DCPCheckpointIO(async_mode="thread"), max_epochs=1)
    first.fit(TinyModule(), loader())
    path = str(tmp_path / "manual.ckpt")
    with held_commits(monkeypatch):
        first.save_checkpoint(path)
        module = TinyModule()
        second = trainer(str(tmp_path), DCPCheckpointIO(async_mode="thread"), max_epochs=2)
        second.fit(module, loader(), ckpt_path=path)
    assert second.global_step == 8 and module.extra_seen["steps"] == 4


# -- item 2: ModelCheckpoint's versioning sees saves in flight ---------------------------------------------------
def test_versioning_counts_a_save_in_flight_as_existing(tmp_path, monkeypatch):
    ckpts = tmp_path / "ckpts"
    callback = ModelCheckpoint(
        dirpath=str(ckpts), filename="fixed", monitor="train_loss", save_top_k=-1, every_n_epochs=1
    )
    seed_all(0)
    with held_commits(monkeypatch, seconds=0.3):
        run = trainer(str(tmp_path), DCPCheckpointIO(async_mode="thread"), max_epochs=4, callbacks=[callback])
        run.fit(TinyModule(), loader())
    names = sorted(os.listdir(ckpts))
    assert names == ["fixed-v1.ckpt", "fixed-v2.ckpt", "fixed-v3.ckpt", "fixed.ckpt"]
    steps = sorted(DCPCheckpointIO().load_checkpoint(str(ckpts / n))["global_step"] for n in names)
    assert steps == [4, 8, 12, 16]  # nothing replaced


def test_a_second_instance_saving_the_same_path_waits_for_the_first(tmp_path, monkeypatch):
    path = str(tmp_path / "a.ckpt")
    first, second = DCPCheckpointIO(async_mode="thread"), DCPCheckpointIO(async_mode="thread")
    with held_commits(monkeypatch):
        first.save_checkpoint(_state(1, 1.0), path)
        second.save_checkpoint(_state(2, 2.0), path)  # after the first committed: replaces it, as asked
    first.teardown()
    second.teardown()
    assert DCPCheckpointIO().load_checkpoint(path)["global_step"] == 2
    assert sorted(os.listdir(tmp_path)) == ["a.ckpt"]


def test_a_checkpoint_committed_meanwhile_by_another_writer_is_not_replaced(tmp_path, monkeypatch):
    other = str(tmp_path / "other" / "a.ckpt")
    DCPCheckpointIO(async_mode="sync").save_checkpoint(_state(7, 7.0), other)
    path = str(tmp_path / "a.ckpt")
    plugin = DCPCheckpointIO(async_mode="thread")
    with held_commits(monkeypatch) as reached:
        plugin.save_checkpoint(_state(1, 1.0), path)  # nothing at the path: nothing to replace
        assert reached.wait(10)
        shutil.copytree(other, path)  # another process commits the same name meanwhile
        with pytest.raises(CheckpointExistsError):
            plugin.wait()
    plugin.teardown()
    assert DCPCheckpointIO().load_checkpoint(path)["global_step"] == 7


# -- item 4: copies and pickles after saving ---------------------------------------------------------------------
class Copier(pl.Callback):
    def __init__(self) -> None:
        self.copies: list = []

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.copies.append(copy.deepcopy([c for c in trainer.callbacks if c is not self]))
        self.copies.append(pickle.loads(pickle.dumps(trainer.strategy.checkpoint_io)))


@pytest.mark.parametrize("async_staging", [False, True])
def test_plugin_and_callback_copy_and_pickle_after_saving(tmp_path, async_staging):
    plugin = DCPCheckpointIO(async_mode="thread", async_staging=async_staging)
    callback = DCPCheckpoint(dirpath=str(tmp_path / "dcp"), every_n_train_steps=1)
    copier = Copier()
    run = trainer(
        str(tmp_path),
        plugin,
        max_epochs=1,
        callbacks=[callback, ModelCheckpoint(dirpath=str(tmp_path / "mc"), every_n_train_steps=1), copier],
    )
    run.fit(TinyModule(), loader())
    callbacks, plugin_copy = copier.copies
    callback_copy = next(c for c in callbacks if isinstance(c, DCPCheckpoint))
    assert callback_copy.run_id == callback.run_id and callback_copy._plugin is None
    assert plugin_copy.config == plugin.config and plugin_copy.in_flight is None
    plugin_copy.save_checkpoint(_state(9, 3.0), str(tmp_path / "copy.ckpt"))  # the copy works on its own
    plugin_copy.teardown()
    assert DCPCheckpointIO().load_checkpoint(str(tmp_path / "copy.ckpt"))["global_step"] == 9
    copy.deepcopy(callback)
    pickle.loads(pickle.dumps(callback))


# -- item 6: save_last="link" / True while saves are in flight, repeatedly --------------------------------------------
class LoadLast(pl.Callback):
    """After every step (checkpoint callbacks run before it saves, Lightning orders them last), load last.ckpt
    with a separate plugin: it must always be a whole checkpoint, waiting for a write in flight if need be."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.steps: list[int] = []

    def on_train_batch_end(self, trainer: pl.Trainer, *args: object) -> None:
        if os.path.lexists(self.path):
            self.steps.append(DCPCheckpointIO().load_checkpoint(self.path)["global_step"])


@pytest.mark.parametrize("repeat", range(3))
@pytest.mark.parametrize("save_last", ["link", True])
def test_save_last_while_saves_are_in_flight(tmp_path, monkeypatch, save_last, repeat):
    ckpts = tmp_path / "ckpts"
    last = str(ckpts / "last.ckpt")
    callback = ModelCheckpoint(
        dirpath=str(ckpts), monitor="train_loss", save_top_k=2, every_n_train_steps=1, save_last=save_last
    )
    probe = LoadLast(last)
    seed_all(repeat)
    with held_commits(monkeypatch, seconds=0.05 * (repeat + 1)):
        run = trainer(str(tmp_path), DCPCheckpointIO(async_mode="thread"), max_epochs=2, callbacks=[callback, probe])
        run.fit(TinyModule(), loader())
    expected = sorted([os.path.basename(p) for p in callback.best_k_models] + ["last.ckpt"])
    assert sorted(os.listdir(ckpts)) == expected  # no leftovers, no pruned checkpoint back, no -vN names
    assert len(probe.steps) >= 6 and probe.steps == sorted(probe.steps)  # loaded whole, every time
    if save_last == "link":
        assert os.path.islink(last)
        assert os.path.realpath(last) == os.path.realpath(callback._last_checkpoint_saved)
    for name in expected:  # every target intact, the link's included
        DCPCheckpointIO().load_checkpoint(str(ckpts / name))


def test_removing_or_replacing_a_link_leaves_its_target(tmp_path):
    plugin = DCPCheckpointIO(async_mode="thread")
    target, link = tmp_path / "epoch=0.ckpt", tmp_path / "last.ckpt"
    plugin.save_checkpoint(_state(4, 4.0), str(target))
    os.symlink(target.name, link)  # while the target is still being written, as ModelCheckpoint does
    assert DCPCheckpointIO().load_checkpoint(str(link))["global_step"] == 4
    plugin.save_checkpoint(_state(8, 8.0), str(link))  # save_last switched from "link" to True: the link goes
    plugin.wait()
    assert link.is_dir() and not link.is_symlink()
    assert DCPCheckpointIO().load_checkpoint(str(target))["global_step"] == 4
    plugin.remove_checkpoint(str(link))
    os.symlink(target.name, link)
    plugin.remove_checkpoint(str(link))
    assert not os.path.lexists(link) and DCPCheckpointIO().load_checkpoint(str(target))["global_step"] == 4
    plugin.teardown()


# -- item 7: a torch.save last.ckpt of the run being switched is replaced -----------------------------------------
@pytest.mark.parametrize("save_last", [True, "link"])
def test_switching_a_run_replaces_its_torch_save_last_ckpt(tmp_path, save_last):
    ckpts = str(tmp_path / "ckpts")
    seed_all(0)
    old = trainer(str(tmp_path), None, max_epochs=1, callbacks=[ModelCheckpoint(dirpath=ckpts, save_last=True)])
    old.fit(TinyModule(), loader())
    assert os.path.isfile(os.path.join(ckpts, "last.ckpt"))

    callback = ModelCheckpoint(dirpath=ckpts, save_last=save_last)
    new = trainer(str(tmp_path), DCPCheckpointIO(async_mode="thread"), max_epochs=3, callbacks=[callback])
    new.fit(TinyModule(), loader(), ckpt_path="last")
    assert new.global_step == 12
    last = os.path.join(ckpts, "last.ckpt")
    assert os.path.isdir(last)
    assert DCPCheckpointIO().load_checkpoint(last)["global_step"] == 12
    assert not os.path.exists(os.path.join(ckpts, ".dcp-plugin"))


def test_a_file_is_kept_until_the_checkpoint_replacing_it_commits(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    torch.save(_state(1, 0.0), path)
    plugin = DCPCheckpointIO(async_mode="thread")
    with held_commits(monkeypatch) as reached:
        plugin.save_checkpoint(_state(2, 2.0), str(path))
        reached.wait(10)
        assert path.is_file()  # still the old file while the new checkpoint is written
        plugin.wait()
    assert path.is_dir() and DCPCheckpointIO().load_checkpoint(str(path))["global_step"] == 2
    plugin.teardown()


# -- item 8: DCPCheckpoint's arguments in YAML forms (the LightningCLI test is in test_cli.py) ---------------
def test_signal_and_dtype_values_accepted_in_every_form():
    import signal

    callback = DCPCheckpoint(signals=[signal.SIGTERM, "usr1", 12, "SIGINT"], export_final=True, export_dtype="bfloat16")
    assert callback.save_options.signals == (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGINT)
    assert callback.export_dtype == torch.bfloat16
    with pytest.raises(ValueError, match="Unknown signal"):
        DCPCheckpoint(signals=["SIGNOPE"])


# -- item 13: one .ckpt file for load_from_checkpoint -----------------------------------------------------------------
def test_convert_to_a_lightning_file(tmp_path):
    from dcp_plugin.lightning import to_lightning_file

    ckpts = str(tmp_path / "ckpts")
    seed_all(0)
    module = TinyModule(lr=0.01, hidden=12)
    run = trainer(str(tmp_path), DCPCheckpointIO(), max_epochs=1, callbacks=[ModelCheckpoint(dirpath=ckpts)])
    run.fit(module, loader())
    out = str(tmp_path / "model.ckpt")
    assert to_lightning_file(run.checkpoint_callback.best_model_path, out) == out

    loaded = TinyModule.load_from_checkpoint(out)
    assert loaded.hparams.hidden == 12
    for key, value in module.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value)
    assert torch.load(out, weights_only=True)["global_step"] == 4
    resumed = TinyModule(lr=0.01, hidden=12)
    again = trainer(str(tmp_path / "plain"), None, max_epochs=2)  # Lightning's default plugin resumes from it
    again.fit(resumed, loader(), ckpt_path=out)
    assert again.global_step == 8 and resumed.extra_seen["steps"] == 4

    cli_out = str(tmp_path / "cli.ckpt")
    from dcp_plugin.cli import main

    assert main(["convert-lightning", run.checkpoint_callback.best_model_path, cli_out]) == 0
    assert torch.load(cli_out, weights_only=True)["global_step"] == 4


# -- item 14: quiet and informative ------------------------------------------------------------------------------
def _ours(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith(("Sav", "Loaded checkpoint"))]


def test_one_info_line_per_save_and_per_load_through_lightning_logging(tmp_path, caplog, monkeypatch):
    path = str(tmp_path / "a.ckpt")
    plugin = DCPCheckpointIO(async_mode="thread")
    monkeypatch.setattr(logging.getLogger("dcp_plugin"), "level", logging.NOTSET)  # as in a fresh process
    with caplog.at_level(logging.INFO):
        plugin.save_checkpoint(_state(5, 1.0), path)
        plugin.load_checkpoint(path)
        lines = _ours(caplog)
        assert {r.name for r in caplog.records if r.getMessage() in lines} == {"lightning.pytorch.utilities.rank_zero"}
        monkeypatch.setattr(logging.getLogger("dcp_plugin"), "level", logging.WARNING)  # DCP_PLUGIN_LOG_LEVEL
        caplog.clear()
        plugin.save_checkpoint(_state(6, 1.0), path)
        plugin.load_checkpoint(path)
        assert _ours(caplog) == []
    plugin.teardown()
    assert len(lines) == 2, lines
    assert lines[0].startswith(f"Saving checkpoint {path} (step 5)") and "waited" in lines[0]
    assert lines[1].startswith(f"Loaded checkpoint {path} (step 5) in ")


VISIBLE_SCRIPT = """
import os, sys
from lightning.pytorch.callbacks import ModelCheckpoint
from dcp_plugin.lightning import DCPCheckpointIO
from tests.lightning.helpers import TinyModule, loader, trainer

if __name__ == "__main__":  # no logging configured, as in a user's first script
    root = sys.argv[1]
    for epochs in (1, 2):
        callback = ModelCheckpoint(dirpath=os.path.join(root, "ckpts"), every_n_train_steps=2, save_last=True)
        run = trainer(root, DCPCheckpointIO(), max_epochs=epochs, callbacks=[callback])
        run.fit(TinyModule(), loader(), ckpt_path="last")
"""


def test_saves_and_loads_show_by_default_in_a_lightning_run(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(VISIBLE_SCRIPT)
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    env.pop("DCP_PLUGIN_LOG_LEVEL", None)
    result = subprocess.run(
        [sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, timeout=300, env=env
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith(("Saving checkpoint", "Loaded check"))]
    # ModelCheckpoint keeps the newest step and last.ckpt: two saves every 2 steps; the second fit resumes from last
    seen = [(line.split(" ")[0], line.split("(step ")[1].split(")")[0]) for line in lines]
    assert (
        seen
        == [("Saving", "2")] * 2
        + [("Saving", "4")] * 2
        + [("Loaded", "4")]
        + [("Saving", "6")] * 2
        + [("Saving", "8")] * 2
    ), result.stderr[-3000:]
    assert f"Loaded checkpoint {tmp_path / 'ckpts' / 'last.ckpt'} (step 4)" in result.stderr
    assert all("training waited" in line for line in lines if line.startswith("Saving"))


def test_missing_main_guard_is_reported_at_construction(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(
        "from dcp_plugin.lightning import DCPCheckpointIO\n"
        "DCPCheckpointIO(async_mode='process')\n"
        "print('constructed')\n"
    )
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode != 0 and "constructed" not in result.stdout
    assert 'if __name__ == "__main__":' in result.stderr


DAEMON_SCRIPT = """
import logging, sys
import torch
from dcp_plugin.lightning import DCPCheckpointIO

if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    plugin = DCPCheckpointIO(async_mode="process")
    plugin.engine().warm_up()
    for step in (1, 2):
        plugin.save_checkpoint({{"global_step": step, "state_dict": {{"w": torch.ones(4)}}}}, {path!r} + str(step))
    plugin.teardown()
    print(DCPCheckpointIO().load_checkpoint({path!r} + "2")["global_step"])
"""


@pytest.mark.slow
def test_process_mode_daemon_is_quiet(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(DAEMON_SCRIPT.format(path=str(tmp_path / "ckpt")))
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("2")
    assert " - INFO - " not in result.stderr, result.stderr


@pytest.mark.slow
@pytest.mark.parametrize("callback_kind", ["DCPCheckpoint", "ModelCheckpoint"])
def test_the_writer_daemon_starts_at_setup(tmp_path, callback_kind):
    from torch.distributed.checkpoint import _async_process_executor as executor

    from dcp_plugin.engine import daemon

    seen = []

    class Probe(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            seen.append(daemon._starting is not None or executor._CHECKPOINT_PROCESS is not None)

    if callback_kind == "DCPCheckpoint":
        callback = DCPCheckpoint(dirpath=str(tmp_path / "dcp"), every_n_train_steps=2)
    else:
        callback = ModelCheckpoint(dirpath=str(tmp_path / "dcp"), every_n_train_steps=2, save_top_k=-1)
    run = trainer(str(tmp_path), DCPCheckpointIO(async_mode="process"), max_epochs=1, callbacks=[Probe(), callback])
    run.fit(TinyModule(), loader())
    assert seen == [True]
    assert {i.step for i in CheckpointStorage(str(tmp_path / "dcp")).list()} == {2, 4}


# -- item 15: ckpt_path="last" on remote storage ------------------------------------------------------------------
def test_remote_last_is_documented_and_auto_resume_finds_the_latest(tmp_path, memory_url):
    with open(os.path.join(os.path.dirname(__file__), "..", "..", "docs", "lightning.md")) as handle:
        docs = handle.read()
    assert 'ckpt_path="last"` on remote storage' in docs and "auto_resume" in docs

    def run(epochs: int, **fit: object) -> tuple[pl.Trainer, TinyModule]:
        callback = DCPCheckpoint(dirpath=memory_url, every_n_train_steps=2)
        module = TinyModule()
        trained = trainer(str(tmp_path), DCPCheckpointIO(async_mode="thread"), max_epochs=epochs, callbacks=[callback])
        trained.fit(module, loader(), **fit)
        return trained, module

    run(1)
    resumed, module = run(2, ckpt_path="last")  # Lightning finds no ModelCheckpoint "last": the callback resumes
    assert resumed.global_step == 8 and module.extra_seen["steps"] == 4


# -- Hydra / OmegaConf hyper-parameters: Lightning also stores their class ("hparams_type") ------------------------
class _ConfiguredModule(pl.LightningModule):
    """A module configured as Hydra configures one: ``save_hyperparameters(cfg)`` with a ``DictConfig``."""

    def __init__(self, cfg) -> None:
        super().__init__()
        self.save_hyperparameters(cfg)
        self.net = torch.nn.Sequential(torch.nn.Linear(8, cfg.model.hidden), torch.nn.Linear(cfg.model.hidden, 1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)


def test_omegaconf_hyper_parameters_save_with_default_options_and_load_back(tmp_path):
    omegaconf = pytest.importorskip("omegaconf")
    from dcp_plugin.lightning import load_lightning_module, to_lightning_file

    cfg = omegaconf.OmegaConf.create({"lr": 0.01, "model": {"hidden": 12, "width": "${model.hidden}"}})
    seed_all(0)
    module = _ConfiguredModule(cfg)
    run = trainer(str(tmp_path), DCPCheckpointIO(), max_epochs=1, callbacks=[ModelCheckpoint(dirpath=str(tmp_path))])
    run.fit(module, loader())
    path = run.checkpoint_callback.best_model_path

    assert DCPCheckpointIO().load_checkpoint(path)["hparams_type"] is omegaconf.DictConfig
    for loaded in (
        load_lightning_module(_ConfiguredModule, path),
        _ConfiguredModule.load_from_checkpoint(to_lightning_file(path, str(tmp_path / "one.ckpt")), weights_only=False),
    ):
        assert isinstance(loaded.hparams, omegaconf.DictConfig) and loaded.hparams == cfg
        assert loaded.hparams.model.width == 12  # the interpolation survived
        for key, value in module.state_dict().items():
            assert torch.equal(loaded.state_dict()[key], value)
