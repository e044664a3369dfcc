"""The checkpointers a ``DCPCheckpointIO`` owns, and the one path every save of the plugin takes through them.

A plugin writes through two :class:`~dcp_plugin.checkpointer.Checkpointer` objects, each created on first use:
one for saves a lone rank makes (stock strategies save on global rank 0) and one for saves every rank joins
(the sharded DCP strategies). :class:`PluginWriters` holds them, answers for all of them (wait, stats, what is
in flight) and closes them; the plugin itself only translates Lightning's dict and paths.

Saves run in the background only while the trainer that set the plugin up runs a stage (``fit``, ``validate``,
...): its teardown then waits for them. A save outside a running stage (``trainer.save_checkpoint`` after
``fit``) has no teardown to come, so it is written before the call returns, as Lightning's default plugin writes
it, and leaves no thread behind. A plugin that is garbage-collected first waits for its saves in flight.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from lightning.pytorch.trainer.states import TrainerStatus

from dcp_plugin.checkpointer import Checkpointer
from dcp_plugin.config import CheckpointConfig
from dcp_plugin.engine import inflight
from dcp_plugin.engine.stats import SaveStats
from dcp_plugin.errors import CheckpointNotFoundError
from dcp_plugin.lightning import layout as lay
from dcp_plugin.lightning import plugin_support as support
from dcp_plugin.lightning.logged_models import LoggedModels
from dcp_plugin.lightning.nodes import NodeDirectories
from dcp_plugin.storage import CheckpointStorage

log = logging.getLogger(__name__)


class PluginWriters:
    """The checkpointers of one plugin (lone-rank and collective saves), created on first use."""

    def __init__(self, config: CheckpointConfig) -> None:
        self.config = config
        self._checkpointers: dict[_Kind, Checkpointer] = {}
        self._step_hook: Any = None
        self._module: weakref.ref[torch.nn.Module] | None = None
        self._trainer: weakref.ref[Any] | None = None
        self._models = LoggedModels()
        self.nodes = NodeDirectories(lambda: self.checkpointer(True))
        """With ``local_scope="node"``: the directories whose checkpoints are found and loaded across the nodes."""
        finalizer = weakref.finalize(self, _flush_forgotten, self._checkpointers)
        finalizer.atexit = False  # at exit, the engines' own exit-time flush runs

    def checkpointer(self, collective: bool, *, foreground: bool = False) -> Checkpointer:
        """The checkpointer for lone-rank saves (``collective=False``) or saves every rank joins;
        ``foreground``: one that writes before ``save`` returns (the plugin's own one in ``sync`` mode)."""
        kind = _Kind(collective, foreground and self.config.is_async)
        checkpointer = self._checkpointers.get(kind)
        if checkpointer is None:
            config = self.config.replace(async_mode="sync", async_staging=None, max_staging_bytes=None)
            checkpointer = Checkpointer(
                config if kind.foreground else self.config, distributed=None if collective else False
            )
            self._checkpointers[kind] = checkpointer
        return checkpointer

    def attach(self, trainer: Any) -> None:
        """Remember (weakly) the trainer whose stages decide whether a save may run in the background."""
        self._trainer = weakref.ref(trainer)
        self._models.attach(trainer)

    def _upload_models(self, *, note: bool = False, final: bool = False) -> None:
        """Hand the committed checkpoints to the trainer's loggers that asked for models (``log_model``); ``note``:
        first note what a save that just started makes them expect."""
        trainer = None if self._trainer is None else self._trainer()
        if trainer is not None:
            if note or final:
                self._models.note(trainer, final=final)
            self._models.upload(final=final)

    def _outside_run(self) -> bool:
        """Whether the attached trainer runs no stage now, so no teardown will wait for a background save."""
        trainer = None if self._trainer is None else self._trainer()
        return trainer is not None and trainer.state.status != TrainerStatus.RUNNING

    def watch(self, module: torch.nn.Module) -> None:
        """Remember (weakly) the module being trained: saves may keep its frozen parameters in shared files."""
        self._module = weakref.ref(module)

    def watched(self) -> tuple[torch.nn.Module, ...]:
        """The module being trained, if it was given and is still alive."""
        module = None if self._module is None else self._module()
        return () if module is None else (module,)

    def all(self) -> list[Checkpointer]:
        """The checkpointers created so far."""
        return list(self._checkpointers.values())

    def save(
        self,
        ref: tuple[CheckpointStorage, str],
        entries: Mapping[str, Any],
        layout: lay.Layout,
        *,
        step: int,
        collective: bool,
        metadata: Mapping[str, Any],
        run_id: str,
        frozen_from: Sequence[torch.nn.Module],
    ) -> SaveStats:
        """Save ``entries`` as ``ref`` once the previous save and any other writer of that path are done;
        ``layout`` is recorded in the manifest next to ``metadata``. With background staging, every optimizer
        waits for the copy of the snapshot before it steps (a hook installed at the first save)."""
        storage, name = ref
        if self.config.stages_in_background and self._step_hook is None:
            self._step_hook = support.wait_for_staging_before_optimizer_steps(self)
        foreground = self._outside_run()
        if foreground:
            self.wait()  # the background saves of the stage before come first
        checkpointer = self.checkpointer(collective, foreground=foreground)
        checkpointer.wait()
        self._upload_models()  # the previous save is committed
        inflight.wait_for(storage.url(name))
        stats = checkpointer.save(
            ref,
            entries,
            step=step,
            overwrite=storage.is_occupied(name),
            metadata={**dict(metadata), lay.LAYOUT_KEY: layout.to_json()},
            run_id=run_id,
            frozen_from=frozen_from,
        )
        if checkpointer.groups.is_coordinator:
            support.log_save(stats, "sync" if foreground else self.config.async_mode)
        self._upload_models(note=True)
        return stats

    def wait(self) -> None:
        """Block until every save in flight is committed; raise the error of one that failed."""
        for checkpointer in self.all():
            checkpointer.wait()

    def wait_for_staging(self) -> None:
        """With ``async_staging``: block until the snapshot of the save in flight is copied."""
        for checkpointer in self.all():
            checkpointer.wait_for_staging()

    def remove(self, ref: tuple[CheckpointStorage, str]) -> None:
        """Delete a checkpoint (nothing there is not an error) once no save is writing it."""
        storage, name = ref
        url = storage.url(name)
        support.wait_for_write(self.all(), url)
        self._upload_models()  # before it is gone, as the loggers would have uploaded it
        try:
            storage.delete(name)
        except CheckpointNotFoundError:
            log.debug("Nothing to remove at %s", url)

    @property
    def in_flight(self) -> SaveStats | None:
        """The save being written right now, if any."""
        return next((c.in_flight for c in self.all() if c.in_flight is not None), None)

    def stats_for(self, url: str) -> SaveStats | None:
        """The stats of the last save to ``url`` if it was the latest save of one of these checkpointers."""
        found = [c.last_stats for c in self.all() if c.last_stats is not None]
        return next((stats for stats in found if stats.url == url), None)

    def drain_completed(self) -> list[SaveStats]:
        """Timings of saves finished since the last call."""
        return [stats for c in self.all() for stats in c.drain_completed()]

    def close(self) -> None:
        """Wait for the saves in flight, release every checkpointer and the optimizer hook; raise the first
        background error. New checkpointers are created if the plugin is used again."""
        checkpointers = self.all()
        try:
            self.nodes.close()  # the copies to peers and to the remote tier, on every rank
        finally:
            self._checkpointers.clear()  # the same dict the garbage-time flush holds
            if self._step_hook is not None:
                self._step_hook.remove()
                self._step_hook = None
            support.close_all(checkpointers)
        self._upload_models(final=True)


@dataclass(frozen=True)
class _Kind:
    collective: bool
    foreground: bool


def _flush_forgotten(checkpointers: dict[_Kind, Checkpointer]) -> None:
    """A plugin was garbage-collected: let its saves in flight commit and release its checkpointers; an error of
    theirs can no longer be raised to anyone, so it is logged."""
    found = list(checkpointers.values())
    checkpointers.clear()
    try:
        support.close_all(found)
    except BaseException as err:  # noqa: BLE001 - nobody is left to raise to
        log.error("A checkpoint save of a DCPCheckpointIO that was garbage-collected failed: %s", err)


__all__ = ["PluginWriters"]
