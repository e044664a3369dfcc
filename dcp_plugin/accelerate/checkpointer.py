"""``AccelerateCheckpointer``: what ``save_state`` / ``load_state`` do once the adapter is enabled.

One per ``Accelerator``. It translates between the ``Accelerator`` and the core: it owns one
:class:`~dcp_plugin.checkpointer.Checkpointer` (one save in flight, one staging buffer, one writer daemon)
for every save and load, and, for automatically named checkpoints, a
:class:`~dcp_plugin.manager.CheckpointManager` over that checkpointer whose
:class:`~dcp_plugin.policies.schedule.Schedule` applies ``total_limit`` as a ``KeepLast`` retention.

``ProjectConfiguration`` semantics, made safe for asynchronous saves:

* automatic naming writes ``checkpoint_<iteration>`` under ``<project_dir>/checkpoints`` (or the
  configured directory); ``load_state`` restores ``iteration`` so naming continues after a resume, and
  never below the highest existing checkpoint, so a resume never collides with a newer checkpoint;
* ``total_limit`` (or ``keep_last``) counts committed automatically named checkpoints only (of any run) and
  is applied once a save committed (before the next save starts, and when the save is flushed); the
  newest committed checkpoint is never deleted;
* ``load_state()`` without a directory takes the latest *committed* checkpoint.
"""

from __future__ import annotations

import logging
from typing import Any

from dcp_plugin.accelerate import hooks, not_found
from dcp_plugin.accelerate.metrics import SaveMetrics
from dcp_plugin.accelerate.naming import AutomaticCheckpoints, auto_name
from dcp_plugin.accelerate.options import AccelerateOptions
from dcp_plugin.accelerate.state import ACCELERATOR_ENTRY, collect
from dcp_plugin.checkpointer import Checkpointer
from dcp_plugin.engine.checkpoint_engine import CheckpointEngine
from dcp_plugin.errors import CheckpointExistsError, CheckpointNotFoundError
from dcp_plugin.manager import CheckpointManager
from dcp_plugin.storage import CheckpointInfo

log = logging.getLogger(__name__)


