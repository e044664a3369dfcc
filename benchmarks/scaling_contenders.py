"""What the scaling benchmark compares, on every rank of a job: dcp-plugin and plain DCP, each driven the way a
user would (their defaults), saving and restoring a state of plain tensors or DTensors.

Like ``benchmarks/contenders.py`` for the single-process benchmarks, this is where the scaling benchmark calls
``dcp.save``, ``dcp.async_save`` and ``dcp.load`` directly: they are what dcp-plugin is compared with.

Each contender is a :class:`Saver` (``start`` returns when the training loop may go on, ``staged`` when the
snapshot is copied, ``finish`` when the checkpoint is written and committed) or a :class:`Restorer`.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

SAVERS = ("plugin_sync", "plugin_thread", "dcp_save", "dcp_async")
"""Save contenders: dcp-plugin ``async_mode="sync"`` and its default (a writer thread, the snapshot copied in the
background), ``dcp.save`` and ``dcp.async_save`` with their defaults."""
RESTORERS = ("plugin_load", "dcp_load")
"""Restore contenders: ``CheckpointManager.load`` and ``dcp.load``, in place, into the live tensors."""
BACKGROUND = ("plugin_thread", "dcp_async")
"""Savers whose write goes on after ``start`` returns."""
SAVED_BY = {"plugin_load": "plugin_sync", "dcp_load": "dcp_save"}
"""Which saver's last checkpoint each restorer reads."""
LABELS = {
    "plugin_sync": "dcp-plugin, sync",
    "plugin_thread": "dcp-plugin, thread (default)",
    "dcp_save": "dcp.save",
    "dcp_async": "dcp.async_save",
    "plugin_load": "dcp-plugin load",
    "dcp_load": "dcp.load",
}
"""How each contender is named in tables and charts."""


@dataclass
class Saver:
    """One way of saving, on one rank."""

    start: Callable[[int], None]
    """Begin the save of ``step``; returns when the caller may change the state (or must wait in ``staged``)."""
    staged: Callable[[], None]
    """Block until the snapshot is copied (no-op when ``start`` copied it already)."""
    finish: Callable[[], None]
    """Block until the checkpoint is written and committed."""
    delete: Callable[[int], None]
    """Delete the checkpoint of ``step`` (called on every rank; the coordinator deletes)."""
    close: Callable[[], None]


@dataclass
class Restorer:
    """One way of restoring, on one rank."""

    load: Callable[[], None]
    """Load the latest checkpoint into the live state, in place."""
    close: Callable[[], None]


def saver(name: str, directory: str, state: dict[str, Any]) -> Saver:
    """The saver ``name`` (one of :data:`SAVERS`), writing under ``directory``, saving ``state``."""
    os.makedirs(directory, exist_ok=True)
    if name.startswith("plugin_"):
        return _plugin_saver(name.removeprefix("plugin_"), directory, state)
    return _dcp_saver(asynchronous=name == "dcp_async", directory=directory, state=state)


def restorer(name: str, directory: str, state: dict[str, Any]) -> Restorer:
    """The restorer ``name`` (one of :data:`RESTORERS`), reading the latest checkpoint under ``directory`` into
    ``state`` in place. Made once per job, as a restarted job makes its checkpoint manager once."""
    if name == "plugin_load":
        from dcp_plugin import CheckpointManager

        manager = CheckpointManager(directory)
        return Restorer(load=lambda: manager.load(state), close=manager.close)

    import torch.distributed.checkpoint as dcp

    return Restorer(load=lambda: dcp.load(state, checkpoint_id=_latest(directory)), close=lambda: None)


def _plugin_saver(mode: str, directory: str, state: dict[str, Any]) -> Saver:
    from dcp_plugin import CheckpointManager

    manager = CheckpointManager(directory, async_mode=mode)
    return Saver(
        start=lambda step: manager.save(step, state),
        staged=manager.wait_for_staging,
        finish=manager.wait,
        delete=lambda step: manager.delete(step),
        close=manager.close,
    )


def _dcp_saver(*, asynchronous: bool, directory: str, state: dict[str, Any]) -> Saver:
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    pending: list[Any] = []

    def path(step: int) -> str:
        return os.path.join(directory, f"step_{step:09d}")

    def start(step: int) -> None:
        if asynchronous:
            pending.append(dcp.async_save(state, checkpoint_id=path(step)))
        else:
            dcp.save(state, checkpoint_id=path(step))

    def finish() -> None:
        while pending:
            pending.pop().result()

    def delete(step: int) -> None:
        if not dist.is_initialized() or dist.get_rank() == 0:
            shutil.rmtree(path(step), ignore_errors=True)

    return Saver(start=start, staged=lambda: None, finish=finish, delete=delete, close=finish)


def _latest(directory: str) -> str:
    names = sorted(name for name in os.listdir(directory) if name.startswith("step_"))
    return os.path.join(directory, names[-1])


__all__ = ["BACKGROUND", "LABELS", "RESTORERS", "SAVED_BY", "SAVERS", "Restorer", "Saver", "restorer", "saver"]
