"""The plugin's checkpoint directories on node-local disks (``local_scope="node"``).

On node-local disks a checkpoint is complete only across the nodes, so finding one and loading it is collective:
every rank asks, and each file is read from the node that holds it. The plugin keeps one
:class:`~dcp_plugin.manager.CheckpointManager` per directory for that (created collectively at its first use,
on the plugin's collective checkpointer), which :class:`~dcp_plugin.lightning.DCPCheckpoint` also uses for its
retention, its copies to peer nodes and its remote tier: one set of copies per directory.
"""

from __future__ import annotations

from collections.abc import Callable, MutableMapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from dcp_plugin.checkpointer import Checkpointer
from dcp_plugin.config import CheckpointConfig
from dcp_plugin.errors import ConfigError
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


@dataclass(frozen=True)
class NodeScope:
    """``DCPCheckpoint``'s ``local_scope`` and ``peer_replicas`` (``None``: the plugin's own), validated when given."""

    local_scope: Literal["shared", "node"] | None = None
    peer_replicas: int | None = None

    def __post_init__(self) -> None:
        CheckpointConfig(local_scope=self.local_scope or "node", peer_replicas=self.peer_replicas)  # raises ConfigError

    def apply(self, plugin: Any) -> None:
        """Give them to ``plugin`` at setup (see :func:`use_local_scope`)."""
        use_local_scope(plugin, self.local_scope, self.peer_replicas)


def nodes_of(plugin: Any) -> NodeDirectories | None:
    """The plugin's directories restored across the nodes, with ``local_scope="node"`` (else ``None``)."""
    return node_directories(plugin) if plugin.config.local_scope == "node" else None


def node_directories(plugin: Any) -> NodeDirectories:
    """The directories a ``DCPCheckpointIO`` restores across the nodes (held by its writers)."""
    return plugin._writers.nodes


def use_local_scope(plugin: Any, local_scope: str | None, peer_replicas: int | None) -> None:
    """Give ``plugin`` (a ``DCPCheckpointIO``) the scope :class:`~dcp_plugin.lightning.DCPCheckpoint` was given
    (``None``: keep the plugin's, e.g. from ``DCP_PLUGIN_LOCAL_SCOPE``). Only before the plugin's first save or load:
    its checkpointers are made for one scope."""
    changes = {
        key: value
        for key, value in (("local_scope", local_scope), ("peer_replicas", peer_replicas))
        if value is not None
    }
    config = plugin.config.replace(**changes)
    if config == plugin.config:
        return
    if plugin._writers.all():
        shown = ", ".join(f"{key}={value!r}" for key, value in changes.items())
        raise ConfigError(
            f"DCPCheckpoint({shown}) differs from its DCPCheckpointIO, which has saved or loaded already; configure "
            "the plugin the same way (DCPCheckpointIO.from_config(CheckpointConfig(...)) or DCP_PLUGIN_LOCAL_SCOPE)."
        )
    plugin.config = plugin._writers.config = config  # no checkpointer exists yet: the first one takes it


__all__ = ["NodeDirectories", "NodeScope", "node_directories", "nodes_of", "use_local_scope"]
