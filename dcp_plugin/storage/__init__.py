"""Where checkpoints live, how they become committed, and how they are read without trusting them.

Layout under a root directory or URL::

    <root>/<name>/                       a committed checkpoint (local: DCP files, .metadata, dcp_plugin.json;
                                         object stores: dcp_plugin.json, the commit marker naming its data)
    <root>/.dcp-plugin/staging/...       local writes in progress and superseded copies being removed
    <root>/.dcp-plugin/objects/...       object stores: checkpoint data, referenced by the markers
    <root>/.dcp-plugin/trash|replaced/   local deletions and two-step replacements in progress

The commit protocols and their crash states are described in :mod:`dcp_plugin.storage.commit`. This package is
the only place that handles paths; everything else passes names and URLs around.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem

from dcp_plugin.errors import (
    CheckpointCorruptError,
    CheckpointExistsError,
    CheckpointNotFoundError,
    ConfigError,
    NotACheckpointError,
    StorageAccessError,
    UnsafeCheckpointError,
)
from dcp_plugin.storage import manifest as manifests
from dcp_plugin.storage import plain, work_areas
from dcp_plugin.storage.catalog import CheckpointInfo, StorageCatalog
from dcp_plugin.storage.cleanup import StorageCleanup
from dcp_plugin.storage.commit import (
    MarkerCommit,
    PendingWrite,
    RenameCommit,
    check_target_is_replaceable,
    remove_tree,
    tidy_work_dir,
)
from dcp_plugin.storage.listing import Listing
from dcp_plugin.storage.names import (
    FORMAT_VERSION,
    MANIFEST_NAME,
    METADATA_NAME,
    STAGING,
    STEP_NAME,
    check_name,
    step_name,
)
from dcp_plugin.storage.node_commit import Channel, NodeCommit, committed_save_id
from dcp_plugin.storage.node_parts import NodeLayout
from dcp_plugin.storage.room import check_room, size_text
from dcp_plugin.storage.root import storage_errors
from dcp_plugin.storage.transfer import copy_checkpoint

if TYPE_CHECKING:
    from dcp_plugin.storage.dcp_io import IncrementalPlan, RunWrite


class CheckpointStorage(StorageCatalog, StorageCleanup):
    """A directory (local path or fsspec URL) holding checkpoints.

    Its parts: identity and checks (:mod:`~dcp_plugin.storage.base`), reading (:mod:`~dcp_plugin.storage.catalog`),
    deleting and cleaning up (:mod:`~dcp_plugin.storage.cleanup`), and writing (here)."""

    # -- writing ----------------------------------------------------------------------------------
    @storage_errors("write a checkpoint to")
    def begin_write(self, name: str, overwrite: bool = False) -> PendingWrite:
        """Prepare a fresh private location for checkpoint ``name`` (called on one rank).

        ``overwrite=False`` is checked here for an early error and enforced again, atomically, at commit."""
        check_name(name)
        self.ensure_root()
        if isinstance(self.strategy, RenameCommit):
            self.strategy.restore_interrupted(name)
        if self.is_committed(name) and not overwrite:
            raise CheckpointExistsError(
                f"A committed checkpoint already exists at {self.url(name)}; pick another step/name, delete it "
                "first, or pass overwrite=True (the old one stays until the new one is committed)."
            )
        if not overwrite:
            check_target_is_replaceable(self._root, name)
        return self.strategy.begin(name, overwrite)

    def writer(
        self,
        pending: PendingWrite,
        *,
        thread_count: int,
        sync_files: bool,
        per_thread_copy_ahead: int,
        run_write: RunWrite | None = None,
        incremental: IncrementalPlan | None = None,
        direct_io: bool = True,
        aliases: dict[str, str] | None = None,
    ) -> Any:
        """A DCP writer that hashes what it writes and commits ``pending`` once every rank has written.
        ``run_write(work)`` runs the write (by default on the calling thread; the engine lowers its priority).
        With ``incremental``, tensors kept in shared blobs are written there, or not at all when unchanged.
        ``direct_io``: local files are written with ``O_DIRECT`` where the filesystem accepts it. ``aliases``:
        keys whose tensor views the same memory as another key's (tied weights), to that key: stored once."""
        from dcp_plugin.storage.dcp_io import CommittingFileSystemWriter, CommittingFsspecWriter  # imports torch

        kwargs: dict[str, Any] = dict(
            single_file_per_rank=True,
            sync_files=sync_files,
            thread_count=thread_count,
            per_thread_copy_ahead=per_thread_copy_ahead,
            incremental=incremental,
            aliases=aliases,
        )
        root, strategy = self._root, self.strategy
        commit: dict[str, Any] = dict(root=root, strategy=strategy, pending=pending)
        if run_write is not None:
            commit["run_write"] = run_write
        if self.is_local:
            return CommittingFileSystemWriter(pending.directory, **commit, **kwargs, direct_io=direct_io)
        # Remote files are durable once closed; DCP would fall back to a machine-wide os.sync() per file.
        kwargs["sync_files"] = False
        url = self._root.url(pending.directory)
        return CommittingFsspecWriter(url, **commit, **kwargs, **self.storage_options)

    @storage_errors("adopt a checkpoint in")
    def adopt(self, name: str) -> CheckpointInfo:
        """Make the plain-DCP directory ``name`` (written by ``dcp.save``, no manifest) a regular checkpoint: check
        its metadata (allow-list, confined paths, every named file present with enough bytes), then commit a
        manifest with the checksums of its files as they are now. Its data is not touched."""
        check_name(name)
        if self.is_committed(name):
            raise CheckpointExistsError(f"{self.url(name)} is already a committed checkpoint; nothing to adopt.")
        info = self.info(name)  # a plain-DCP directory, checked; anything else raises saying what it is
        plain.adopt(self._root, name, info.manifest)
        return self.info(name)

    def abort(self, pending: PendingWrite) -> None:
        """Remove what a failed write left behind (best effort; never touches committed data)."""
        self.strategy.abort(pending)

    # -- several nodes, each with its own disk ----------------------------------------------------------
    def on_nodes(self, layout: NodeLayout, channel: Channel) -> CheckpointStorage:
        """This directory on every node's own disk (the same path, different disks): writes are committed across
        the nodes (:class:`~dcp_plugin.storage.node_commit.NodeCommit`), agreeing over ``channel``."""
        if not self.is_local:
            raise ConfigError(
                f"local_scope='node' keeps checkpoints on each node's own disk, but {self.root_url} is not a local "
                "directory; pass a local path (a node's NVMe disk, or /dev/shm/...) with remote= for object storage, "
                "or use local_scope='shared'."
            )
        scoped = CheckpointStorage(self.root, self.storage_options)
        scoped.strategy = NodeCommit(scoped._root, layout, channel)
        scoped._listing = Listing(scoped._root, scoped.strategy)
        return scoped

    @property
    def node_layout(self) -> NodeLayout | None:
        """With a commit across nodes: which node each rank runs on (``None`` for a directory every rank reads)."""
        return self.strategy.layout if isinstance(self.strategy, NodeCommit) else None

    def check_room(self, rank_bytes: int, world_size: int, copies: int = 0) -> None:
        """Before a save of ``rank_bytes`` per rank (on every rank): refuse it, saying how much it needs, when this
        directory is in host memory (``/dev/shm``, tmpfs) and cannot hold what this node writes there (its ranks'
        files and the ``copies`` of other nodes' parts it keeps); on node-local disks also when a work area here is a
        link (every node writes its own staging copy). Disks' free space is not checked."""
        if not self.is_local:
            return
        if self.node_layout is not None:
            work_areas.check(self._root)
        layout = self.node_layout
        ranks = len(layout.ranks_of(layout.node)) if layout is not None else world_size
        what = f"the files of {ranks} rank(s), about {size_text(rank_bytes)} each"
        if copies:
            what += f", and copies of {copies} other node(s)' parts"
        check_room(self.root, rank_bytes * ranks * (1 + copies), what)

    def cleans_up(self, is_coordinator: bool) -> bool:
        """Whether this rank removes what a failed write left: the coordinator, or on node-local disks every
        node's leader (each its own staging copy)."""
        layout = self.node_layout
        return is_coordinator if layout is None else layout.is_leader

    def save_id_of(self, name: str) -> str | None:
        """The save id of the checkpoint committed as ``name`` on this local disk (``None``: none, or unreadable)."""
        return committed_save_id(self._root, name) if self.is_local else None

    def make_work_entry(self, area: str, entry: str) -> str:
        """Create the directory ``entry`` in work ``area`` of this local root (never through a link); its path."""
        return work_areas.make_entry(self._root, area, entry)

    def remove_work_entry(self, area: str, entry: str) -> None:
        """Remove one entry of work ``area`` (a restore's assembly, say) and the work folders it leaves empty."""
        remove_tree(self._root, self._root.work(area, entry))
        if self.is_local:
            tidy_work_dir(self._root)

    def here(self, pending: PendingWrite) -> PendingWrite:
        """The coordinator's write as it is on this node: with a commit across nodes each node has its own root
        (the same path on every node, or, on one host standing for several nodes, one directory each), so the
        staging copy is rebased onto this root; otherwise ``pending`` itself."""
        if not isinstance(self.strategy, NodeCommit):
            return pending
        directory = self._root.work(STAGING, pending.write_name)
        return dataclasses.replace(pending, directory=directory, manifest=dict(pending.manifest))

    def completion(self, pending: PendingWrite) -> Callable[[Any], None] | None:
        """What every rank runs once DCP's write of ``pending`` returned (with its ``Metadata``), before the save
        counts as done: the commit across nodes; ``None`` where the coordinator's commit is all there is."""
        if isinstance(self.strategy, NodeCommit):
            return functools.partial(self.strategy.complete, pending)
        return None


def open_url(
    url: str | os.PathLike[str], storage_options: dict[str, Any] | None = None
) -> tuple[CheckpointStorage, str]:
    """Split a checkpoint URL/path into (storage of its parent, name)."""
    text = os.fspath(url).rstrip("/")
    fs, path = url_to_fs(text, **(storage_options or {}))
    path = path.rstrip("/")
    parent, _, name = path.rpartition("/")
    if not name:
        raise ValueError(f"{url!r} does not name a checkpoint directory.")
    root: str = (parent or "/") if isinstance(fs, LocalFileSystem) else fs.unstrip_protocol(parent)
    return CheckpointStorage(root, storage_options), name


__all__ = [
    "FORMAT_VERSION",
    "MANIFEST_NAME",
    "METADATA_NAME",
    "STEP_NAME",
    "CheckpointCorruptError",
    "CheckpointExistsError",
    "CheckpointInfo",
    "CheckpointNotFoundError",
    "CheckpointStorage",
    "MarkerCommit",
    "NotACheckpointError",
    "PendingWrite",
    "RenameCommit",
    "StorageAccessError",
    "UnsafeCheckpointError",
    "copy_checkpoint",
    "manifests",
    "open_url",
    "step_name",
]
