"""Use checkpoint directories outside a Trainer: build a LightningModule from one, or convert one to a file.

``LightningModule.load_from_checkpoint`` reads files with ``torch.load`` and raises ``IsADirectoryError``
on the directories this plugin writes (Lightning has no hook to change that). :func:`load_lightning_module` is
its counterpart for them; :func:`to_lightning_file` writes the single ``.ckpt`` file that
``load_from_checkpoint`` and ``torch.load`` read.
"""

from __future__ import annotations

import os
from typing import Any, Optional, TypeVar

import lightning.pytorch as pl

from dcp_plugin.export.exporter import register_format
from dcp_plugin.lightning.checkpoint_io import DCPCheckpointIO

ModuleT = TypeVar("ModuleT", bound=pl.LightningModule)


def load_lightning_module(
    cls: type[ModuleT],
    path: str | os.PathLike[str],
    *,
    map_location: Optional[Any] = None,
    strict: Optional[bool] = None,
    weights_only: Optional[bool] = None,
    storage_options: Optional[dict[str, Any]] = None,
    **hparams: Any,
) -> ModuleT:
    """Build ``cls`` from the hyper-parameters saved in the checkpoint at ``path`` and load its weights.

    Works for checkpoints of any strategy and number of ranks (sharded weights are assembled into full
    tensors) and for plain ``.ckpt`` files. ``hparams`` override saved hyper-parameters, as with
    ``load_from_checkpoint``. ``map_location`` is a device (default: CPU).
    """
    from lightning.pytorch.core.saving import _load_state

    if not (isinstance(cls, type) and issubclass(cls, pl.LightningModule)):
        raise TypeError(f"cls must be a LightningModule subclass, got {cls!r}.")
    plugin = DCPCheckpointIO(storage_options=storage_options, save_rng=False)
    try:
        checkpoint = plugin.load_checkpoint(path, map_location=map_location, weights_only=weights_only)
    finally:
        plugin.teardown()
    checkpoint.setdefault(cls.CHECKPOINT_HYPER_PARAMS_KEY, {})
    checkpoint[cls.CHECKPOINT_HYPER_PARAMS_KEY].update(hparams)
    module = _load_state(cls, checkpoint, strict=strict, **hparams)
    if map_location is not None and not callable(map_location) and not isinstance(map_location, dict):
        module = module.to(map_location)
    return module  # type: ignore[return-value]


def to_lightning_file(
    path: str | os.PathLike[str],
    output: str | os.PathLike[str],
    *,
    weights_only: Optional[bool] = None,
    storage_options: Optional[dict[str, Any]] = None,
    output_options: Optional[dict[str, Any]] = None,
) -> str:
    """Write the checkpoint directory at ``path`` as one Lightning ``.ckpt`` file at ``output``; returns ``output``.

    The file holds what Lightning's default plugin would have written (weights, optimizer and scheduler
    states, loops, callbacks, hyper-parameters, hook-added keys; sharded checkpoints are assembled into full
    tensors), so ``MyModule.load_from_checkpoint(output)``, ``Trainer.fit(ckpt_path=output)`` and
    ``torch.load(output)`` accept it. The random-generator states dcp-plugin adds are not part of it.
    ``weights_only=False`` also converts pickled values (only for checkpoints you trust). ``output`` (a path or
    fsspec URL, with ``output_options``, by default ``storage_options``) appears complete or not at all.
    """
    import torch

    from dcp_plugin.export.output import open_output

    plugin = DCPCheckpointIO(async_mode="sync", storage_options=storage_options, save_rng=False)
    try:
        checkpoint = plugin.load_checkpoint(path, weights_only=weights_only)
    finally:
        plugin.teardown()
    target = os.fspath(output)
    with open_output(target, output_options if output_options is not None else storage_options) as handle:
        torch.save(checkpoint, handle)
    return target


register_format("lightning", to_lightning_file)
