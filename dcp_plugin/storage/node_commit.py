"""The commit across nodes: a checkpoint written on several nodes' own disks is committed once every node's part
is durable (``local_scope="node"``).

Every node writes its ranks' files into ``.dcp-plugin/staging/N.<id>/`` on its own disk (the same path on every
node). DCP's coordinator writes ``.metadata`` on the first node and hands it, with the manifest, to every rank
when the write returns (:meth:`NodeCommit.commit`). Then, on every rank, over the checkpoint process group
(:meth:`NodeCommit.complete`)::

    WRITTEN    every node's data files are in its staging copy        -> leftovers; purge removes them
    PREPARED   each node's leader wrote .metadata and its part's      -> leftovers (sealed, never decided);
               manifest into its staging copy, checked its files,        the previous checkpoint is the newest;
               fsynced (the vote)                                        purge removes them
    DECIDED    every node voted yes: the coordinator renames its part -> N is decided: the first node lists it, the
               into place (the commit point of the checkpoint)           others hold it prepared; the next start
                                                                         completes it there (roll forward)
    COMMITTED  every other node renames its part into place           -> N is committed on every node

A node that votes no (a missing file, a full disk) makes every node remove its staging copy; nothing is
committed anywhere. A checkpoint counts as complete only when every part is committed somewhere (on its own node,
as a peer's replica, or the whole checkpoint on the remote tier): what the first node lists alone is never loaded
as if complete. :meth:`NodeCommit.recover` is the roll forward, run by every rank when a job starts.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Protocol

from dcp_plugin.errors import CheckpointExistsError, CheckpointSaveError
from dcp_plugin.storage import manifest as manifests
from dcp_plugin.storage import work_areas
from dcp_plugin.storage.commit import (
    PendingWrite,
    RenameCommit,
    discard_local,
    exchange,
    fsync_dir,
    list_dir,
    rename_noreplace,
    tidy_work_dir,
    write_local_manifest,
)
from dcp_plugin.storage.faults import reached
from dcp_plugin.storage.names import MANIFEST_NAME, METADATA_NAME, STAGING, name_of_work_entry
from dcp_plugin.storage.node_parts import NodeLayout, part_files, part_of, part_record, with_part
from dcp_plugin.storage.root import StorageRoot
from dcp_plugin.storage.safe_io import MAX_MANIFEST_BYTES, MAX_METADATA_BYTES, read_bounded, regular_file_size

log = logging.getLogger(__name__)

HANDOFF_ATTRIBUTE = "dcp_plugin_handoff"
"""Set on the ``Metadata`` DCP's coordinator returns to every rank: the manifest and ``.metadata`` bytes the other
nodes write into their parts."""


class Channel(Protocol):
    """The collectives the nodes agree through (the checkpoint process group: ``ProcessGroups``)."""

    def all_gather(self, obj: Any) -> list[Any]: ...

    def broadcast(self, obj: Any) -> Any: ...


class NodeCommit(RenameCommit):
    """Rename commit on every node's own disk, in two phases (see the module docstring for the states)."""

    def __init__(self, root: StorageRoot, layout: NodeLayout, channel: Channel | None) -> None:
        super().__init__(root)
        self.layout = layout
        self.channel = channel

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "channel": None}  # the writer daemon only prepares the hand-off

    # -- on the coordinator, from DCP's finish ------------------------------------------------------
    def commit(self, pending: PendingWrite, manifest: dict[str, Any]) -> None:
        """Every rank wrote its files and ``.metadata`` is written: record what every node needs to prepare its
        part (returned to every rank on the save's ``Metadata``); nothing is committed yet."""
        part = part_record(manifest["files"], self.layout.node_of_rank, node=0)
        path = f"{pending.directory}/{METADATA_NAME}"
        data = read_bounded(self.root.fs, path, is_local=True, limit=MAX_METADATA_BYTES, what="metadata file")
        pending.handoff = {"manifest": {**manifest, "part": part}, "metadata": data}

    # -- on every rank, once DCP's write returned ----------------------------------------------------
    def complete(self, pending: PendingWrite, metadata: Any) -> None:
        """Prepare, decide, commit (collective: every rank calls it). Raises on every rank alike if the
        checkpoint was not committed, or was committed but could not be made visible on some node."""
        channel, layout = self.channel, self.layout
        assert channel is not None, "a node commit needs the checkpoint process group"
        handoff = getattr(metadata, HANDOFF_ATTRIBUTE, None)
        vote: str | None = None
        existing: str | None = None
        if handoff is None:
            vote = "the coordinator handed over no manifest"
        elif layout.is_leader:
            pending.manifest = handoff["manifest"]
            try:
                existing = self._prepare(pending, handoff["manifest"], handoff["metadata"])
            except Exception as err:  # noqa: BLE001 - every node learns it through the vote
                vote = f"node {layout.node}: {type(err).__name__}: {err}"
        votes = channel.all_gather((vote, existing))
        shown = self.root.url(self.root.join(pending.name))
        failures = [text for text, _ in votes if text]
        if failures:
            self._abort_here(pending)
            raise CheckpointSaveError(f"Saving {shown} failed ({failures[0]}); nothing was committed on any node.")
        if not pending.overwrite:
            found = [votes[leader][1] for leader in layout.leaders]
            if all(save_id is not None and save_id == found[0] for save_id in found):
                self._abort_here(pending)
                raise CheckpointExistsError(
                    f"A committed checkpoint already exists at {shown} on every node; pick another step/name, delete "
                    "it first, or pass overwrite=True."
                )
        pending.keep = True  # every node voted yes: from here on only the coordinator's "no" removes this copy
        self._decide(pending, channel, shown)
        failure: str | None = None
        if layout.is_leader and layout.rank != 0:
            try:
                self._commit_part(pending)
                reached("nodes.committed")
            except Exception as err:  # noqa: BLE001 - reported on every rank below
                failure = f"node {layout.node}: {type(err).__name__}: {err}"
        failures = [text for text in channel.all_gather(failure) if text]
        if failures:
            raise CheckpointSaveError(
                f"{shown} was committed, but not made visible on every node ({failures[0]}); that node completes it "
                "when the job starts again."
            )

    def _decide(self, pending: PendingWrite, channel: Channel, shown: str) -> None:
        """The coordinator commits its own part (the checkpoint's commit point) and tells every node."""
        decision: str | None = None
        if self.layout.rank == 0:
            try:
                self._commit_part(pending)
                reached("nodes.decided")
            except Exception as err:  # noqa: BLE001 - every node learns it below
                decision = f"{type(err).__name__}: {err}"
        decision = channel.broadcast(decision)
        if decision is not None:
            self._abort_here(pending)
            raise CheckpointSaveError(f"Saving {shown} failed on the first node ({decision}); nothing was committed.")

    def _prepare(self, pending: PendingWrite, manifest: dict[str, Any], metadata: bytes) -> str | None:
        """Seal this node's part in its staging copy; returns the save id of the part of that name this node has
        committed already (``None``: none)."""
        node, directory = self.layout.node, pending.directory
        os.makedirs(directory, exist_ok=True)
        if node != 0:
            _write_durably(f"{directory}/{METADATA_NAME}", metadata)
        records = manifest["files"]
        for name in part_files(manifest, node):
            size = regular_file_size(self.root.fs, f"{directory}/{name}", is_local=True)
            if size != records[name]["size"]:
                raise OSError(f"{name} has {size} bytes on this node, {records[name]['size']} were written")
        fsync_dir(directory)
        write_local_manifest(directory, with_part(manifest, node))
        reached("nodes.prepared")
        return committed_save_id(self.root, pending.name)

    def _commit_part(self, pending: PendingWrite) -> None:
        """Rename this node's sealed part into place (replacing a part of the same name from another save)."""
        final = self.root.join(pending.name)
        if os.path.isdir(final) and not os.path.islink(final):
            if not exchange(pending.directory, final):
                raise OSError(f"cannot replace {final} atomically on this filesystem")
            fsync_dir(self.root.path)
            discard_local(self.root, STAGING, pending.write_name)  # holds the other copy now
        elif os.path.lexists(final) or not rename_noreplace(pending.directory, final):
            raise CheckpointExistsError(f"{final} is taken by something that is not a checkpoint directory")
        fsync_dir(self.root.path)
        tidy_work_dir(self.root)

    def _abort_here(self, pending: PendingWrite) -> None:
        """The decision is to abort, and every node knows it: remove this node's staging copy."""
        if self.layout.is_leader:
            super().abort(pending)

    def abort(self, pending: PendingWrite) -> None:
        """Remove this node's staging copy after a failed save, unless every node voted to commit and the decision
        did not arrive (the node that failed may be the coordinator after it decided): then the next start
        completes the copy if the checkpoint was committed anywhere, and leaves it to ``purge`` otherwise."""
        if pending.keep:
            log.warning(
                "Keeping the sealed part %s: the commit's outcome did not arrive; the next start completes it if the "
                "checkpoint was committed.",
                pending.directory,
            )
            return
        super().abort(pending)

    # -- on every rank, when a job starts ----------------------------------------------------------
    def recover(self) -> list[str]:
        """Complete the commits a crash interrupted between the decision and a node's own commit (collective):
        a sealed part whose save is committed on some node is renamed into place. Returns the names completed
        on this node; sealed parts of undecided saves stay leftovers (``purge``)."""
        channel, layout = self.channel, self.layout
        sealed: dict[str, tuple[str, str]] = {}
        committed: dict[str, str] = {}
        if layout.is_leader:
            sealed, committed = self._sealed_parts(), self._committed_parts()
        views = channel.all_gather(committed) if channel is not None else [committed]
        decided = {save_id for view in views for save_id in view.values()}
        completed = []
        for entry, (name, save_id) in sorted(sealed.items()):
            if save_id not in decided or committed.get(name) == save_id:
                continue
            pending = PendingWrite(name=name, directory=self.root.work(STAGING, entry), overwrite=True)
            try:
                self._commit_part(pending)
            except Exception as err:  # noqa: BLE001 - left for the next start (or purge)
                log.warning("Could not complete the commit of %s on this node: %s", self.root.join(name), err)
                continue
            log.warning(
                "Completed the commit of %s on this node (the job stopped before it was made visible here).",
                self.root.join(name),
            )
            completed.append(name)
        return completed

    def _sealed_parts(self) -> dict[str, tuple[str, str]]:
        """Staging copies holding a part's manifest: entry -> (name, save id)."""
        out = {}
        for entry in work_areas.entries(self.root, STAGING, strict=False):
            manifest = _read_manifest(self.root, f"{self.root.work(STAGING, entry)}/{MANIFEST_NAME}")
            if manifest is not None and part_of(manifest) is not None and isinstance(manifest.get("save_id"), str):
                out[entry] = (name_of_work_entry(entry), manifest["save_id"])
        return out

    def _committed_parts(self) -> dict[str, str]:
        out = {}
        for entry in list_dir(self.root.path):
            if not entry.startswith("."):
                save_id = committed_save_id(self.root, entry)
                if save_id is not None:
                    out[entry] = save_id
        return out


def committed_save_id(root: StorageRoot, name: str) -> str | None:
    """The save id of the checkpoint (or part) committed as ``name`` in ``root``, or ``None``."""
    path = root.join(name)
    if os.path.islink(path) or not os.path.isdir(path):
        return None
    manifest = _read_manifest(root, f"{path}/{MANIFEST_NAME}")
    save_id = None if manifest is None else manifest.get("save_id")
    return save_id if isinstance(save_id, str) else None


def _read_manifest(root: StorageRoot, path: str) -> dict[str, Any] | None:
    try:
        data = read_bounded(root.fs, path, is_local=True, limit=MAX_MANIFEST_BYTES, what="manifest")
        return manifests.decode(data, path)
    except Exception:  # noqa: BLE001 - missing or damaged: not a part
        return None


def _write_durably(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.rename(tmp, path)


__all__ = ["HANDOFF_ATTRIBUTE", "Channel", "NodeCommit", "committed_save_id"]
