"""The plugin's checkpoint directories on node-local disks (``local_scope="node"``).

On node-local disks a checkpoint is complete only across the nodes, so finding one and loading it is collective:
every rank asks, and each file is read from the node that holds it. The plugin keeps one
:class:`~dcp_plugin.manager.CheckpointManager` per directory for that (created collectively at its first use,
on the plugin's collective checkpointer), which :class:`~dcp_plugin.lightning.DCPCheckpoint` also uses for its
retention, its copies to peer nodes and its remote tier: one set of copies per directory.
"""

from __future__ import annotations

from collections.abc import Callable, MutableMapping
from typing import TYPE_CHECKING, Any

from dcp_plugin.checkpointer import Checkpointer
from dcp_plugin.storage import CheckpointInfo, CheckpointStorage

if TYPE_CHECKING:
    from dcp_plugin.manager import CheckpointManager


class NodeDirectories:
    """One manager per checkpoint directory on node-local disks (``checkpointer``: the plugin's collective one)."""

    def __init__(self, checkpointer: Callable[[], Checkpointer]) -> None:
        self._checkpointer = checkpointer
        self._managers: dict[str, CheckpointManager] = {}

    def manager(self, storage: CheckpointStorage, **options: Any) -> CheckpointManager:
        """The manager of ``storage``'s directory (created on first use, collectively, with ``options``: the run id
        and remote tier of :class:`~dcp_plugin.lightning.DCPCheckpoint`, which asks first)."""
        from dcp_plugin.manager import CheckpointManager

        manager = self._managers.get(storage.root_url)
        if manager is None:
            manager = CheckpointManager(storage.root_url, checkpointer=self._checkpointer(), **options)
            self._managers[storage.root_url] = manager
        return manager

    def info(self, storage: CheckpointStorage, name: str) -> CheckpointInfo:
        """Checkpoint ``name`` as complete across the nodes (collective), or a clear error."""
        manager = self.manager(storage)
        assert manager.nodes is not None
        chosen = manager.nodes.choose(manager.nodes.view(), None, name)
        return chosen.info(manager.storage)

    def load(self, storage: CheckpointStorage, name: str, state: MutableMapping[str, Any], **options: Any) -> Any:
        """Restore ``name`` into ``state`` from the nearest copy of each file (collective)."""
        return self.manager(storage).load(state, name=name, **options)

    def close(self) -> None:
        """Wait for every directory's copies (to peers, to the remote tier), then release them; raise the first
        error."""
        managers = list(self._managers.values())
        self._managers.clear()
        first: BaseException | None = None
        for manager in managers:
            try:
                manager.close()
            except BaseException as err:  # noqa: BLE001 - close the rest, then raise the first
                first = first or err
        if first is not None:
            raise first


__all__ = ["NodeDirectories"]
