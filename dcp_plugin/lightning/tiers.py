"""``DCPCheckpoint``'s remote tier: replication of its checkpoints and resuming from the newest of both tiers.

The callback saves to ``dirpath`` (the local tier) as usual; with ``remote=`` every rank sets up the two tiers
at ``Trainer`` setup (each rank uploads its own files, see :mod:`dcp_plugin.tiers.rank_copy`), the checkpoints the
callback saves are replicated once committed, and the local tier's retention keeps those not yet copied. On a
machine whose ``dirpath`` lacks the newest checkpoint (a fresh node), auto-resume copies it from the remote tier
into ``dirpath`` first, checked and committed there, and resumes from that local copy.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from dcp_plugin.engine import inflight
from dcp_plugin.engine.groups import ProcessGroups
from dcp_plugin.lightning import layout as lay
from dcp_plugin.lightning.nodes import NodeDirectories
from dcp_plugin.policies.schedule import Schedule
from dcp_plugin.storage import CheckpointInfo, CheckpointStorage, copy_checkpoint
from dcp_plugin.tiers.nodes import NodeTiers
from dcp_plugin.tiers.two_tiers import RemoteTier, TwoTiers

log = logging.getLogger(__name__)


class CallbackTiers:
    """The two tiers of one ``DCPCheckpoint`` (inactive without a remote tier)."""

    def __init__(self, remote: RemoteTier) -> None:
        self.remote = remote
        self.tiers: TwoTiers | None = None
        self.nodes: NodeTiers | None = None
        """On node-local disks: the directory's checkpoints across the nodes (the plugin's manager of it)."""

    @classmethod
    def resolve(
        cls,
        remote: str | None,
        storage_options: Mapping[str, Any] | None,
        replicate_every_n_steps: int | None,
        keep_last: int | None,
    ) -> CallbackTiers:
        """From the callback's arguments; those not given come from ``DCP_PLUGIN_REMOTE*`` variables."""
        return cls(
            RemoteTier.resolve(
                remote=remote,
                remote_storage_options=storage_options,
                replicate_every_n_steps=replicate_every_n_steps,
                remote_keep_last=keep_last,
            )
        )

    def setup(
        self,
        storage: CheckpointStorage,
        options: Mapping[str, Any],
        run_id: str | None,
        groups: ProcessGroups,
        nodes: NodeDirectories | None = None,
    ) -> None:
        """Called by every rank at ``fit`` setup; queues what an earlier run never replicated. ``nodes``: on
        node-local disks, the plugin's directories (the copies to peers and to the remote tier go through them)."""
        if nodes is not None:
            if self.nodes is None:
                self.nodes = nodes.manager(storage, run_id=run_id, **self.remote.manager_options()).nodes
            return
        if self.tiers is None:
            self.tiers = self.remote.open(storage, options, run_id=run_id, groups=groups)
            if self.tiers is not None:
                self.tiers.catch_up(groups)

    @property
    def collective(self) -> bool:
        """Whether finding the latest checkpoint is collective (node-local disks): every rank asks."""
        return self.nodes is not None

    def saved(self, step: int, name: str) -> None:
        if self.nodes is not None:
            self.nodes.saved(step, name)
        if self.tiers is not None:
            self.tiers.saved(step, name)

    def after_commit(
        self, schedule: Schedule, storage: CheckpointStorage, *, coordinator: bool, writing: bool = False
    ) -> None:
        if self.nodes is not None:
            self.nodes.after_commit(schedule, coordinator=coordinator, writing=writing)  # retention on every node
            return
        if self.tiers is None:
            schedule.after_commit(storage, coordinator=coordinator, writing=writing)
            return
        self.tiers.replicator.run_id = schedule.run_id  # a resume may have continued an earlier run
        self.tiers.after_commit(schedule, coordinator=coordinator, writing=writing)

    def latest(self, storage: CheckpointStorage) -> CheckpointInfo | None:
        """The newest Lightning checkpoint of either tier, in ``storage`` (copied there from the remote tier
        when only that one has it); saves in flight into ``storage`` in this process are waited for first."""
        if self.nodes is not None:  # every rank asks: the checkpoints complete across the nodes
            inflight.wait_under(storage.root_url)
            found = [info for info in self.nodes.list() if lay.LAYOUT_KEY in info.metadata]
            return found[-1] if found else self.nodes.latest()  # only incomplete ones: the error, never a fresh start
        if self.tiers is None:
            infos = lightning_checkpoints(storage)
            return infos[-1] if infos else None
        inflight.wait_under(storage.root_url)
        found = [located for located in self.tiers.list() if lay.LAYOUT_KEY in located.info.metadata]
        if not found:
            return None
        newest = found[-1]
        if "local" in newest.tiers:
            return newest.info
        name = newest.info.name
        log.info("Copying %s from the remote tier to resume from it.", self.tiers.remote.url(name))
        return copy_checkpoint(self.tiers.remote, name, storage)

    def close(self, schedule: Schedule, *, coordinator: bool) -> None:
        """Wait for the copies in flight (every rank), then apply the retention that waited for them; raises a
        replication error."""
        nodes, self.nodes = self.nodes, None
        if nodes is not None:
            nodes.after_commit(schedule, coordinator=coordinator, writing=False)
            nodes.wait()  # the plugin's teardown closes them
            nodes.after_commit(schedule, coordinator=coordinator, writing=False)  # what was kept until copied
        tiers, self.tiers = self.tiers, None
        if tiers is not None:
            tiers.close()
            tiers.after_commit(schedule, coordinator=coordinator, writing=False)

    def __getstate__(self) -> dict[str, Any]:
        return {"remote": self.remote, "tiers": None, "nodes": None}


def lightning_checkpoints(storage: CheckpointStorage) -> list[CheckpointInfo]:
    """Committed checkpoints in ``storage`` written through the Lightning plugin (any run), oldest first; saves into
    it still in flight in this process are waited for first."""
    inflight.wait_under(storage.root_url)
    return [info for info in storage.list() if lay.LAYOUT_KEY in info.metadata]


__all__ = ["CallbackTiers", "lightning_checkpoints"]
