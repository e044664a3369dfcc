"""``AccelerateCheckpointer``: what ``save_state`` / ``load_state`` do once the adapter is enabled.

One per ``Accelerator``. It owns one :class:`~dcp_plugin.engine.CheckpointEngine` (one save in flight,
one staging buffer, one writer daemon) and a :class:`~dcp_plugin.manager.CheckpointManager` per
directory it saves into, all sharing that engine.

``ProjectConfiguration`` semantics, made safe for asynchronous saves:

* automatic naming writes ``checkpoint_<iteration>`` under ``<project_dir>/checkpoints`` (or the
  configured directory); ``load_state`` restores ``iteration`` so naming continues after a resume, and
  never below the highest existing checkpoint, so a resume never collides with a newer checkpoint;
* ``total_limit`` (or ``keep_last``) counts committed checkpoints only and runs when no save is in
  flight: before a save it keeps ``limit - 1`` (at least 1, so the newest committed checkpoint survives
  until the new one is committed), and when the save is flushed it trims to ``limit``;
* ``load_state()`` without a directory takes the latest *committed* checkpoint.
"""

from __future__ import annotations

import atexit
import logging
import re
import weakref
from typing import Any

from dcp_plugin.accelerate.options import AccelerateOptions
from dcp_plugin.accelerate.state import ACCELERATOR_ENTRY, collect
from dcp_plugin.config import ConfigError
from dcp_plugin.engine import CheckpointEngine
from dcp_plugin.manager import CheckpointManager
from dcp_plugin.storage import CheckpointExistsError, CheckpointInfo, CheckpointNotFoundError, open_url

log = logging.getLogger(__name__)

AUTO_NAME = re.compile(r"^checkpoint_(\d+)$")


def auto_name(iteration: int) -> str:
    """Accelerate's automatic checkpoint name."""
    return f"checkpoint_{iteration}"


def auto_index(name: str) -> int | None:
    match = AUTO_NAME.match(name)
    return int(match.group(1)) if match else None


