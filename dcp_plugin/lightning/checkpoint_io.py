"""``DCPCheckpointIO``: Lightning's checkpoint plugin, writing through dcp-plugin's :class:`Checkpointer`.

Every checkpoint path Lightning hands over (``.../epoch=0-step=100.ckpt``) becomes a checkpoint
*directory* of that name, written with DCP in the background (``thread`` or ``process`` mode) or in the
foreground (``sync``) and committed atomically: a half-written checkpoint is never visible under its
final name, and saving over an existing path keeps the old checkpoint until the new one is committed.

The plugin only translates: Lightning's dict becomes state entries (:mod:`dcp_plugin.lightning.layout`) and
the path Lightning gives goes straight to a :class:`~dcp_plugin.checkpointer.Checkpointer`, one for saves a
lone rank makes (stock strategies save on rank 0) and one for saves every rank joins (sharded strategies).
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal, Optional, Union

import torch
from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO

from dcp_plugin.checkpointer import Checkpointer, locate
from dcp_plugin.config import CheckpointConfig, ConfigError
from dcp_plugin.engine import daemon, inflight
from dcp_plugin.engine.checkpoint_engine import CheckpointEngine
from dcp_plugin.engine.stats import SaveStats
from dcp_plugin.format.state import RNGState
from dcp_plugin.lightning import compat, first_save
from dcp_plugin.lightning import layout as lay
from dcp_plugin.lightning import plugin_support as support
from dcp_plugin.lightning.writers import PluginWriters
from dcp_plugin.storage import CheckpointStorage

if TYPE_CHECKING:
    from dcp_plugin.manager import CheckpointManager

log = logging.getLogger(__name__)


class DCPCheckpointIO(CheckpointIO):
    """Save Lightning checkpoints with PyTorch Distributed Checkpoint, asynchronously and crash-safely.

    ``Trainer(plugins=[DCPCheckpointIO(async_mode="thread")])``. With single-device and DDP training this
    is all; for ``ModelParallelStrategy`` / ``FSDPStrategy`` also pass
    :class:`~dcp_plugin.lightning.DCPModelParallelStrategy` / :class:`~dcp_plugin.lightning.DCPFSDPStrategy`
    so every rank writes its own shards.

    Args (left out: ``DCP_PLUGIN_*`` variables, else the defaults):
        async_mode: ``"sync"`` (write before returning), ``"thread"`` (snapshot, then write in a background
            thread) or ``"process"`` (write in a background daemon process; scripts need an
            ``if __name__ == "__main__":`` guard).
        async_staging: also copy the snapshot in the background; the next optimizer step waits for the copy
            (``None``: on in ``"thread"`` and ``"process"`` mode; ``False``: saves return once it is done).
        reuse_buffers: keep the host staging buffers between saves (faster saves, one copy of the state in
            host memory).
        thread_count: writer threads per rank.
        sync_files: fsync files before a checkpoint is committed.
        strict: on load, any missing, unexpected or differently shaped tensor is an error.
        allow_pickle: store values that are neither tensors nor JSON-like data with pickle (and load them).
            Loading with ``weights_only=False`` also allows reading them.
        storage_options: fsspec options for remote paths (``s3://...``), e.g. ``{"key": ..., "secret": ...}``.
        pinned_memory: stage into page-locked memory (``None``: when CUDA is available).
        shared_memory: stage into shared memory (``None``: in ``process`` mode).
        max_staging_bytes: ``thread`` mode: stage through a fixed host pool of this size (``"512MiB"``), written
            in waves, instead of one host copy of the whole state (see :class:`~dcp_plugin.CheckpointConfig`).
        save_rng: also store every rank's random generator states and restore them when a checkpoint is
            loaded (Lightning's own checkpoint does not include them), so a resumed run repeats the
            uninterrupted one exactly.
    """

    def __init__(
        self,
        async_mode: Optional[Literal["sync", "thread", "process"]] = None,
        *,
        async_staging: Optional[bool] = None,
        reuse_buffers: Optional[bool] = None,
        thread_count: Optional[int] = None,
        sync_files: Optional[bool] = None,
        strict: Optional[bool] = None,
        allow_pickle: Optional[bool] = None,
        storage_options: Optional[dict[str, Any]] = None,
        pinned_memory: Optional[bool] = None,
        shared_memory: Optional[bool] = None,
        max_staging_bytes: Optional[Union[int, str]] = None,
        save_rng: bool = True,
    ) -> None:
        config = CheckpointConfig.resolve(
            async_mode=async_mode,
            async_staging=async_staging,
            reuse_buffers=reuse_buffers,
            thread_count=thread_count,
            sync_files=sync_files,
            strict=strict,
            allow_pickle=allow_pickle,
            storage_options=None if storage_options is None else dict(storage_options),
            pinned_memory=pinned_memory,
            shared_memory=shared_memory,
            max_staging_bytes=max_staging_bytes,
        )
        self._init(config, save_rng)

    @classmethod
    def from_config(cls, config: CheckpointConfig, *, save_rng: bool = True) -> DCPCheckpointIO:
        """Build the plugin from a :class:`CheckpointConfig` (e.g. ``CheckpointConfig.from_env()``)."""
        if not isinstance(config, CheckpointConfig):
            raise TypeError(f"config must be a CheckpointConfig, got {type(config).__name__}.")
        plugin = cls.__new__(cls)
        plugin._init(config, save_rng)
        return plugin

    def _init(self, config: CheckpointConfig, save_rng: bool) -> None:
        if not isinstance(save_rng, bool):
            raise ConfigError(f"save_rng={save_rng!r} must be True or False.")
        self.config = config
        self.save_rng = save_rng
        self.run_id = uuid.uuid4().hex
        """Recorded in the manifest of saves whose checkpoint dict names no run (see ``layout.RUN_ID_KEY``)."""
        self._writers = PluginWriters(config)
        if config.async_mode == "process":
            daemon.check_main_guard()  # now, not at the first save
        compat.install()

    def __getstate__(self) -> dict[str, Any]:
        """Copies and pickles keep the configuration; writers, staging buffers and hooks are not copied."""
        return {"config": self.config, "save_rng": self.save_rng, "run_id": self.run_id}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, _writers=PluginWriters(state["config"]))  # the copy starts fresh

    def __repr__(self) -> str:
        return f"{type(self).__name__}(async_mode={self.config.async_mode!r})"

    # -- Lightning's CheckpointIO interface ------------------------------------------------------
    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | os.PathLike[str], storage_options: Optional[Any] = None
    ) -> SaveStats:
        """Start saving ``checkpoint`` as the directory ``path``; returns once the snapshot is taken.

        ``storage_options``: fsspec options for this save, merged over the plugin's ``storage_options``.
        Errors of the background write are raised by the next save, load, remove or :meth:`teardown`.
        Returns the save's :class:`SaveStats` (Lightning ignores it; filled in when the write commits).
        """
        checkpoint = dict(checkpoint)
        metadata, run_id = lay.pop_manifest_metadata(checkpoint)
        entries, has_extra = lay.split_checkpoint(checkpoint)
        if self.save_rng:
            entries[lay.RNG_ENTRY] = RNGState()
        layout = lay.Layout(kind=lay.FULL, rng=self.save_rng, extra=has_extra)
        step = lay.step_of(checkpoint)
        options: dict[str, Any] = {"storage_options": storage_options, "metadata": metadata, "run_id": run_id}
        frozen_from = self._writers.watched()
        return self.save_entries(path, step, entries, layout, collective=False, frozen_from=frozen_from, **options)

    def load_checkpoint(
        self,
        path: str | os.PathLike[str],
        map_location: Optional[Any] = None,
        weights_only: Optional[bool] = None,
    ) -> dict[str, Any]:
        """Read a checkpoint written by this plugin (any strategy, any number of ranks) as a Lightning dict.

        Tensors are loaded on CPU (``map_location`` may name another device). A plain file written by
        ``torch.save`` (Lightning's default format) is read with ``torch.load``, so runs can move to this
        plugin and resume from their old ``.ckpt`` files. ``weights_only=True`` refuses pickled values;
        ``False`` allows them (only for checkpoints you trust); ``None`` follows ``allow_pickle``.
        """
        storage, name = self.locate(path)
        inflight.wait_for(storage.url(name))  # a save of this path still in flight, by any instance
        if storage.is_file(name):
            return support.load_torch_file(storage, name, map_location, weights_only)
        checkpoint = support.load_dict(self, path, storage, name, allow_pickle=self.allow_pickle_for(weights_only))
        return support.map_tensors(checkpoint, map_location)

    def remove_checkpoint(self, path: str | os.PathLike[str]) -> None:
        """Delete the checkpoint at ``path`` (a missing path is not an error).

        If that checkpoint is still being written, waits for the write first, so it cannot reappear
        after the removal.
        """
        self._writers.remove(self.locate(path))

    def teardown(self) -> None:
        """Wait for the save in flight, release staging buffers and the writer process, and raise any
        error of a background save. The plugin can be used again afterwards."""
        self._writers.close()

    # -- more public API -------------------------------------------------------------------------
    def watch_module(self, module: torch.nn.Module) -> None:
        """Remember (weakly) the module being trained, so saves keep its frozen parameters in shared files
        and refer to them while unchanged (see docs/incremental.md). Called at ``fit`` setup by
        ``ModelCheckpoint`` and :class:`~dcp_plugin.lightning.DCPCheckpoint`; Lightning's checkpoint dict alone
        does not say which tensors are frozen."""
        if not isinstance(module, torch.nn.Module):
            raise TypeError(f"watch_module expects a torch.nn.Module, got {type(module).__name__}.")
        self._writers.watch(module)

    def attach(self, trainer: Any) -> None:
        """Called at every stage's setup (by ``ModelCheckpoint`` and ``DCPCheckpoint``): saves run in the background
        while ``trainer`` runs a stage, whose teardown waits for them, and outside one before ``save`` returns."""
        self._writers.attach(trainer)

    def prepare_first_save(self, trainer: Any) -> None:
        """At ``fit`` setup: start the writer daemon and stage ahead of the first save (see
        :mod:`dcp_plugin.lightning.first_save`); called by ``ModelCheckpoint.setup`` and ``DCPCheckpoint``."""
        first_save.warm_up(trainer, self)

    def checkpointer(self, collective: bool = False) -> Checkpointer:
        """The checkpointer for lone-rank saves (``collective=False``) or saves every rank joins (created on
        first use)."""
        return self._writers.checkpointer(collective)

    def engine(self, collective: bool = False) -> CheckpointEngine:
        """The engine of :meth:`checkpointer`."""
        return self.checkpointer(collective).engine

    def locate(
        self, path: str | os.PathLike[str], storage_options: Optional[Any] = None
    ) -> tuple[CheckpointStorage, str]:
        """``(storage, name)`` of the checkpoint at ``path``; ``storage_options`` are merged over the plugin's."""
        return locate(path, self.config.storage_options, storage_options)

    def allow_pickle_for(self, weights_only: Optional[bool]) -> bool:
        """Lightning's ``weights_only`` as ``allow_pickle`` (``None``: the plugin's ``allow_pickle``)."""
        if weights_only is None:
            return self.config.allow_pickle
        return not weights_only

    def wait(self) -> None:
        """Block until every save in flight is committed; raise the error of one that failed."""
        self._writers.wait()

    def wait_for_staging(self) -> None:
        """With ``async_staging``: block until the snapshot of the save in flight is copied."""
        self._writers.wait_for_staging()

    @property
    def in_flight(self) -> SaveStats | None:
        """The save being written right now, if any."""
        return self._writers.in_flight

    def stats_for(self, path: str | os.PathLike[str]) -> SaveStats | None:
        """The stats of the last save to ``path`` if it was this plugin's latest save (for the caller that
        asked for it; nothing is drained)."""
        storage, name = self.locate(path)
        return self._writers.stats_for(storage.url(name))

    def drain_completed(self) -> list[SaveStats]:
        """Timings of saves finished since the last call; for the plugin's owner (e.g. a logging loop)."""
        return self._writers.drain_completed()

    def manager_for(
        self, directory: str | os.PathLike[str] | CheckpointStorage, *, collective: bool = False
    ) -> CheckpointManager:
        """Deprecated (removed in the next release): use ``CheckpointManager(directory, checkpointer=...)``."""
        return support.deprecated_manager_for(self.checkpointer(collective), directory)

    # -- used by the strategy glue ---------------------------------------------------------------
    def save_entries(
        self,
        path: str | os.PathLike[str],
        step: int,
        entries: Mapping[str, Any],
        layout: lay.Layout,
        *,
        collective: bool,
        storage_options: Optional[Any] = None,
        metadata: Optional[Mapping[str, Any]] = None,
        run_id: Optional[str] = None,
        frozen_from: Sequence[torch.nn.Module] = (),
    ) -> SaveStats:
        """Save prepared entries as the checkpoint directory ``path``.

        What is at ``path`` when the save starts (a committed checkpoint, a link, a ``torch.save`` file) is
        replaced, as Lightning's default plugin would overwrite it, once the new checkpoint commits; a save
        still in flight to ``path`` finishes first. Nothing committed by someone else in the meantime is
        replaced. ``metadata`` (JSON-like) is recorded in the manifest next to the layout, with ``run_id``
        (default: the plugin's). ``frozen_from``: modules whose frozen parameters the entries' tensors may view
        (kept in shared files by incremental saves)."""
        ref = self.locate(path, storage_options)
        return self._writers.save(
            ref,
            entries,
            layout,
            step=step,
            collective=collective,
            metadata=metadata or {},
            run_id=run_id or self.run_id,
            frozen_from=frozen_from,
        )
