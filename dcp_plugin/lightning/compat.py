"""Where Lightning's own code must see dcp-plugin's saves, and the trainer a ``CheckpointIO`` is never given.

``ModelCheckpoint`` picks ``-vN`` names by asking whether a path exists (``file_exists``, decided on rank 0). A
background save becomes visible under its name only when it commits, so without help a second save in the
same name would be chosen while the first is in flight, and would replace it. :func:`install` makes
``file_exists`` also answer yes for a path that the trainer's :class:`DCPCheckpointIO` (or any other instance in
this process) is still writing. Nothing changes for other plugins, or when no write is in flight.

A ``CheckpointIO`` never sees the trainer, yet whether a save may run in the background depends on it: inside a
running stage its teardown waits for the write, outside one nothing would. Every Lightning save goes through
``Trainer.save_checkpoint`` (``ModelCheckpoint``, ``DCPCheckpoint``, SLURM's handler, the user's own calls), so
that method hands the plugin the trainer before the save, with or without a checkpoint callback.
``ModelCheckpoint.setup`` (with a :class:`DCPCheckpointIO`) hands it the trainer too and (``fit`` only) gets the
first save ready, as ``DCPCheckpoint`` does: in ``process`` mode the writer daemon starts in the background, and
after the first optimizer step the staging buffers are allocated in the background, so the first save blocks no
longer than later ones.

Both also look through Lightning's own wrappers (:func:`plugin_of`): ``AsyncCheckpointIO(DCPCheckpointIO())`` is
unwrapped (the plugin already writes in the background; under the wrapper its saves would escape ``fit``'s
teardown and its ``-vN`` naming), and Lightning's own sharded strategies, which bypass the plugin, get a warning.
"""

from __future__ import annotations

import functools
import weakref
from typing import Any, Protocol, runtime_checkable

from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io.async_plugin import AsyncCheckpointIO
from lightning.pytorch.plugins.io.wrapper import _WrappingCheckpointIO
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

from dcp_plugin.engine import inflight

_MARK = "__dcp_plugin_sees_writes__"
_warned: weakref.WeakSet[Any] = weakref.WeakSet()


@runtime_checkable
class BackgroundWriter(Protocol):
    """What the patched methods ask of the trainer's plugin (:class:`~dcp_plugin.lightning.DCPCheckpointIO`)."""

    def locate(self, path: Any) -> tuple[Any, str]:
        """The storage and checkpoint name ``path`` stands for."""

    def attach(self, trainer: Any) -> None:
        """Called at the setup of every stage and before every save: the trainer whose saves the plugin writes."""

    def prepare_first_save(self, trainer: Any) -> None:
        """Called at ``fit`` setup: get the first save ready in the background."""


def install() -> None:
    """Patch ``ModelCheckpoint.file_exists`` / ``setup`` and ``Trainer.save_checkpoint`` (once per process)."""
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
        plugin = plugin_of(trainer)
        if plugin is not None:
            plugin.attach(trainer)
            if stage == "fit":
                plugin.prepare_first_save(trainer)

    ModelCheckpoint.setup = setup  # type: ignore[method-assign]
    original_save = Trainer.save_checkpoint

    @functools.wraps(original_save)
    def save_checkpoint(self: Trainer, *args: Any, **kwargs: Any) -> None:
        plugin = plugin_of(self)
        if plugin is not None:
            plugin.attach(self)
        return original_save(self, *args, **kwargs)

    Trainer.save_checkpoint = save_checkpoint  # type: ignore[method-assign]


def plugin_of(trainer: Any) -> BackgroundWriter | None:
    """The trainer's dcp-plugin ``CheckpointIO``, or ``None`` when it uses another one.

    ``AsyncCheckpointIO`` directly around it is removed from the strategy (with one warning): the plugin already
    writes in the background, and under the wrapper its writes would outlive ``fit`` unwaited (the wrapper never
    calls the plugin's ``teardown``) and ``ModelCheckpoint`` would not see them. Other wrappers stay; the plugin
    under them is found. Lightning's own sharded strategies get one warning when they save without the plugin."""
    strategy = trainer.strategy
    io = getattr(strategy, "checkpoint_io", None)
    plugin = without_async(io)
    if plugin is not io:
        strategy.checkpoint_io = plugin
    plugin = _unwrapped(plugin)
    if plugin is not None:
        _warn_if_bypassed(strategy)
    return plugin


def without_async(io: Any) -> Any:
    """``io``, or the dcp-plugin ``CheckpointIO`` that Lightning's ``AsyncCheckpointIO`` ``io`` wraps (warned once)."""
    if not (isinstance(io, AsyncCheckpointIO) and isinstance(io.checkpoint_io, BackgroundWriter)):
        return io
    plugin = io.checkpoint_io
    _warn_once(
        plugin,
        "AsyncCheckpointIO(DCPCheckpointIO(...)) is redundant: DCPCheckpointIO already writes in the background "
        "(async_mode='thread' or 'process'). The wrapper was removed so that fit waits for the last write and "
        "raises its error, and ModelCheckpoint sees saves in flight; pass plugins=[DCPCheckpointIO(...)] alone.",
    )
    return plugin


def _unwrapped(io: Any) -> BackgroundWriter | None:
    while isinstance(io, _WrappingCheckpointIO):
        inner = io.checkpoint_io
        if isinstance(io, AsyncCheckpointIO) and _unwrapped(inner) is not None:
            raise TypeError(
                "A DCPCheckpointIO is wrapped in AsyncCheckpointIO inside another CheckpointIO wrapper; its saves "
                "would outlive fit unwaited. DCPCheckpointIO writes in the background itself: remove the "
                "AsyncCheckpointIO."
            )
        io = inner
    return io if isinstance(io, BackgroundWriter) else None


def _warn_if_bypassed(strategy: Any) -> None:
    """Lightning's ``ModelParallelStrategy`` (``save_distributed_checkpoint=True``, its default) and ``FSDPStrategy``
    (``state_dict_type="sharded"``) write sharded checkpoints with their own synchronous ``dcp.save``, never
    calling the plugin. The DCP strategies (``saves_collectively``) route them through it."""
    if getattr(strategy, "saves_collectively", False):
        return
    if isinstance(strategy, ModelParallelStrategy) and getattr(strategy, "_save_distributed_checkpoint", True):
        ours, what = "DCPModelParallelStrategy", "save_distributed_checkpoint=True"
    elif isinstance(strategy, FSDPStrategy) and getattr(strategy, "_state_dict_type", "sharded") == "sharded":
        ours, what = "DCPFSDPStrategy", 'state_dict_type="sharded"'
    else:
        return
    _warn_once(
        strategy,
        f"Lightning's {type(strategy).__name__} with {what} saves its sharded checkpoints with its own synchronous "
        f"dcp.save and never calls DCPCheckpointIO: they are written without dcp-plugin (not in the background, "
        f"not committed atomically). Use strategy={ours}(...) (same arguments) to write them through the plugin.",
    )


def _warn_once(owner: Any, message: str) -> None:
    if owner not in _warned:
        _warned.add(owner)
        rank_zero_warn(message)


def _is_writing(trainer: Any, filepath: Any) -> bool:
    plugin = plugin_of(trainer)
    if plugin is None:
        return False
    try:
        storage, name = plugin.locate(filepath)
    except (ValueError, TypeError):
        return False
    return inflight.is_writing(storage.url(name))


__all__ = ["BackgroundWriter", "install", "plugin_of", "without_async"]
