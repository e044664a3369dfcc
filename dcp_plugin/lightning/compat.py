"""Where Lightning's own code must see dcp-plugin's saves that are still being written.

``ModelCheckpoint`` picks ``-vN`` names by asking whether a path exists (``file_exists``, decided on rank 0). A
background save becomes visible under its name only when it commits, so without help a second save in the
same name would be chosen while the first is in flight, and would replace it. :func:`install` makes
``file_exists`` also answer yes for a path that the trainer's :class:`DCPCheckpointIO` (or any other instance in
this process) is still writing. Nothing changes for other plugins, or when no write is in flight.

``ModelCheckpoint.setup`` (``fit`` only, with a :class:`DCPCheckpointIO`) also gets the first save ready, as
``DCPCheckpoint`` does: in ``process`` mode the writer daemon starts in the background, and after the first
optimizer step the staging buffers are allocated in the background, so the first save blocks no longer than
later ones.
"""

from __future__ import annotations

import functools
from typing import Any

from lightning.pytorch.callbacks import ModelCheckpoint

from dcp_plugin import inflight
from dcp_plugin.lightning import layout as lay
from dcp_plugin.warmup import prepare_after_first_step

_MARK = "__dcp_plugin_sees_writes__"


def install() -> None:
    """Make ``ModelCheckpoint.file_exists`` count saves in flight as existing (once per process)."""
    original = ModelCheckpoint.file_exists
    if getattr(original, _MARK, False):
        return

    @functools.wraps(original)
    def file_exists(self: ModelCheckpoint, filepath: Any, trainer: Any) -> bool:
        if trainer.is_global_zero and _is_writing(trainer, filepath):
            # Every rank still takes part in the same reduction as the original.
            return bool(trainer.strategy.reduce_boolean_decision(True, all=False))
        return original(self, filepath, trainer)

    setattr(file_exists, _MARK, True)
    ModelCheckpoint.file_exists = file_exists  # type: ignore[method-assign]
    original_setup = ModelCheckpoint.setup

    @functools.wraps(original_setup)
    def setup(self: ModelCheckpoint, trainer: Any, pl_module: Any, stage: str) -> None:
        original_setup(self, trainer, pl_module, stage)
        plugin = getattr(trainer.strategy, "checkpoint_io", None)
        if stage == "fit" and _is_plugin(plugin):
            warm_up(trainer, plugin)

    ModelCheckpoint.setup = setup  # type: ignore[method-assign]


def warm_up(trainer: Any, plugin: Any) -> None:
    """At setup, on the ranks that will save: start the writer daemon (``process`` mode), and prepare the
    staging buffers after the first optimizer step (stock strategies), so the first save does not wait for
    either. Also hands the plugin the module being trained, for incremental saves of its frozen parameters."""
    from dcp_plugin.lightning.strategies import DCPFSDPStrategy, DCPModelParallelStrategy

    if trainer.lightning_module is not None:
        plugin.watch_module(trainer.lightning_module)

    if isinstance(trainer.strategy, (DCPFSDPStrategy, DCPModelParallelStrategy)):
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


def _is_plugin(plugin: Any) -> bool:
    from dcp_plugin.lightning.checkpoint_io import DCPCheckpointIO

    return isinstance(plugin, DCPCheckpointIO)


def _is_writing(trainer: Any, filepath: Any) -> bool:
    plugin: Any = getattr(trainer.strategy, "checkpoint_io", None)
    if plugin is None or not _is_plugin(plugin):
        return False
    try:
        storage, name = plugin.locate(filepath)
    except (ValueError, TypeError):
        return False
    return inflight.is_writing(storage.url(name))


__all__ = ["install", "warm_up"]
