"""``DCPCheckpoint``: periodic, preemption-safe checkpoints for the Lightning Trainer.

    Trainer(plugins=[DCPCheckpointIO()],
            callbacks=[DCPCheckpoint(dirpath="s3://bucket/run1", every_n_train_steps=500,
                                     every_n_seconds=1800, keep_last=3, save_on_signal=True)])

The callback translates Lightning's hooks into the questions a :class:`~dcp_plugin.policies.schedule.Schedule`
answers (*when* to save, *what to keep*); the saves themselves are ordinary ``trainer.save_checkpoint`` calls
that the :class:`DCPCheckpointIO` plugin writes in the background. Checkpoints are named
``<dirpath>/step_<global step>``.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, Literal, TypeVar

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from dcp_plugin.engine.stats import SaveStats
from dcp_plugin.lightning import compat
from dcp_plugin.lightning import layout as lay
from dcp_plugin.lightning.checkpoint_io import DCPCheckpointIO
from dcp_plugin.lightning.nodes import NodeScope, nodes_of
from dcp_plugin.lightning.options import check_bool, checked_export_dtype, save_options
from dcp_plugin.lightning.reporting import METRIC_PREFIX, SaveLog, export_model, summarize  # noqa: F401
from dcp_plugin.lightning.run import (
    RunCheckpoints,
    free_name,
    required_storage,
    resume_path,
    unwrap_resume_start,
    wrap_resume_start,
)
from dcp_plugin.lightning.tiers import CallbackTiers
from dcp_plugin.policies import (
    RetentionPolicy,
    SaveContext,
    SaveDecision,
    SaveEvent,
    SavePolicy,
    as_metrics,
)
from dcp_plugin.policies.retention import RetentionOptions
from dcp_plugin.policies.schedule import Schedule
from dcp_plugin.storage import CheckpointStorage, step_name

log = logging.getLogger(__name__)

_T = TypeVar("_T")
EXPORT_DIR = "export"
HISTORY_LIMIT = 1000


class DCPCheckpoint(RunCheckpoints):
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
        signals: which signals mean preemption: names (``"SIGTERM"``, ``"USR1"``), numbers or
            ``signal.Signals`` values.
        save_on_exception: save while an exception ends ``fit`` (single-process runs only).
        save_last: save once more when training finishes (unless that step was just saved).
        keep_last: keep only the N most recent checkpoints of this run.
        keep_every_n_steps: also keep checkpoints whose step is a multiple of this.
        keep_best: also keep the K checkpoints with the best ``monitor`` value (``mode`` "min" or "max").
        monitor: the logged metric for ``keep_best`` (read from ``trainer.callback_metrics`` at save time and
            stored in the checkpoint's manifest).
        mode: ``"min"`` or ``"max"``: whether a lower or a higher ``monitor`` value is better.
        auto_resume: when ``fit`` is given no ``ckpt_path`` (or ``"last"``), resume from the latest committed
            checkpoint in ``dirpath``.
        export_final: at the end of training, also write a model-only checkpoint (weights and
            hyper-parameters) under ``<dirpath>/export/step_<N>``.
        export_dtype: convert the exported floating-point weights to this dtype (``torch.bfloat16`` or
            ``"bfloat16"``).
        log_metrics: log each save's timings (``checkpoint/blocking_s``, ``checkpoint/durable_s``,
            ``checkpoint/bytes``, ``checkpoint/throughput_mib_s``) to the trainer's loggers, and a summary
            line at the end of training.
        run_id: identifies this run's checkpoints (retention never deletes others). Default: new, or the one
            of the checkpoint resumed from in ``dirpath``.
        remote: a remote tier (``"s3://bucket/run1"``) the committed checkpoints are copied to in the
            background; auto-resume takes the newest checkpoint of either tier. Default: ``DCP_PLUGIN_REMOTE``
            (see :class:`~dcp_plugin.tiers.two_tiers.RemoteTier`).
        remote_storage_options: fsspec options of the remote tier.
        replicate_every_n_steps: copy only checkpoints of every n-th step (default: every checkpoint).
        remote_keep_last: how many of this run's checkpoints the remote tier keeps (default: all).
        local_scope: ``"node"``: ``dirpath`` is on each node's own disk (no shared filesystem): see
            docs/multinode.md. Passed to the plugin (default: the plugin's, ``DCP_PLUGIN_LOCAL_SCOPE``).
        peer_replicas: with ``local_scope="node"``: how many other nodes keep a copy of each node's part (default 1).
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
        signals: Sequence[int | str] = ("SIGTERM", "SIGUSR1"),
        save_on_exception: bool = False,
        save_last: bool = True,
        keep_last: int | None = None,
        keep_every_n_steps: int | None = None,
        keep_best: int | None = None,
        monitor: str | None = None,
        mode: Literal["min", "max"] = "min",
        auto_resume: bool = True,
        export_final: bool = False,
        export_dtype: torch.dtype | str | None = None,
        log_metrics: bool = True,
        run_id: str | None = None,
        clock: Callable[[], float] = time.monotonic,
        remote: str | None = None,
        remote_storage_options: dict[str, Any] | None = None,
        replicate_every_n_steps: int | None = None,
        remote_keep_last: int | None = None,
        local_scope: Literal["shared", "node"] | None = None,
        peer_replicas: int | None = None,
    ) -> None:
        triggers = (every_n_train_steps, every_n_seconds, every_n_epochs)
        self.save_options = save_options(*triggers, save_on_signal, signals, save_on_exception, clock)
        """The save triggers given to the constructor, as plain options."""
        self.retention_options = RetentionOptions(keep_last, keep_every_n_steps, keep_best, monitor, mode)
        """The retention rules given to the constructor, as plain options."""
        export_dtype = checked_export_dtype(export_final, export_dtype)
        self.dirpath = os.fspath(dirpath) if dirpath is not None else None
        """Directory or URL of this run's checkpoints (``None``: ``setup`` uses ``<default_root_dir>/checkpoints``)."""
        self.save_last = check_bool("save_last", save_last)
        """Whether training's end saves once more (unless that step was just saved)."""
        self.auto_resume = check_bool("auto_resume", auto_resume)
        """Whether ``fit`` without ``ckpt_path`` resumes from the latest committed checkpoint."""
        self.export_final = check_bool("export_final", export_final)
        """Whether training's end also writes a model-only checkpoint under ``<dirpath>/export``."""
        self.export_dtype = export_dtype
        """The dtype the exported floating-point weights are converted to (``None``: unchanged)."""
        self.log_metrics = check_bool("log_metrics", log_metrics)
        """Whether each save's timings go to the trainer's loggers, with a summary line at the end."""
        self.schedule = Schedule(self.save_options.build(), self.retention_options.build(), run_id)
        """The save policy, retention, run id and last saved step built from the options."""
        self.saves = SaveLog(HISTORY_LIMIT)
        """This callback's saves: those still being written and the finished ones (see :attr:`history`)."""
        self.last_saved: str | None = None
        """URL of the last checkpoint this callback saved (``None`` before the first)."""
        self._storage: CheckpointStorage | None = None
        self._plugin: DCPCheckpointIO | None = None
        self._manifest_metadata: dict[str, Any] | None = None
        self.tiers = CallbackTiers.resolve(remote, remote_storage_options, replicate_every_n_steps, remote_keep_last)
        """The remote tier, when one is configured, and the replication to it."""
        self.node_scope = NodeScope(local_scope, peer_replicas)
        """``local_scope`` and ``peer_replicas``, passed to the plugin at setup (``None``: the plugin's own)."""

    def __getstate__(self) -> dict[str, Any]:
        """Copies keep options and run; not the trainer's plugin, storage or signal handlers (set up afresh)."""
        return {**self.__dict__, "_storage": None, "_plugin": None, "_manifest_metadata": None}

    @property
    def save_policy(self) -> SavePolicy | None:
        """When this callback saves, built from the ``every_n_*`` and ``save_on_*`` options."""
        return self.schedule.save_policy

    @property
    def retention(self) -> RetentionPolicy | None:
        """Which of this run's checkpoints are kept, built from the ``keep_*`` options (``None``: all)."""
        return self.schedule.retention

    @property
    def state_key(self) -> str:
        """The key of this callback's state in a checkpoint; it includes ``dirpath``."""
        return self._generate_state_key(dirpath=self.dirpath)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Check that the trainer saves through ``DCPCheckpointIO``; for ``fit``: agree on the run id, set up
        auto-resume and the remote tier, install the signal handlers."""
        plugin = compat.plugin_of(trainer)  # AsyncCheckpointIO around it is removed
        if not isinstance(plugin, DCPCheckpointIO):
            raise TypeError(
                f"DCPCheckpoint saves through the DCPCheckpointIO plugin, but the trainer uses "
                f"{type(trainer.strategy.checkpoint_io).__name__}: pass Trainer(plugins=[DCPCheckpointIO()], "
                "callbacks=[DCPCheckpoint(...)])."
            )
        self._plugin = plugin
        self.node_scope.apply(plugin)
        plugin.attach(trainer)
        self.dirpath = self.dirpath or os.path.join(trainer.default_root_dir, "checkpoints")
        self._storage = CheckpointStorage(self.dirpath, plugin.config.storage_options)
        if stage != "fit":
            return
        plugin.prepare_first_save(trainer)
        self.run_id = trainer.strategy.broadcast(self.run_id or uuid.uuid4().hex)
        groups = plugin.checkpointer(collective=True).groups
        self.tiers.setup(self._storage, plugin.config.storage_options, self.run_id, groups, nodes_of(plugin))
        if self.auto_resume:
            wrap_resume_start(trainer, lambda trainer: resume_path(self, trainer))
        self.schedule.install()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any, **kwargs: Any) -> None:
        """Ask the save policy about the step just finished; save, or stop after a preemption save."""
        self._maybe_save(trainer, "step")

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Ask the save policy at the end of the epoch (``OnEpochEnd``)."""
        self._maybe_save(trainer, "epoch_end")

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        """With ``save_on_exception``: save while the exception ends ``fit`` (a failure to save is only logged)."""
        if isinstance(exception, (KeyboardInterrupt, SystemExit)) or self._plugin is None:
            return  # SIGTERMException is a SystemExit: the preemption save already happened
        try:
            self._maybe_save(trainer, "exception")
        except Exception as err:  # noqa: BLE001 - keep the original exception primary
            log.error("Saving a checkpoint after %s failed: %s", type(exception).__name__, err)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Save the last step (``save_last``), export the model (``export_final``), wait for the writes."""
        step = trainer.global_step
        if self.save_last and step > 0 and step != self.schedule.last_saved_step and not trainer.sanity_checking:
            self._save(trainer, step, SaveDecision(True, ("last",)))
        if self.export_final:
            url = required_storage(self._storage).url(EXPORT_DIR, step_name(step))
            export_model(trainer, pl_module, url, step=step, dtype=self.export_dtype)
        self._after_commit(trainer, wait=True)
        if self.log_metrics and trainer.is_global_zero and self.history:
            rank_zero_info(self.summary())

    @property
    def history(self) -> deque[SaveStats]:
        """Timings of this callback's finished saves (rank 0; the most recent 1000)."""
        return self.saves.history

    def summary(self) -> str:
        """One line about this callback's saves so far."""
        return summarize(list(self.history), self.dirpath)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Remove the signal handlers and wait for the copies to the remote tier."""
        unwrap_resume_start(trainer)
        self.schedule.uninstall()
        self.tiers.close(self.schedule, coordinator=trainer.is_global_zero)

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
            self._after_commit(trainer, wait=True)  # durable before the process goes on (or is told to exit)
        elif event != "exception":
            self._after_commit(trainer)
        if verdict.stop:
            trainer.strategy.barrier("DCPCheckpoint.preemption")
            rank_zero_info(f"DCPCheckpoint: preemption signal received; saved {self.last_saved}, stopping.")
            trainer.should_stop = True

    def _save(self, trainer: pl.Trainer, step: int, decision: SaveDecision) -> None:
        assert self._plugin is not None
        storage = required_storage(self._storage)
        name = trainer.strategy.broadcast(free_name(storage, step, self.run_id) if trainer.is_global_zero else None)
        url = storage.url(name)
        self._manifest_metadata = _save_metadata(trainer, decision)
        started = time.perf_counter()
        try:
            trainer.save_checkpoint(url)
        finally:
            self._manifest_metadata = None
        stats = self._plugin.stats_for(url)  # None on ranks that did not write (stock strategies: rank 0 writes)
        if stats is not None:
            self.saves.started(stats, time.perf_counter() - started)
        self.schedule.saved(step)
        self.tiers.saved(step, str(name))
        self.last_saved = url

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """Add the save's reasons, metrics and run id to the checkpoint (written into its manifest)."""
        if self._manifest_metadata is not None:
            checkpoint[lay.MANIFEST_METADATA_KEY] = self._manifest_metadata
            checkpoint[lay.RUN_ID_KEY] = self.run_id

    def _after_commit(self, trainer: pl.Trainer, *, wait: bool = False) -> None:
        """Once this callback's saves committed (``wait``: wait for that): telemetry, then retention."""
        plugin, metrics_to = self._plugin, trainer if self.log_metrics else None
        if plugin is not None and self.saves.settle(plugin, metrics_to, wait=wait):
            self.tiers.after_commit(self.schedule, required_storage(self._storage), coordinator=trainer.is_global_zero)


def _save_metadata(trainer: pl.Trainer, decision: SaveDecision) -> dict[str, Any]:
    metrics = as_metrics(trainer.callback_metrics)
    return {"reasons": list(decision.reasons), "run": "DCPCheckpoint", **({"metrics": metrics} if metrics else {})}


__all__ = ["DCPCheckpoint"]
