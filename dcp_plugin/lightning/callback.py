"""``DCPCheckpoint``: periodic, preemption-safe checkpoints for the Lightning Trainer.

    Trainer(plugins=[DCPCheckpointIO()],
            callbacks=[DCPCheckpoint(dirpath="s3://bucket/run1", every_n_train_steps=500,
                                     every_n_seconds=1800, keep_last=3, save_on_signal=True)])

The callback translates Lightning's hooks into the questions a :class:`~dcp_plugin.schedule.Schedule`
answers (*when* to save, *what to keep*); the saves themselves are ordinary ``trainer.save_checkpoint`` calls
that the :class:`DCPCheckpointIO` plugin writes in the background. Checkpoints are named
``<dirpath>/step_<global step>``.
"""

from __future__ import annotations

import logging
import os
import signal
import statistics
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Checkpoint
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from dcp_plugin.lightning import layout as lay
from dcp_plugin.lightning.checkpoint_io import DCPCheckpointIO
from dcp_plugin.policies import (
    RetentionPolicy,
    SaveContext,
    SaveDecision,
    SaveEvent,
    SaveOptions,
    SavePolicy,
    as_metrics,
)
from dcp_plugin.retention import RetentionOptions, best_first
from dcp_plugin.schedule import Schedule
from dcp_plugin.stats import SaveStats
from dcp_plugin.storage import CheckpointInfo, CheckpointStorage, step_name

log = logging.getLogger(__name__)

EXPORT_DIR = "export"
HISTORY_LIMIT = 1000
METRIC_PREFIX = "checkpoint/"


