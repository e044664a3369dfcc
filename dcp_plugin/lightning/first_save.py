"""Getting the first Lightning save ready before it is taken, so it blocks no longer than later ones.

At ``fit`` setup, on the ranks that will save, the writer daemon starts (``process`` mode), and after the first
optimizer step the staging buffers are allocated in the background (stock strategies). Called by
:class:`~dcp_plugin.lightning.DCPCheckpoint`'s setup and, for a plain ``ModelCheckpoint``, through
:meth:`DCPCheckpointIO.prepare_first_save <dcp_plugin.lightning.DCPCheckpointIO.prepare_first_save>`.
"""

from __future__ import annotations

from typing import Any

from dcp_plugin.engine.staging.warmup import prepare_after_first_step
from dcp_plugin.lightning import layout as lay


def saves_collectively(strategy: Any) -> bool:
    """Whether every rank joins each save (the DCP strategies), rather than global rank 0 alone."""
    return bool(getattr(strategy, "saves_collectively", False))


def warm_up(trainer: Any, plugin: Any) -> None:
    """At setup, on the ranks that will save: start the writer daemon (``process`` mode), and prepare the
    staging buffers after the first optimizer step (stock strategies), so the first save does not wait for
    either. Also hands the plugin the module being trained, for incremental saves of its frozen parameters."""
    if trainer.lightning_module is not None:
        plugin.watch_module(trainer.lightning_module)

    if saves_collectively(trainer.strategy):
        plugin.engine(collective=True).warm_up()
    elif trainer.is_global_zero:  # stock strategies save on global rank 0 only
        plugin.engine(collective=False).warm_up()
        if plugin.engine(collective=False).needs_prepare:
            _prepare_after_first_step(trainer, plugin)


def _prepare_after_first_step(trainer: Any, plugin: Any) -> None:
    """Once the first optimizer step created the optimizer's state, stage what a Lightning checkpoint holds
    (module and optimizer states: the same tensors the first save will copy) in the background."""

    def checkpoint() -> dict[str, Any]:
        live = {
            "state_dict": trainer.lightning_module.state_dict(),
            "optimizer_states": [optimizer.state_dict() for optimizer in trainer.optimizers],
        }
        return lay.split_checkpoint(live)[0]

    prepare_after_first_step(lambda: plugin.checkpointer(collective=False), checkpoint)


__all__ = ["saves_collectively", "warm_up"]
