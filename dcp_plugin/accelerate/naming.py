"""Accelerate's automatically named checkpoints (``ProjectConfiguration(automatic_checkpoint_naming=True)``):
``checkpoint_<iteration>`` under ``<project_dir>/checkpoints`` (or the configured directory), how many of them
are kept, the manager that keeps them, and which is the latest."""

from __future__ import annotations

import re
import uuid
import warnings
from collections.abc import Callable
from typing import Any, TypeVar

from dcp_plugin.accelerate.options import AccelerateOptions
from dcp_plugin.checkpointer import Checkpointer
from dcp_plugin.config import ConfigError
from dcp_plugin.manager import CheckpointManager
from dcp_plugin.policies.retention import KeepLast
from dcp_plugin.policies.schedule import Schedule
from dcp_plugin.storage import CheckpointInfo

AUTO_NAME = re.compile(r"^checkpoint_(\d+)$")
_T = TypeVar("_T")


def auto_name(iteration: int) -> str:
    """Accelerate's automatic checkpoint name."""
    return f"checkpoint_{iteration}"


def auto_index(name: str) -> int | None:
    """The iteration of an automatically named checkpoint (``checkpoint_7`` -> 7); ``None`` for other names."""
    match = AUTO_NAME.match(name)
    return int(match.group(1)) if match else None


class AutomaticCheckpoints:
    """The automatically named checkpoints of one ``Accelerator``: the part of
    :class:`~dcp_plugin.accelerate.AccelerateCheckpointer` that knows where they go and which to keep."""

    accelerator: Any
    options: AccelerateOptions
    checkpointer: Checkpointer
    _automatic: CheckpointManager | None

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

    def automatic_manager(self) -> CheckpointManager:
        """The manager of the automatically named checkpoints (created once, over this checkpointer)."""
        if self._automatic is None:
            limit = self.keep_last
            retention = KeepLast(limit) if limit is not None else None
            schedule = Schedule(retention=retention, run_id=uuid.uuid4().hex, owned=_automatically_named)
            self._automatic = CheckpointManager(
                self.automatic_directory,
                checkpointer=self.checkpointer,
                schedule=schedule,
                **self.options.remote.manager_options(),
            )
        return self._automatic

    def manager(self, directory: str) -> CheckpointManager:
        """Deprecated (removed in the next release): use :meth:`automatic_manager`, or
        ``CheckpointManager(directory, checkpointer=self.checkpointer)``."""
        warnings.warn(
            "AccelerateCheckpointer.manager() is deprecated: use automatic_manager() or "
            "CheckpointManager(directory, checkpointer=checkpointer.checkpointer).",
            DeprecationWarning,
            stacklevel=2,
        )
        if directory == self.automatic_directory:
            return self.automatic_manager()
        return CheckpointManager(directory, checkpointer=self.checkpointer)

    def latest(self) -> CheckpointInfo | None:
        """The latest committed automatically named checkpoint, or ``None`` (same answer on every rank).

        Call it on every rank: it is what ``load_state()`` would load, so a script can resume only if it
        exists.
        """
        if not self.automatic_naming:
            return None
        manager = self.automatic_manager()  # built by every rank (collectively)
        return self._agreed(manager.latest)

    def _highest_automatic_index(self) -> int | None:
        manager = self.automatic_manager()

        def highest() -> int | None:
            indices = [auto_index(info.name) for info in manager.list()]
            return max((i for i in indices if i is not None), default=None)

        return self._agreed(highest)

    def _agreed(self, ask: Callable[[], _T]) -> _T:
        """``ask()`` on the coordinator, broadcast; on node-local disks every rank asks (listing is collective)."""
        groups = self.checkpointer.groups
        if self.automatic_manager().nodes is not None:
            return ask()
        return groups.broadcast(ask() if groups.is_coordinator else None)


def _automatically_named(info: CheckpointInfo) -> bool:
    """``total_limit`` counts every automatically named checkpoint of the directory, of any run."""
    return auto_index(info.name) is not None


__all__ = ["AUTO_NAME", "AutomaticCheckpoints", "auto_index", "auto_name"]
