"""A manager's checkpoints on node-local disks (``local_scope="node"``): listing, restoring, copies to peers.

Every node keeps its own part of each checkpoint on its own disk (committed across the nodes by
:class:`~dcp_plugin.storage.node_commit.NodeCommit`), copies of ``peer_replicas`` other nodes' parts
(:mod:`.peers`), and, with a remote tier, every checkpoint is also copied there whole (each rank uploads the files
it wrote, :mod:`.rank_copy`). :class:`NodeTiers` answers the manager's questions over all of that, collectively:

* which checkpoints exist is agreed by every rank from what every node holds (:mod:`.holdings`); only checkpoints
  complete across the job (every part on some node, or the whole on the remote tier) are listed and loaded;
* a load restores the newest complete one (or the one asked for) from the nearest copy of each file
  (:mod:`.restore`), and says how many bytes came from each place; a checkpoint whose part is gone everywhere is a
  :class:`~dcp_plugin.errors.CheckpointIncompleteError` naming what is missing, never a silent fresh start;
* after a save committed, retention runs on every node (on its parts and on the copies it keeps), and the parts
  are handed to the peer replication and, with a remote tier, to the remote replication.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import MutableMapping
from typing import TYPE_CHECKING, Any

from dcp_plugin.engine.groups import ProcessGroups
from dcp_plugin.engine.nodes import NodeGroups
from dcp_plugin.errors import CheckpointError, CheckpointIncompleteError, CheckpointNotFoundError
from dcp_plugin.policies.retention import apply_retention
from dcp_plugin.policies.schedule import Schedule
from dcp_plugin.storage import CheckpointInfo, CheckpointStorage
from dcp_plugin.storage.names import RESTORE
from dcp_plugin.storage.node_commit import NodeCommit
from dcp_plugin.tiers.holdings import (
    Checkpoint,
    JobView,
    check_own_disks,
    describe,
    replica_parts,
    replica_storage,
)
from dcp_plugin.tiers.peers import PeerReplicator
from dcp_plugin.tiers.restore import NodeRestore, remove_scratch_of
from dcp_plugin.tiers.two_tiers import TwoTiers

if TYPE_CHECKING:
    from dcp_plugin.checkpointer import Checkpointer

log = logging.getLogger(__name__)


class NodeTiers:
    """The checkpoints of one manager on node-local disks (built collectively: every rank, at the same point).

    Args:
        storage: this node's directory, committed across nodes (``Checkpointer.scoped``).
        groups: the ranks that save together.
        copies: how many other nodes keep a copy of each node's part (``peer_replicas``).
        schedule: the run's schedule (its retention also applies to the copies).
        remote: the remote tier, when there is one.
    """

    def __init__(
        self,
        storage: CheckpointStorage,
        groups: ProcessGroups,
        *,
        copies: int,
        schedule: Schedule,
        remote: TwoTiers | None = None,
    ) -> None:
        layout = storage.node_layout
        assert layout is not None and isinstance(storage.strategy, NodeCommit)
        self.storage = storage
        self.groups = groups
        self.layout = layout
        self.tiers = remote
        """The remote tier and its replication, when there is one."""
        if layout.nodes > 1:
            check_own_disks(storage, layout.is_leader, groups.all_gather_control)
        self.nodes = NodeGroups(layout, groups.collective)
        """The node layout and the group copies between nodes travel on."""
        usable = min(copies, layout.nodes - 1)
        if copies > usable and groups.is_coordinator:
            log.warning(
                "peer_replicas=%d, but the job runs on %d node(s): %d other node(s) keep a copy of each part.",
                copies,
                layout.nodes,
                usable,
            )
        self.peers = PeerReplicator(storage, self.nodes, usable, schedule) if usable > 0 else None
        """The copies of each node's parts on other nodes (``None`` without peers)."""
        schedule.run_id = groups.all_gather_control(schedule.run_id)[0]  # every node's retention: one run's
        self._due: list[str] = []
        self._protected: set[str] = set()
        self._closed = False
        self._unloadable: set[str] = set()
        storage.strategy.recover()  # commits a crash interrupted between the decision and a node's own rename
        if layout.is_leader:
            _tidy(storage)
        self._catch_up = self.peers is not None
        """Copies a crash interrupted (or a lost disk took) are made again after the first commit or restore."""

    # -- after saves ----------------------------------------------------------------------------------
    def saved(self, step: int, name: str) -> None:
        """A save of ``step`` as ``name`` was started (every rank)."""
        self._due.append(name)
        if self.tiers is not None:
            self.tiers.saved(step, name)

    def after_commit(self, schedule: Schedule, *, coordinator: bool, writing: bool) -> None:
        """Retention on every node (never of parts still being copied), then hand what committed to the copies."""
        if self.peers is not None:
            self.peers.schedule = schedule  # its retention also applies to the copies
        protected = (set(self._due) | self.peers.busy()) if self.peers is not None else set()
        protected |= self.tiers.protected() if self.tiers is not None else set()
        if self._protected - protected:
            schedule.request_retention()  # copies finished: what retention had to keep may go now
        self._protected = protected
        plan = schedule.after_commit(
            self.storage, coordinator=self.layout.is_leader, writing=writing, protected=protected
        )
        if plan is not None and plan.delete and schedule.retention is not None:
            for part in replica_parts(self.storage):
                copies = replica_storage(self.storage, part)
                apply_retention(schedule.retention, copies, run_id=schedule.run_id, owned=schedule.owned)
        if writing or self._closed:
            return
        due, self._due = self._due, []
        if self.peers is not None:
            if self._catch_up:  # not at start: a restore comes first, the copies it does not need after it
                self._catch_up = False
                for name in self.peers.missing(self.view()):
                    if name not in due:
                        self.peers.enqueue(name, newest_first=False)
            for name in due:
                self.peers.enqueue(name)
        if self.tiers is not None:
            self.tiers.committed()
        if self.peers is not None:
            self.peers.raise_error()

    # -- listing --------------------------------------------------------------------------------------
    def view(self) -> JobView:
        """What every node holds, agreed by every rank (collective; safe while a save is in flight)."""
        mine = describe(self.storage, self.layout.node) if self.layout.is_leader else None
        remote = None
        if self.groups.is_coordinator and self.tiers is not None:
            try:
                remote = {info.name: info for info in self.tiers.remote.list()}
            except CheckpointError as err:
                log.warning("The remote tier %s cannot be listed now (%s).", self.tiers.remote.root_url, err)
        gathered = self.groups.all_gather_control((mine, remote))
        view = JobView.gather([copies for copies, _ in gathered], gathered[0][1])
        complete = {checkpoint.name for checkpoint in view.complete}
        self._unloadable = {c.name for c in view.checkpoints if not c.complete and c.name not in complete}
        return view

    def replaces(self, name: str) -> bool:
        """Whether a save of ``name`` replaces, on the nodes that have one, a part of a checkpoint of that name that
        the last listing found incomplete (a lost part: never loadable), e.g. after a restore from an older one."""
        return name in self._unloadable

    def list(self) -> list[CheckpointInfo]:
        """Checkpoints complete across the job, oldest first (collective)."""
        view = self.view()
        self._warn_incomplete(view)
        return [checkpoint.info(self.storage) for checkpoint in view.complete]

    def latest(self) -> CheckpointInfo | None:
        """The newest complete checkpoint; ``None`` when the nodes hold none at all. Raises
        :class:`CheckpointIncompleteError` when they hold only incomplete ones (collective)."""
        view = self.view()
        if view.checkpoints and not view.complete:
            raise self._incomplete(view.checkpoints[-1])
        self._warn_incomplete(view)
        return view.complete[-1].info(self.storage) if view.complete else None

    def locations(self) -> dict[str, tuple[str, ...]]:
        """Where each complete checkpoint can be restored from: ``"local"`` (the nodes' disks), ``"remote"``."""
        out = {}
        for checkpoint in self.view().complete:
            where = () if checkpoint.missing else ("local",)
            out[checkpoint.name] = where + (("remote",) if checkpoint.remote is not None else ())
        return out

    def _warn_incomplete(self, view: JobView) -> None:
        newer = view.newer_incomplete()
        if newer and self.groups.is_coordinator:
            log.warning("Not restorable, so not listed: %s.", "; ".join(checkpoint.lacks() for checkpoint in newer))

    def _incomplete(self, checkpoint: Checkpoint) -> CheckpointIncompleteError:
        remote = "" if self.tiers is None else f" (nor does the remote tier {self.tiers.remote.root_url})"
        return CheckpointIncompleteError(
            f"Cannot restore from {self.storage.root_url} on {self.layout.nodes} node(s): {checkpoint.lacks()}"
            f"{remote}. Bring that node's disk back, or restore from a remote tier (remote=...); nothing was loaded, "
            "so training does not silently start afresh."
        )

    # -- restoring ------------------------------------------------------------------------------------
    def choose(self, view: JobView, step: int | None, name: str | None) -> Checkpoint:
        """The checkpoint a load of ``step`` / ``name`` / the latest restores (complete), or a clear error."""
        found = view.find(step, name)
        if not found:
            wanted = f"called {name!r}" if name else f"of step {step}" if step is not None else "at all"
            where = "" if self.tiers is None else f" or in {self.tiers.remote.root_url}"
            raise CheckpointNotFoundError(
                f"No committed checkpoint {wanted} in {self.storage.root_url} on any of the {self.layout.nodes} "
                f"node(s){where}."
            )
        complete = [checkpoint for checkpoint in found if checkpoint.complete]
        if not complete:
            raise self._incomplete(found[-1])
        if step is None and name is None:
            self._warn_incomplete(view)
        return complete[-1]

    def load(
        self,
        checkpointer: Checkpointer,
        state: MutableMapping[str, Any],
        step: int | None,
        name: str | None,
        **options: Any,
    ) -> CheckpointInfo:
        """Restore into ``state`` from the nearest copy of each file (collective)."""
        return self._restore(step, name, lambda storage, chosen: checkpointer.load((storage, chosen), state, **options))

    def read(self, checkpointer: Checkpointer, step: int | None, name: str | None, **options: Any) -> dict[str, Any]:
        """Read a checkpoint without live objects, from the nearest copy of each file (collective)."""
        out: dict[str, Any] = {}

        def read(storage: CheckpointStorage, chosen: str) -> CheckpointInfo:
            out.update(checkpointer.read((storage, lambda: storage.info(chosen)), **options))
            return storage.info(chosen)

        self._restore(step, name, read)
        return out

    def _restore(self, step: int | None, name: str | None, load: Any) -> CheckpointInfo:
        if self.peers is not None:
            self.peers.wait()  # the copies in flight first: their group carries the restore's files
        chosen = self.choose(self.view(), step, name)
        remote = self.tiers.remote if self.tiers is not None and chosen.remote is not None else None
        restore = NodeRestore(self.storage, chosen, self.layout, self.nodes.all_gather, self.nodes.exchange, remote)
        storage = restore.assemble()
        try:
            info = load(storage, chosen.name)
        finally:
            restore.close()
        counts = dict(restore.counts)
        if self.groups.is_coordinator:
            log.info(
                "Restored %s on %d node(s): %s bytes from the nodes' own disks, %s from peers, %s from the remote.",
                chosen.name,
                self.layout.nodes,
                *(f"{counts[place]:,}" for place in ("local", "peer", "remote")),
            )
        return dataclasses.replace(info, url=self.storage.url(chosen.name), restored_from=counts)

    # -- deleting and closing ---------------------------------------------------------------------
    def wait(self) -> None:
        """Block until the copies queued so far (to peers, to the remote tier) are made; raise the first error."""
        if self.peers is not None:
            self.peers.wait()
        if self.tiers is not None:
            self.tiers.replicator.wait()

    def delete(self, name: str) -> None:
        """Delete a checkpoint on every node: its part and the copies of other parts (every rank calls it)."""
        if not self.layout.is_leader:
            return
        for storage in [self.storage, *(replica_storage(self.storage, p) for p in replica_parts(self.storage))]:
            if storage.is_committed(name):
                storage.delete(name)

    def close(self) -> None:
        """Wait for the copies to peers and to the remote tier (every rank), then release the group."""
        try:
            try:
                if self.peers is not None:
                    self.peers.close()
            finally:
                if self.tiers is not None:
                    self.tiers.close()
        finally:
            self._closed = True  # later after-commit work is retention only
            self.nodes.close()

    def __getstate__(self) -> dict[str, Any]:
        raise TypeError("NodeTiers holds process groups and threads and cannot be copied.")


def _tidy(storage: CheckpointStorage) -> None:
    """Remove what interrupted restores and copies left on this node (nothing is writing them now)."""
    try:
        for entry in _entries(storage.work_path(RESTORE)):
            storage.remove_work_entry(RESTORE, entry)
        for part in replica_parts(storage):
            replica_storage(storage, part).purge()
        remove_scratch_of(storage)
    except Exception as err:  # noqa: BLE001 - leftovers are never listed; purge removes them later
        log.warning("Could not remove what interrupted restores or copies left in %s: %s", storage.root_url, err)


def _entries(path: str) -> list[str]:
    try:
        return sorted(os.listdir(path))
    except (FileNotFoundError, NotADirectoryError):
        return []


__all__ = ["NodeTiers"]
