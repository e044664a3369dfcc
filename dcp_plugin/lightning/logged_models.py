"""Checkpoints for the trainer's loggers: what ``log_model`` uploads when checkpoints are directories.

``MLFlowLogger``, ``WandbLogger`` and ``LitLogger`` with ``log_model`` find the checkpoints to upload through
Lightning's scan of ``ModelCheckpoint``'s paths (``lightning.pytorch.loggers.utilities._scan_checkpoints``), which
keeps regular files only; a dcp-plugin checkpoint is a directory, so on their own they upload nothing.

For ``MLFlowLogger`` the plugin uploads each committed checkpoint directory itself, through MLflow's public
client, as the logger would upload a file: under the artifact path ``<stem of the name>/``, with the logger's
``metadata.yaml`` and ``aliases.txt`` next to it, after each save with ``log_model="all"`` (or ``True`` and
``save_top_k=-1``), and at the end of the stage with ``log_model=True``. The plugin uploads from the training
thread, once a checkpoint is committed (at the next save, before a removal, and at teardown). Other loggers
that ask for models get one warning at setup.
"""

from __future__ import annotations

import os
import tempfile
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor

from dcp_plugin.checkpointer import locate

_SETTINGS = (
    "monitor",
    "mode",
    "save_last",
    "save_top_k",
    "save_weights_only",
    "_every_n_train_steps",
    "_every_n_val_epochs",
)


class LoggedModels:
    """Uploads the trainer's committed ``ModelCheckpoint`` directories to the loggers that asked for models."""

    def __init__(self) -> None:
        self._logged: dict[tuple[int, str], float] = {}  # (logger, path) -> modification time uploaded
        self._pending: dict[tuple[int, str], _Candidate] = {}
        self._warned: weakref.WeakSet[Any] = weakref.WeakSet()

    def attach(self, trainer: Any) -> None:
        """At setup: warn once about each logger that asks for models but cannot be served."""
        for logger in trainer.loggers:
            if _wants_models(logger) and not isinstance(logger, MLFlowLogger) and logger not in self._warned:
                self._warned.add(logger)
                rank_zero_warn(
                    f"{type(logger).__name__}(log_model=...) will upload no checkpoint with DCPCheckpointIO: it "
                    "uploads regular files only, and a dcp-plugin checkpoint is a directory. Upload the "
                    "directories yourself (e.g. logger.experiment's directory upload), write one .ckpt file with "
                    "dcp_plugin.lightning.to_lightning_file, or use MLFlowLogger, whose uploads the plugin serves."
                )

    def note(self, trainer: Any, *, final: bool = False) -> None:
        """Right after a save started (``final``: at the end of a stage): what the loggers' scan would find now
        (``ModelCheckpoint`` updates its paths before it saves), to be uploaded once committed."""
        if not trainer.is_global_zero:
            return
        for logger in trainer.loggers:
            if not isinstance(logger, MLFlowLogger) or not _wants_models(logger):
                continue
            for callback in trainer.checkpoint_callbacks:
                during = logger._log_model == "all" or getattr(callback, "save_top_k", None) == -1
                if isinstance(callback, ModelCheckpoint) and (during or final):
                    for path, score in _scan(callback).items():
                        best = path == callback.best_model_path
                        self._pending[(id(logger), path)] = _Candidate(logger, callback, path, score, best)

    def upload(self, *, final: bool = False) -> None:
        """Upload the noted checkpoints that are committed by now (``final``: forget the others)."""
        for key, candidate in list(self._pending.items()):
            if _is_committed_directory(candidate.path):
                mtime = os.stat(candidate.path).st_mtime
                if self._logged.get(key, -1.0) < mtime:
                    candidate.upload()
                    self._logged[key] = mtime
            elif not final:
                continue
            del self._pending[key]


@dataclass
class _Candidate:
    """One checkpoint a logger's scan found, uploaded as ``MLFlowLogger._scan_and_log_checkpoints`` uploads one."""

    logger: MLFlowLogger
    callback: ModelCheckpoint
    path: str
    score: Any
    best: bool

    def upload(self) -> None:
        metadata = {
            "score": self.score.item() if isinstance(self.score, Tensor) else self.score,
            "original_filename": Path(self.path).name,
            "Checkpoint": {k: getattr(self.callback, k) for k in _SETTINGS if hasattr(self.callback, k)},
        }
        aliases = ["latest", "best"] if self.best else ["latest"]
        artifact_path = Path(self.path).stem
        experiment, run_id = self.logger.experiment, self.logger.run_id
        experiment.log_artifact(run_id, self.path, artifact_path)  # a directory: uploaded whole
        with tempfile.TemporaryDirectory() as tmp:
            with open(os.path.join(tmp, "metadata.yaml"), "w") as handle:
                yaml.dump(metadata, handle, default_flow_style=False)
            with open(os.path.join(tmp, "aliases.txt"), "w") as handle:
                handle.write(str(aliases))
            experiment.log_artifacts(run_id, tmp, artifact_path)


def _scan(callback: ModelCheckpoint) -> dict[str, Any]:
    """The paths and scores Lightning's scan considers (``last``, ``best``, the best k)."""
    scores = {callback.last_model_path: callback.current_score, callback.best_model_path: callback.best_model_score}
    scores.update(callback.best_k_models)
    return {path: score for path, score in scores.items() if path}


def _wants_models(logger: Any) -> bool:
    return bool(getattr(logger, "_log_model", False))


def _is_committed_directory(path: str) -> bool:
    if not os.path.isdir(path):
        return False
    storage, name = locate(path, {})
    return storage.is_local and storage.is_committed(name)


__all__ = ["LoggedModels"]
