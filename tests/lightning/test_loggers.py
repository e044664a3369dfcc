"""Loggers that upload models (``log_model``) get the checkpoint directories: MLflow with a real file store, as it
gets the files of Lightning's default plugin; loggers that cannot be served say so once at setup."""

from __future__ import annotations

import os

import lightning.pytorch as pl
import pytest
import yaml
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from dcp_plugin.lightning import DCPCheckpointIO
from tests.lightning.helpers import TinyModule, loader, seed_all

pytest.importorskip("mlflow")
from lightning.pytorch.loggers import MLFlowLogger  # noqa: E402


def _trainer(root, plugin, logger, callbacks=()):
    return pl.Trainer(
        default_root_dir=str(root),
        accelerator="cpu",
        max_epochs=2,
        plugins=[plugin] if plugin is not None else None,
        callbacks=list(callbacks),
        logger=logger,
        enable_progress_bar=False,
        enable_model_summary=False,
    )


def _fit_with_mlflow(root, log_model, plugin):
    seed_all(0)
    logger = MLFlowLogger(tracking_uri=f"file:{root}/mlruns", log_model=log_model)
    checkpoints = ModelCheckpoint(
        dirpath=str(root / "ckpts"), monitor="train_loss", save_top_k=1, every_n_train_steps=2
    )
    run = _trainer(root, plugin, logger, [checkpoints])
    run.fit(TinyModule(), loader())
    artifacts = os.path.join(logger.save_dir, logger.experiment_id, logger.run_id, "artifacts")
    return run, checkpoints, artifacts


@pytest.mark.parametrize("log_model", [True, "all"])
def test_mlflow_logs_every_checkpoint_the_default_plugin_logs(tmp_path, monkeypatch, log_model):
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    _, _, default_artifacts = _fit_with_mlflow(tmp_path / "default", log_model, None)
    run, checkpoints, artifacts = _fit_with_mlflow(tmp_path / "dcp", log_model, DCPCheckpointIO(async_mode="thread"))

    logged = sorted(os.listdir(artifacts))
    assert logged == sorted(os.listdir(default_artifacts))  # the same checkpoints, under the same names
    if log_model is True:
        assert len(logged) == 1  # save_top_k=1: the best one, at the end
    else:
        assert len(logged) > 1  # every checkpoint as it was saved, also those save_top_k removed later
    best = os.path.basename(checkpoints.best_model_path)
    for stem in logged:
        entry = os.path.join(artifacts, stem)
        assert sorted(os.listdir(entry)) == sorted(["aliases.txt", "metadata.yaml", f"{stem}.ckpt"])
        with open(os.path.join(entry, "metadata.yaml")) as handle:
            assert yaml.safe_load(handle)["original_filename"] == f"{stem}.ckpt"
        # what a user needs: the logged artifact is a checkpoint that loads
        loaded = DCPCheckpointIO().load_checkpoint(os.path.join(entry, f"{stem}.ckpt"))
        assert loaded["global_step"] == int(stem.split("step=")[1])
        assert set(loaded["state_dict"]) == set(run.lightning_module.state_dict())
    with open(os.path.join(artifacts, os.path.splitext(best)[0], "aliases.txt")) as handle:
        assert "best" in handle.read()


def test_a_logger_that_cannot_be_served_warns_once_at_setup(tmp_path):
    class ModelLogger(CSVLogger):  # stands for WandbLogger/LitLogger(log_model=True): uploads files only
        _log_model = True

    run = _trainer(tmp_path, DCPCheckpointIO(), ModelLogger(str(tmp_path)))
    with pytest.warns(UserWarning, match="ModelLogger.*will upload no checkpoint with DCPCheckpointIO") as caught:
        run.fit(TinyModule(), loader())
    assert sum("will upload no checkpoint" in str(w.message) for w in caught) == 1