class AccelerateCheckpointer:
    """DCP-backed ``save_state`` / ``load_state`` for one ``Accelerator``.

    Installed by :func:`dcp_plugin.accelerate.enable`; reach it with ``checkpointer_of(accelerator)``.
    """

    def __init__(self, accelerator: Any, options: AccelerateOptions) -> None:
        self.accelerator = accelerator
        self.options = options
        self.config = options.config
        self.engine = CheckpointEngine(options.config)
        self._managers: dict[str, CheckpointManager] = {}
        self._closed = False
        self._warned_ignored_dir = False
        _flush_at_exit(self)

    # -- where checkpoints go --------------------------------------------------------------------
    @property
    def automatic_naming(self) -> bool:
        """Whether ``save_state()`` names checkpoints itself (ProjectConfiguration or a directory)."""
        return bool(self.accelerator.project_configuration.automatic_checkpoint_naming or self.options.directory)

    @property
    def automatic_directory(self) -> str:
        """The directory or URL holding automatically named checkpoints."""
        if self.options.directory:
            return self.options.directory
        project_dir = self.accelerator.project_configuration.project_dir
        if not project_dir:
            raise ConfigError(
                "automatic_checkpoint_naming needs a project directory: pass "
                "ProjectConfiguration(project_dir=...) "
                "or set DCP_PLUGIN_DIR (a local path or a URL such as s3://bucket/run/checkpoints)."
            )
        return f"{str(project_dir).rstrip('/')}/checkpoints"

    @property
    def keep_last(self) -> int | None:
        """How many committed automatically named checkpoints to keep (``None``: all)."""
        if self.options.keep_last is not None:
            return self.options.keep_last
        return self.accelerator.project_configuration.total_limit

    def manager(self, directory: str) -> CheckpointManager:
        """The manager of one checkpoint directory (created once, sharing this checkpointer's engine)."""
        manager = self._managers.get(directory)
        if manager is None:
            manager = CheckpointManager(directory, engine=self.engine)
            self._managers[directory] = manager
        return manager

    def _explicit(self, path: Any) -> tuple[CheckpointManager, str]:
        storage, name = open_url(str(path), self.config.storage_options)
        return self.manager(storage.root_url), name

    # -- save --------------------------------------------------------------------------------------
    def save_state(self, output_dir: Any = None) -> str:
        """Start a checkpoint of everything ``Accelerator.save_state`` saves; return its URL.

        Returns when the snapshot is taken; the write continues in the background (in ``thread`` or
        ``process`` mode). A failure of an earlier background write is raised here.
        """
        self._check_usable(self.accelerator._save_model_state_pre_hook, "register_save_state_pre_hook")
        self.engine.wait()
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
            manager, name = self.manager(self.automatic_directory), auto_name(iteration)
            limit = self.keep_last
            if limit is not None:
                self._rotate(manager, keep=max(limit - 1, 1))
        elif output_dir is None:
            raise ValueError(
                "save_state() needs an output directory: pass save_state(output_dir), enable "
                "ProjectConfiguration(automatic_checkpoint_naming=True), or set DCP_PLUGIN_DIR."
            )
        else:
            manager, name = self._explicit(output_dir)
        state = collect(self.accelerator, iteration)
        metadata = {
            "iteration": iteration,
            "accelerator_step": int(self.accelerator.step),
            "adapter": "accelerate",
        }
        try:
            # Accelerate overwrites an explicit directory; here the old checkpoint stays until the new
            # one is committed.
            stats = manager.save(iteration, state, name=name, overwrite=not automatic, metadata=metadata)
        except CheckpointExistsError:
            raise CheckpointExistsError(
                f"Checkpoint {manager.storage.url(name)} (iteration {iteration}) already exists. Set "
                "accelerator.project_configuration.iteration to the next free number, or load_state() first "
                "(which continues the numbering)."
            ) from None
        project.iteration = iteration + 1
        return stats.url

    # -- load --------------------------------------------------------------------------------------
    def load_state(self, input_dir: Any = None, *, strict: bool | None = None) -> CheckpointInfo:
        """Load a committed checkpoint into the prepared objects, in place (resharding as needed).

        ``input_dir=None`` takes the latest committed automatically named checkpoint.
        """
        self._check_usable(self.accelerator._load_model_state_pre_hook, "register_load_state_pre_hook")
        self.flush()
        project = self.accelerator.project_configuration
        if input_dir is not None:
            manager, name = self._explicit(input_dir)
        elif self.automatic_naming:
            manager, name = self.manager(self.automatic_directory), None
        else:
            raise ValueError(
                "load_state() needs an input directory: pass load_state(input_dir), or enable "
                "ProjectConfiguration(automatic_checkpoint_naming=True) / set DCP_PLUGIN_DIR to load "
                "the latest."
            )
        state = collect(self.accelerator, int(project.iteration), for_load=True)
        try:
            info = manager.load(state, name=name, strict=strict)
        except CheckpointNotFoundError as err:
            raise CheckpointNotFoundError(
                f"{err} If it was written by Accelerate's own save_state (without dcp-plugin), load it with "
                "DCP_PLUGIN_ENABLE=0 or after dcp_plugin.accelerate.disable(accelerator)."
            ) from None
        saved = state[ACCELERATOR_ENTRY]
        self.accelerator.step = int(saved["step"])
        next_iteration = int(saved["iteration"]) + 1
        if self.automatic_naming:
            highest = self._highest_automatic_index()
            if highest is not None:
                next_iteration = max(next_iteration, highest + 1)
        project.iteration = next_iteration
        return info

    def latest(self) -> CheckpointInfo | None:
        """The latest committed automatically named checkpoint, or ``None`` (same answer on every rank).

        Call it on every rank: it is what ``load_state()`` would load, so a script can resume only if it
        exists.
        """
        if not self.automatic_naming:
            return None
        info = self.manager(self.automatic_directory).latest() if self.engine.is_coordinator else None
        return self.engine.broadcast(info)

    def _highest_automatic_index(self) -> int | None:
        manager = self.manager(self.automatic_directory)
        highest = None
        if self.engine.is_coordinator:
            indices = [auto_index(info.name) for info in manager.list()]
            highest = max((i for i in indices if i is not None), default=None)
        return self.engine.broadcast(highest)

    # -- flushing and retention ------------------------------------------------------------------
    def flush(self) -> None:
        """Wait for the save in flight (raising its error), then apply the retention limit."""
        if self._closed:
            return
        self.engine.wait()
        limit = self.keep_last
        if limit is not None and self.automatic_naming:
            self._rotate(self.manager(self.automatic_directory), keep=limit)

    def _rotate(self, manager: CheckpointManager, keep: int) -> None:
        if not self.engine.is_coordinator:
            return
        automatic = [(auto_index(info.name), info.name) for info in manager.list()]
        numbered = sorted((index, name) for index, name in automatic if index is not None)
        for _, name in numbered[: max(len(numbered) - keep, 0)]:
            log.info("Deleting checkpoint %s (keeping the newest %d).", manager.storage.url(name), keep)
            manager.delete(name=name)

    # -- lifecycle ---------------------------------------------------------------------------------
    def close(self) -> None:
        """Flush the pending save, apply retention, stop the writer; raises a background error."""
        if self._closed:
            return
        try:
            self.flush()
        finally:
            self._closed = True
            self.engine.close()

    @property
    def closed(self) -> bool:
        return self._closed

    def _check_usable(self, hooks: dict, register_name: str) -> None:
        if self._closed:
            raise RuntimeError(
                "dcp-plugin checkpointing for this Accelerator was closed by end_training(); enable "
                "it again with "
                "dcp_plugin.accelerate.enable(accelerator) to save or load."
            )
        if hooks:
            raise ConfigError(
                f"Hooks registered with accelerator.{register_name} are not supported with "
                "dcp-plugin: they write "
                "files into the checkpoint directory, which dcp-plugin creates atomically when the "
                "save commits. "
                "Remove the hooks (register extra state with accelerator.register_for_checkpointing "
                "instead), or "
                "disable dcp-plugin (DCP_PLUGIN_ENABLE=0)."
            )


_live: weakref.WeakSet[AccelerateCheckpointer] = weakref.WeakSet()


def _flush_at_exit(checkpointer: AccelerateCheckpointer) -> None:
    _live.add(checkpointer)


@atexit.register
def _flush_all() -> None:
    """A script that never calls end_training() still gets its last save committed (or its error logged)."""
    for checkpointer in list(_live):
        if checkpointer.closed:
            continue
        try:
            checkpointer.engine.wait()
        except BaseException as err:  # noqa: BLE001 - at exit there is nobody left to raise to
            log.error("The last checkpoint save failed: %s", err)