class AccelerateCheckpointer(AutomaticCheckpoints):
    """DCP-backed ``save_state`` / ``load_state`` for one ``Accelerator``.

    Installed by :func:`dcp_plugin.accelerate.enable`; reach it with ``checkpointer_of(accelerator)``.
    """

    def __init__(self, accelerator: Any, options: AccelerateOptions) -> None:
        self.accelerator = accelerator
        """The ``Accelerator`` whose ``save_state`` / ``load_state`` this serves."""
        self.options = options
        """Where automatically named checkpoints go, how many to keep, the remote tier."""
        self.config = options.config
        """How checkpoints are written and read (``options.config``)."""
        self._checkpointer: Checkpointer | None = None
        self._automatic: CheckpointManager | None = None
        self._closed = False
        self._warned_ignored_dir = False
        self.metrics = SaveMetrics(options.log_metrics)
        """Committed saves for the ``Accelerator``'s trackers (``accelerator.log``)."""
        self.installed_automatically = False
        """Installed by ``DCP_PLUGIN_ENABLE=1`` (zero-code); a script's own ``enable()`` replaces it."""

    @property
    def checkpointer(self) -> Checkpointer:
        """The :class:`Checkpointer` every save and load of this ``Accelerator`` goes through (created on
        first use)."""
        if self._checkpointer is None:
            self._checkpointer = Checkpointer(self.config)
        return self._checkpointer

    @property
    def engine(self) -> CheckpointEngine:
        """The engine under :attr:`checkpointer` (creates the checkpointer on first use)."""
        return self.checkpointer.engine

    # -- copying -----------------------------------------------------------------------------------
    def __getstate__(self) -> dict[str, Any]:
        """Pickling and ``copy.deepcopy`` keep the options, not the runtime: no writer, no save in flight.

        The copy starts fresh (its checkpointer is created on first use); a save in flight stays with the
        original."""
        state = dict(self.__dict__)
        state["_checkpointer"] = None
        state["_automatic"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    # -- save --------------------------------------------------------------------------------------
    def save_state(self, output_dir: Any = None) -> str:
        """Start a checkpoint of everything ``Accelerator.save_state`` saves; return its URL.

        Returns when the snapshot is taken; the write continues in the background (in ``thread`` or
        ``process`` mode). A failure of an earlier background write is raised here.
        """
        self._check_usable()
        self.checkpointer.wait()
        self.metrics.log_committed(self.accelerator)
        project = self.accelerator.project_configuration
        iteration = int(project.iteration)
        automatic = self.automatic_naming and (output_dir is None or project.automatic_checkpoint_naming)
        if automatic:
            if output_dir is not None and not self._warned_ignored_dir:
                log.warning(
                    "save_state(%r): automatic_checkpoint_naming is on, so (as in Accelerate) the "
                    "checkpoint goes "
                    "to %s instead.",
                    output_dir,
                    self.automatic_directory,
                )
                self._warned_ignored_dir = True
            ref = None
        elif output_dir is None:
            raise ValueError(
                "save_state() needs an output directory: pass save_state(output_dir), enable "
                "ProjectConfiguration(automatic_checkpoint_naming=True), or set DCP_PLUGIN_DIR."
            )
        else:
            ref = self.checkpointer.locate(str(output_dir))
        models, hook_files = hooks.run_save_hooks(self.accelerator, self.checkpointer.groups.all_gather)
        state = collect(self.accelerator, iteration, models=models, hook_files=hook_files)
        metadata = {
            "iteration": iteration,
            "accelerator_step": int(self.accelerator.step),
            "adapter": "accelerate",
        }
        try:
            if ref is None:
                stats = self.automatic_manager().save(iteration, state, name=auto_name(iteration), metadata=metadata)
            else:
                # Accelerate overwrites an explicit directory; here the old checkpoint stays until the new
                # one is committed.
                stats = self.checkpointer.save(ref, state, step=iteration, overwrite=True, metadata=metadata)
        except CheckpointExistsError:
            raise CheckpointExistsError(
                f"Checkpoint {self.automatic_manager().storage.url(auto_name(iteration))} (iteration {iteration}) "
                "already exists. Set "
                "accelerator.project_configuration.iteration to the next free number, or load_state() first "
                "(which continues the numbering)."
            ) from None
        project.iteration = iteration + 1
        self.metrics.started(stats, self.accelerator)
        return stats.url

    # -- load --------------------------------------------------------------------------------------
    def load_state(self, input_dir: Any = None, *, strict: bool | None = None) -> CheckpointInfo:
        """Load a committed checkpoint into the prepared objects, in place (resharding as needed).

        ``input_dir=None`` takes the latest committed automatically named checkpoint.
        """
        self._check_usable()
        self.flush()
        project = self.accelerator.project_configuration
        if input_dir is None and not self.automatic_naming:
            raise ValueError(
                "load_state() needs an input directory: pass load_state(input_dir), or enable "
                "ProjectConfiguration(automatic_checkpoint_naming=True) / set DCP_PLUGIN_DIR to load "
                "the latest."
            )
        hook_dir = None
        try:
            try:
                if self.accelerator._load_model_state_pre_hook:
                    ref, models, hook_dir = hooks.prepare_load(self, input_dir)
                    state = collect(self.accelerator, int(project.iteration), for_load=True, models=models)
                    info = self._load(ref, state, strict)
                else:
                    state = collect(self.accelerator, int(project.iteration), for_load=True)
                    if input_dir is not None:
                        info = self._load(self.checkpointer.locate(str(input_dir)), state, strict)
                    else:
                        info = self.automatic_manager().load(state, strict=strict)
            except CheckpointNotFoundError as err:
                if input_dir is None:
                    raise not_found.explain(err, self.automatic_manager().storage, None) from None
                raise not_found.explain(err, *self.checkpointer.locate(str(input_dir))) from None
        finally:
            hooks.cleanup(hook_dir)
        saved = state[ACCELERATOR_ENTRY]
        self.accelerator.step = int(saved["step"])
        next_iteration = int(saved["iteration"]) + 1
        if self.automatic_naming:
            highest = self._highest_automatic_index()
            if highest is not None:
                next_iteration = max(next_iteration, highest + 1)
        project.iteration = next_iteration
        return info

    def _load(self, ref: tuple[Any, str], state: dict[str, Any], strict: bool | None) -> CheckpointInfo:
        """Load checkpoint ``ref``; on node-local disks through a manager of its directory, which restores each file
        from the node that holds it (collective, as ``load_state`` is)."""
        if self.config.local_scope != "node":
            return self.checkpointer.load(ref, state, strict=strict)
        storage, name = ref
        with CheckpointManager(storage.root_url, checkpointer=self.checkpointer) as manager:
            return manager.load(state, name=name, strict=strict)

    def read(self, ref: tuple[Any, str], entries: list[str]) -> dict[str, Any]:
        """Read some entries of checkpoint ``ref`` without live objects (on node-local disks: as :meth:`_load`)."""
        if self.config.local_scope != "node":
            return self.checkpointer.read(ref, entries=entries)
        storage, name = ref
        with CheckpointManager(storage.root_url, checkpointer=self.checkpointer) as manager:
            return manager.read(name=name, entries=entries)

    # -- flushing and retention ------------------------------------------------------------------
    def flush(self) -> None:
        """Wait for the save in flight (raising its error), then apply the retention limit."""
        if self._closed or self._checkpointer is None:
            return  # nothing was saved through this checkpointer yet
        self.checkpointer.wait()
        self.metrics.log_committed(self.accelerator)
        if self.automatic_naming:
            self.automatic_manager().wait()

    # -- lifecycle ---------------------------------------------------------------------------------
    def close(self) -> None:
        """Flush the pending save, apply retention, stop the writer; raises a background error."""
        if self._closed:
            return
        try:
            self.flush()
            if self._automatic is not None:
                self._automatic.close()  # with a remote tier: waits for the copies
        finally:
            self._closed = True
            if self._checkpointer is not None:
                self._checkpointer.close()

    @property
    def closed(self) -> bool:
        """Whether ``end_training()`` or :meth:`close` shut this down (later saves raise)."""
        return self._closed

    def _check_usable(self) -> None:
        if self._closed:
            raise RuntimeError(
                "dcp-plugin checkpointing for this Accelerator was closed by end_training(); enable "
                "it again with "
                "dcp_plugin.accelerate.enable(accelerator) to save or load."
            )
