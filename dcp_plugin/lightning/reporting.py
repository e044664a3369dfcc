"""What ``DCPCheckpoint`` reports and exports: per-save metrics for the trainer's loggers, a summary line,
and the final model-only export."""

from __future__ import annotations

import statistics
from collections import deque
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from dcp_plugin.engine.stats import SaveStats
from dcp_plugin.lightning import layout as lay

METRIC_PREFIX = "checkpoint/"


class SaveLog:
    """A callback's own saves: those still being written (with the wall time of the call that started
    them) and the finished ones (the most recent ``limit``)."""

    def __init__(self, limit: int) -> None:
        self.history: deque[SaveStats] = deque(maxlen=limit)
        self._writing: list[tuple[SaveStats, float]] = []

    def started(self, stats: SaveStats, call_s: float) -> None:
        self._writing.append((stats, call_s))

    def settle(self, plugin: Any, trainer: pl.Trainer | None, *, wait: bool) -> bool:
        """Whether every save of ``plugin`` is committed (``wait``: wait for that first); if so, keep this log's
        saves and log them to ``trainer``'s loggers (if given)."""
        if wait:
            plugin.wait()
        if plugin.in_flight is not None:
            return False
        self.committed(trainer)
        return True

    def committed(self, trainer: pl.Trainer | None) -> None:
        """Every save started so far is finished: keep it, and log it to ``trainer``'s loggers (if given)."""
        finished, self._writing = self._writing, []
        for stats, call_s in finished:
            self.history.append(stats)
            if trainer is not None and stats.error is None:
                log_stats(trainer, stats, call_s)


def log_stats(trainer: pl.Trainer, stats: SaveStats, call_s: float) -> None:
    """Send one save's timings to the trainer's loggers (``checkpoint/...``)."""
    metrics = {**stats.metrics(METRIC_PREFIX), f"{METRIC_PREFIX}save_call_s": call_s}
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=stats.step if stats.step is not None else trainer.global_step)


def summarize(history: list[SaveStats], dirpath: str | None) -> str:
    """One line about a callback's saves so far."""
    done = [s for s in history if s.error is None]
    if not done:
        return "DCPCheckpoint: no checkpoint saved."
    blocked = [s.blocking_s for s in done]
    durable = [s.durable_s for s in done if s.durable_s is not None]
    written = sum(s.bytes_written or 0 for s in done)
    parts = [
        f"DCPCheckpoint: {len(done)} checkpoint(s) in {dirpath}, last {done[-1].name}",
        f"training blocked {sum(blocked):.3f} s in total (max {max(blocked) * 1000:.1f} ms)",
    ]
    if durable:
        parts.append(f"median time to durable {statistics.median(durable):.2f} s")
    if written:
        parts.append(f"{written / 2**20:.1f} MiB written")
    failed = len(history) - len(done)
    if failed:
        parts.append(f"{failed} failed")
    return "; ".join(parts) + "."


def export_model(
    trainer: pl.Trainer, pl_module: pl.LightningModule, url: str, *, step: int, dtype: torch.dtype | None
) -> None:
    """Write a model-only checkpoint (weights, optionally converted to ``dtype``, and hyper-parameters) at ``url``
    through the trainer's strategy (every rank calls it)."""
    weights = trainer.strategy.lightning_module_state_dict()
    if dtype is not None:
        weights = {k: v.to(dtype) if v.is_floating_point() else v for k, v in weights.items()}
    checkpoint: dict[str, Any] = {
        "epoch": trainer.current_epoch,
        "global_step": step,
        "pytorch-lightning_version": pl.__version__,
        "state_dict": weights,
        lay.MANIFEST_METADATA_KEY: {"export": {"model_only": True, "dtype": str(dtype) if dtype else None}},
    }
    if pl_module.hparams:
        checkpoint[pl_module.CHECKPOINT_HYPER_PARAMS_KEY] = dict(pl_module.hparams)
    trainer.strategy.save_checkpoint(checkpoint, url)
    trainer.strategy.barrier("DCPCheckpoint.export")
    rank_zero_info(f"DCPCheckpoint: exported the final model to {url}.")
