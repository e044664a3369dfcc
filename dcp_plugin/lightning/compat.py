"""Where Lightning's own code must see dcp-plugin's saves that are still being written.

``ModelCheckpoint`` picks ``-vN`` names by asking whether a path exists (``file_exists``, decided on rank 0). A
background save becomes visible under its name only when it commits, so without help a second save in the
same name would be chosen while the first is in flight, and would replace it. :func:`install` makes
``file_exists`` also answer yes for a path that the trainer's :class:`DCPCheckpointIO` (or any other instance in
this process) is still writing. Nothing changes for other plugins, or when no write is in flight.

``ModelCheckpoint.setup`` (with a :class:`DCPCheckpointIO`) also hands the plugin the trainer, whose running
stages decide whether a save may run in the background, and (``fit`` only) gets the first save ready, as
``DCPCheckpoint`` does: in ``process`` mode the writer daemon starts in the background, and after the first
optimizer step the staging buffers are allocated in the background, so the first save blocks no longer than
later ones.
"""

from __future__ import annotations

import functools
from typing import Any, Protocol, runtime_checkable

from lightning.pytorch.callbacks import ModelCheckpoint

from dcp_plugin.engine import inflight

_MARK = "__dcp_plugin_sees_writes__"


@runtime_checkable
class BackgroundWriter(Protocol):
    """What the patched methods ask of the trainer's plugin (:class:`~dcp_plugin.lightning.DCPCheckpointIO`)."""

    def locate(self, path: Any) -> tuple[Any, str]:
        """The storage and checkpoint name ``path`` stands for."""

    def attach(self, trainer: Any) -> None:
        """Called at the setup of every stage: the trainer whose saves the plugin writes."""

    def prepare_first_save(self, trainer: Any) -> None:
        """Called at ``fit`` setup: get the first save ready in the background."""


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
        if isinstance(plugin, BackgroundWriter):
            plugin.attach(trainer)
            if stage == "fit":
                plugin.prepare_first_save(trainer)

    ModelCheckpoint.setup = setup  # type: ignore[method-assign]


def _is_writing(trainer: Any, filepath: Any) -> bool:
    plugin: Any = getattr(trainer.strategy, "checkpoint_io", None)
    if not isinstance(plugin, BackgroundWriter):
        return False
    try:
        storage, name = plugin.locate(filepath)
    except (ValueError, TypeError):
        return False
    return inflight.is_writing(storage.url(name))


__all__ = ["BackgroundWriter", "install"]