class DCPCheckpoint(Checkpoint):
    """Save Lightning checkpoints on a schedule, on preemption, and keep only what is wanted.

    Needs ``Trainer(plugins=[DCPCheckpointIO(...)])``. It replaces ``ModelCheckpoint`` (Lightning adds no
    default one next to it).

    Args:
        dirpath: directory or fsspec URL of this run's checkpoints; default
            ``<default_root_dir>/checkpoints``.
        every_n_train_steps: save after every N optimizer steps.
        every_n_seconds: save when this much wall-clock time passed since the last save (rank 0 decides).
        every_n_epochs: save at the end of every N-th training epoch. Default ``1`` when no other trigger is
            given.
        save_on_signal: on SIGTERM/SIGUSR1 (``signals``) on any rank, save at the end of the current batch,
            wait until it is committed, then stop training. Composes with Lightning's own SIGTERM handling.
        save_on_exception: save while an exception ends ``fit`` (single-process runs only).
        save_last: save once more when training finishes (unless that step was just saved).
        keep_last: keep only the N most recent checkpoints of this run.
        keep_every_n_steps: also keep checkpoints whose step is a multiple of this.
        keep_best: also keep the K checkpoints with the best ``monitor`` value (``mode`` "min" or "max").
        monitor, mode: the logged metric for ``keep_best`` (read from ``trainer.callback_metrics`` at save
            time and stored in the checkpoint's manifest).
        auto_resume: when ``fit`` is given no ``ckpt_path`` (or ``"last"``), resume from the latest committed
            checkpoint in ``dirpath``.
        export_final: at the end of training, also write a model-only checkpoint (weights and
            hyper-parameters) under ``<dirpath>/export/step_<N>``.
        export_dtype: convert the exported floating-point weights to this dtype (e.g. ``torch.bfloat16``).
        log_metrics: log each save's timings (``checkpoint/blocking_s``, ``checkpoint/durable_s``,
            ``checkpoint/bytes``, ``checkpoint/throughput_mib_s``) to the trainer's loggers, and a summary
            line at the end of training.
        run_id: identifies this run's checkpoints (retention never deletes others). Default: new, or the one
            of the checkpoint resumed from in ``dirpath``.
        clock: clock of the time trigger (seconds); inject one in tests.
    """

    def __init__(
        self,
        dirpath: str | os.PathLike[str] | None = None,
        *,
        every_n_train_steps: int | None = None,
        every_n_seconds: float | None = None,
        every_n_epochs: int | None = None,
        save_on_signal: bool = True,
        signals: Iterable[int] = (signal.SIGTERM, signal.SIGUSR1),
        save_on_exception: bool = False,
        save_last: bool = True,
        keep_last: int | None = None,
        keep_every_n_steps: int | None = None,
        keep_best: int | None = None,
        monitor: str | None = None,
        mode: Literal["min", "max"] = "min",
        auto_resume: bool = True,
        export_final: bool = False,
        export_dtype: torch.dtype | None = None,
        log_metrics: bool = True,
        run_id: str | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if every_n_train_steps is None and every_n_seconds is None and every_n_epochs is None:
            every_n_epochs = 1
        self.save_options = SaveOptions(
            every_n_steps=every_n_train_steps,
            every_n_seconds=every_n_seconds,
            every_n_epochs=every_n_epochs,
            on_signal=_check_bool("save_on_signal", save_on_signal),
            signals=tuple(signal.Signals(s) for s in signals),
            on_exception=_check_bool("save_on_exception", save_on_exception),
            clock=clock,
        )
        self.retention_options = RetentionOptions(
            keep_last=keep_last,
            keep_every_n_steps=keep_every_n_steps,
            keep_best=keep_best,
            monitor=monitor,
            mode=mode,
        )
        if export_dtype is not None and not (isinstance(export_dtype, torch.dtype) and export_dtype.is_floating_point):
            raise ValueError(
                f"export_dtype must be a floating-point torch.dtype (e.g. torch.bfloat16): {export_dtype!r}."
            )
        if export_dtype is not None and not export_final:
            raise ValueError("export_dtype only applies to the final export; pass export_final=True too.")
        self.dirpath = os.fspath(dirpath) if dirpath is not None else None
        self.save_last = _check_bool("save_last", save_last)
        self.auto_resume = _check_bool("auto_resume", auto_resume)
        self.export_final = _check_bool("export_final", export_final)
        self.export_dtype = export_dtype
        self.log_metrics = _check_bool("log_metrics", log_metrics)
        self.schedule = Schedule(self.save_options.build(), self.retention_options.build(), run_id)
        self.history: deque[SaveStats] = deque(maxlen=HISTORY_LIMIT)
        """Timings of this callback's finished saves (rank 0; the most recent 1000)."""
        self.last_saved: str | None = None
        """URL of the last checkpoint this callback saved."""
        self._storage: CheckpointStorage | None = None
        self._plugin: DCPCheckpointIO | None = None
        self._writing: list[tuple[SaveStats, float]] = []  # this callback's saves not yet committed, call time
        self._manifest_metadata: dict[str, Any] | None = None
        self._resume_hook_installed = False

    @property
    def run_id(self) -> str | None:
        """Identifies this run's checkpoints (retention never deletes others)."""
        return self.schedule.run_id

    @run_id.setter
    def run_id(self, run_id: str | None) -> None:
        self.schedule.run_id = run_id

    @property
    def save_policy(self) -> SavePolicy | None:
        return self.schedule.save_policy

    @property
    def retention(self) -> RetentionPolicy | None:
        return self.schedule.retention

    @property
    def state_key(self) -> str:
        return self._generate_state_key(dirpath=self.dirpath)

    # -- setup and resume ------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        plugin = trainer.strategy.checkpoint_io
        if not isinstance(plugin, DCPCheckpointIO):
            raise TypeError(
                f"DCPCheckpoint saves through the DCPCheckpointIO plugin, but the trainer uses "
                f"{type(plugin).__name__}. Pass "
                "Trainer(plugins=[DCPCheckpointIO()], callbacks=[DCPCheckpoint(...)])."
            )
        self._plugin = plugin
        if self.dirpath is None:
            self.dirpath = os.path.join(trainer.default_root_dir, "checkpoints")
        self._storage = CheckpointStorage(self.dirpath, plugin.config.storage_options)
        if stage != "fit":
            return
        self.run_id = trainer.strategy.broadcast(self.run_id or uuid.uuid4().hex)
        if self.auto_resume:
            self._resume_hook_installed = _wrap_resume_start(trainer, self._resume_path)
        self.schedule.install()

    def _remove_resume_hook(self, trainer: pl.Trainer) -> None:
        if self._resume_hook_installed:
            self._resume_hook_installed = False
            _unwrap_resume_start(trainer)

    def _resume_path(self, trainer: pl.Trainer) -> str | None:
        latest = None
        if trainer.is_global_zero:
            latest = self.latest_checkpoint()
        latest = trainer.strategy.broadcast(latest)
        if latest is None:
            return None
        self.run_id = latest.manifest.get("run_id") or self.run_id
        rank_zero_info(f"DCPCheckpoint: resuming from {latest.url} (the latest checkpoint in {self.dirpath}).")
        return latest.url

    def latest_checkpoint(self) -> CheckpointInfo | None:
        """The latest committed Lightning checkpoint in ``dirpath`` (any run), or ``None``."""
        storage = self._require_storage()
        infos = [info for info in storage.list() if lay.LAYOUT_KEY in info.metadata]
        return infos[-1] if infos else None

    @property
    def best_model_path(self) -> str:
        """This run's best checkpoint by ``monitor`` (without ``monitor``: the latest); ``""`` if none.

        Lets ``trainer.test(ckpt_path="best")`` use this callback like ``ModelCheckpoint``."""
        if self._storage is None:
            return ""
        ours = [
            i for i in self._storage.list() if i.manifest.get("run_id") == self.run_id and lay.LAYOUT_KEY in i.metadata
        ]
        monitor = self.retention_options.monitor
        best = best_first(ours, monitor, self.retention_options.mode) if monitor else []
        if best:
            return best[0].url
        return ours[-1].url if ours else ""

    def state_dict(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "dirpath": self._storage.root_url if self._storage else self.dirpath}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Resuming from one of this directory's checkpoints continues that run (retention included).
        if (
            self._storage is not None
            and state_dict.get("dirpath") == self._storage.root_url
            and state_dict.get("run_id")
        ):
            self.run_id = state_dict["run_id"]

    # -- triggers --------------------------------------------------------------------------------
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any, **kwargs: Any) -> None:
        self._maybe_save(trainer, "step")

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._maybe_save(trainer, "epoch_end")

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if isinstance(exception, (KeyboardInterrupt, SystemExit)) or self._plugin is None:
            return  # SIGTERMException is a SystemExit: the preemption save already happened
        try:
            self._maybe_save(trainer, "exception")
        except Exception as err:  # noqa: BLE001 - keep the original exception primary
            log.error("Saving a checkpoint after %s failed: %s", type(exception).__name__, err)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        step = trainer.global_step
        if self.save_last and step > 0 and step != self.schedule.last_saved_step and not trainer.sanity_checking:
            self._save(trainer, step, SaveDecision(True, ("last",)))
        if self.export_final:
            self._export(trainer, pl_module, step)
        self._flush(trainer)
        if self.log_metrics and trainer.is_global_zero and self.history:
            rank_zero_info(self.summary())

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._remove_resume_hook(trainer)
        self.schedule.uninstall()

    def _maybe_save(self, trainer: pl.Trainer, event: SaveEvent) -> None:
        if self._plugin is None or trainer.sanity_checking:
            return
        step = trainer.global_step
        ctx = SaveContext(step=step, event=event, epoch=trainer.current_epoch, world_size=trainer.world_size)
        verdict = self.schedule.decide(ctx, self._plugin.checkpointer(collective=True).groups.all_gather_control)
        if verdict.save:
            self._save(trainer, step, verdict.decision)
        self.schedule.acknowledge(ctx, verdict)
        if verdict.flush:
            self._flush(trainer)  # the save must be durable before the process goes on (or is told to exit)
        elif event != "exception":
            self._after_commit(trainer)
        if verdict.stop:
            trainer.strategy.barrier("DCPCheckpoint.preemption")
            rank_zero_info(f"DCPCheckpoint: preemption signal received; saved {self.last_saved}, stopping.")
            trainer.should_stop = True

    # -- saving ----------------------------------------------------------------------------------
    def _save(self, trainer: pl.Trainer, step: int, decision: SaveDecision) -> None:
        assert self._plugin is not None
        storage = self._require_storage()
        metadata: dict[str, Any] = {"reasons": list(decision.reasons), "run": "DCPCheckpoint"}
        metrics = as_metrics(trainer.callback_metrics)
        if metrics:
            metadata["metrics"] = metrics
        name = trainer.strategy.broadcast(self._free_name(step) if trainer.is_global_zero else None)
        url = storage.url(name)
        self._manifest_metadata = metadata
        started = time.perf_counter()
        try:
            trainer.save_checkpoint(url)
        finally:
            self._manifest_metadata = None
        stats = self._plugin.stats_for(url)  # None on ranks that did not write (stock strategies: rank 0 writes)
        if stats is not None:
            self._writing.append((stats, time.perf_counter() - started))
        self.schedule.saved(step)
        self.last_saved = url

    def _free_name(self, step: int) -> str:
        """``step_<N>``, or ``step_<N>-v<k>`` when another run already committed that name here."""
        storage = self._require_storage()
        base = name = step_name(step)
        version = 0
        while storage.is_committed(name) and storage.info(name).manifest.get("run_id") != self.run_id:
            version += 1
            name = f"{base}-v{version}"
        return name

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if self._manifest_metadata is not None:
            checkpoint[lay.MANIFEST_METADATA_KEY] = self._manifest_metadata
            checkpoint[lay.RUN_ID_KEY] = self.run_id

    def _export(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int) -> None:
        storage = self._require_storage()
        weights = trainer.strategy.lightning_module_state_dict()
        if self.export_dtype is not None:
            weights = {k: v.to(self.export_dtype) if v.is_floating_point() else v for k, v in weights.items()}
        checkpoint: dict[str, Any] = {
            "epoch": trainer.current_epoch,
            "global_step": step,
            "pytorch-lightning_version": pl.__version__,
            "state_dict": weights,
            lay.MANIFEST_METADATA_KEY: {
                "export": {"model_only": True, "dtype": str(self.export_dtype) if self.export_dtype else None}
            },
        }
        if pl_module.hparams:
            checkpoint[pl_module.CHECKPOINT_HYPER_PARAMS_KEY] = dict(pl_module.hparams)
        url = storage.url(EXPORT_DIR, step_name(step))
        trainer.strategy.save_checkpoint(checkpoint, url)
        trainer.strategy.barrier("DCPCheckpoint.export")
        rank_zero_info(f"DCPCheckpoint: exported the final model to {url}.")

    # -- after a save ----------------------------------------------------------------------------
    def _flush(self, trainer: pl.Trainer) -> None:
        """Wait until the save in flight is committed, then retention and telemetry."""
        assert self._plugin is not None
        self._plugin.wait()
        self._after_commit(trainer)

    def _after_commit(self, trainer: pl.Trainer) -> None:
        plugin = self._plugin
        if plugin is None or plugin.in_flight is not None:
            return
        finished, self._writing = self._writing, []
        for stats, call_s in finished:
            self.history.append(stats)
            if self.log_metrics and stats.error is None:
                _log_stats(trainer, stats, call_s)
        self.schedule.after_commit(self._require_storage(), coordinator=trainer.is_global_zero)

    def summary(self) -> str:
        """One line about this callback's saves so far."""
        done = [s for s in self.history if s.error is None]
        if not done:
            return "DCPCheckpoint: no checkpoint saved."
        blocked = [s.blocking_s for s in done]
        durable = [s.durable_s for s in done if s.durable_s is not None]
        written = sum(s.bytes_written or 0 for s in done)
        parts = [
            f"DCPCheckpoint: {len(done)} checkpoint(s) in {self.dirpath}, last {done[-1].name}",
            f"training blocked {sum(blocked):.3f} s in total (max {max(blocked) * 1000:.1f} ms)",
        ]
        if durable:
            parts.append(f"median time to durable {statistics.median(durable):.2f} s")
        if written:
            parts.append(f"{written / 2**20:.1f} MiB written")
        failed = len(self.history) - len(done)
        if failed:
            parts.append(f"{failed} failed")
        return "; ".join(parts) + "."

    def _require_storage(self) -> CheckpointStorage:
        if self._storage is None:
            raise RuntimeError("DCPCheckpoint is not set up yet; it is used by Trainer.fit().")
        return self._storage


def _log_stats(trainer: pl.Trainer, stats: SaveStats, call_s: float) -> None:
    metrics = {f"{METRIC_PREFIX}blocking_s": stats.blocking_s, f"{METRIC_PREFIX}save_call_s": call_s}
    if stats.staging_s is not None:
        metrics[f"{METRIC_PREFIX}staging_s"] = stats.staging_s
    if stats.durable_s is not None:
        metrics[f"{METRIC_PREFIX}durable_s"] = stats.durable_s
    if stats.bytes_written is not None:
        metrics[f"{METRIC_PREFIX}bytes"] = float(stats.bytes_written)
    if stats.throughput_bytes_per_s is not None:
        metrics[f"{METRIC_PREFIX}throughput_mib_s"] = stats.throughput_bytes_per_s / 2**20
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=stats.step if stats.step is not None else trainer.global_step)


def _wrap_resume_start(trainer: pl.Trainer, find: Callable[[pl.Trainer], str | None]) -> bool:
    """Make Lightning resume from ``find(trainer)`` when ``fit`` was given no checkpoint path.

    Lightning resolves ``ckpt_path`` before any callback runs and has no public way for a callback to supply
    one, so the (private) checkpoint connector's ``resume_start`` is wrapped on this instance: when it is
    called with no path (none passed, or ``"last"`` found no ModelCheckpoint file), ``find`` supplies one.
    This is the point at which Lightning restores, for every strategy.
    """
    connector = trainer._checkpoint_connector
    original = connector.resume_start

    def resume_start(checkpoint_path: Any = None, weights_only: Any = None) -> None:
        _unwrap_resume_start(trainer)  # once
        if checkpoint_path is None:
            checkpoint_path = find(trainer)
        return original(checkpoint_path, weights_only=weights_only)

    connector.resume_start = resume_start
    return True


def _unwrap_resume_start(trainer: pl.Trainer) -> None:
    trainer._checkpoint_connector.__dict__.pop("resume_start", None)


def _check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}.")
    return value


__all__ = ["DCPCheckpoint"]
