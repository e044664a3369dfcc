"""Which node holds which copy of which checkpoint, and which checkpoints are complete across the job.

Each node's leader describes what its own disk holds (:func:`describe`): its committed parts and the copies of
other nodes' parts it keeps (peer replicas); the coordinator adds the remote tier's checkpoints. Every rank
gathers every description and computes the same :class:`JobView` from them. A checkpoint (a name and the save id
of one save) is *complete* when every one of its parts is committed somewhere in the job, or when the remote tier
holds it whole; only complete checkpoints are listed and loaded. The view also says what an incomplete one lacks,
and where it was, for the error that replaces a silent fresh start.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any

from dcp_plugin.errors import CheckpointError, ConfigError, UnsafeCheckpointError
from dcp_plugin.storage import CheckpointInfo, CheckpointStorage
from dcp_plugin.storage.names import PROBE, REPLICAS, replica_area, work_name
from dcp_plugin.storage.node_parts import part_files, part_of

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Copy:
    """One committed copy of one part (or of a whole checkpoint) on one node's disk."""

    node: int
    """The node (in the current job) whose disk holds it."""
    part: int | None
    """The part it is (the node that wrote it at save time); ``None``: the whole checkpoint."""
    own: bool
    """Committed in the node's directory itself (``False``: a peer replica)."""
    name: str
    save_id: str
    manifest: dict[str, Any] = field(compare=False, repr=False)


def replica_storage(local: CheckpointStorage, part: int) -> CheckpointStorage:
    """The checkpoint root on ``local``'s disk that keeps copies of part ``part`` of other nodes' checkpoints (its
    folders are never links: a run directory from elsewhere must not make copies land outside it)."""
    path = local.work_path(REPLICAS, replica_area(part))
    if os.path.islink(path) or os.path.islink(os.path.dirname(path)):
        raise UnsafeCheckpointError(
            f"{path} (or its folder) is a symbolic link; dcp-plugin keeps copies of other nodes' parts in plain "
            "folders under .dcp-plugin and never follows a link there. Remove the link itself and try again."
        )
    return CheckpointStorage(path, local.storage_options)


def replica_parts(local: CheckpointStorage) -> list[int]:
    """The parts this disk keeps copies of (from the folders under ``.dcp-plugin/replicas/``)."""
    try:
        entries = os.listdir(local.work_path(REPLICAS))
    except (FileNotFoundError, NotADirectoryError):
        return []
    folders = [entry for entry in entries if not os.path.islink(local.work_path(REPLICAS, entry))]
    return sorted(int(entry[4:]) for entry in folders if entry.startswith("node") and entry[4:].isdigit())


def describe(local: CheckpointStorage, node: int) -> list[Copy]:
    """The committed copies on this node's disk (its leader calls it). Unreadable entries are skipped."""
    copies = []
    for info in _listed(local):
        copies.append(_copy(info, node, own=True))
    for part in replica_parts(local):
        for info in _listed(replica_storage(local, part)):
            copy = _copy(info, node, own=False)
            if copy.part == part:
                copies.append(copy)
    return [copy for copy in copies if copy.save_id]


def check_own_disks(local: CheckpointStorage, leader: bool, all_gather: Any) -> None:
    """Refuse, on every rank alike, a directory that several nodes share (collective): each node's leader leaves a
    mark in its directory and looks for the others' marks. Node-local checkpoints need each node's own disk."""
    token = work_name("node")
    if leader:
        local.make_work_entry(PROBE, token)
    tokens = [t for t in all_gather(token if leader else None) if t is not None]
    shared = leader and any(t != token and os.path.lexists(local.work_path(PROBE, t)) for t in tokens)
    verdicts = all_gather(shared)
    if leader:
        local.remove_work_entry(PROBE, token)
    if any(verdicts):
        raise ConfigError(
            f"local_scope='node' keeps each node's checkpoint files on its own disk, but several nodes see the same "
            f"directory {local.root_url} (a shared filesystem, or one directory for all): use local_scope='shared' "
            "there, or give every node a directory on its own disk."
        )


def _listed(storage: CheckpointStorage) -> list[CheckpointInfo]:
    try:
        return storage.list()
    except CheckpointError as err:
        log.warning("Cannot list %s: %s", storage.root_url, err)
        return []


def _copy(info: CheckpointInfo, node: int, *, own: bool) -> Copy:
    part = part_of(info.manifest)
    save_id = info.manifest.get("save_id")
    return Copy(node, None if part is None else part["node"], own, info.name, save_id or "", info.manifest)


@dataclass
class Checkpoint:
    """One save as the job sees it: its copies on the nodes' disks and whether the remote tier has it."""

    name: str
    save_id: str
    copies: list[Copy]
    remote: CheckpointInfo | None = None

    @property
    def manifest(self) -> dict[str, Any]:
        return self.copies[0].manifest if self.copies else self.remote.manifest  # type: ignore[union-attr]

    @property
    def parts(self) -> int:
        """How many parts it was written in (1 for a checkpoint held whole)."""
        part = part_of(self.manifest)
        return 1 if part is None else int(part["nodes"])

    @property
    def whole_on(self) -> list[int]:
        """The nodes that hold it whole (checkpoints written with ``local_scope="shared"``)."""
        return sorted({copy.node for copy in self.copies if copy.part is None})

    def holders(self, part: int) -> list[int]:
        """The nodes holding part ``part`` (its own node, or peers with a replica)."""
        return sorted({copy.node for copy in self.copies if copy.part == part})

    @property
    def missing(self) -> list[int]:
        """The parts no node holds."""
        if self.whole_on:
            return []
        return [part for part in range(self.parts) if not self.holders(part)]

    @property
    def complete(self) -> bool:
        """Whether it can be restored: every part is on some node, or the remote tier holds it."""
        return not self.missing or self.remote is not None

    @property
    def step(self) -> int:
        step = self.manifest.get("step")
        return step if isinstance(step, int) else -1

    def info(self, local: CheckpointStorage) -> CheckpointInfo:
        """Its info, named in ``local`` (the manifest of a part, or the remote one)."""
        return CheckpointInfo(name=self.name, url=local.url(self.name), manifest=self.manifest)

    def lacks(self) -> str:
        """What is missing, on which node, for an error message."""
        described = []
        for part in self.missing:
            files = [name for name in part_files(self.manifest, part) if not name.startswith(".")]
            described.append(f"part {part} (written on node {part}: {', '.join(files) or 'no data files'})")
        return f"{self.name} lacks {'; '.join(described)}: no node holds it, nor a copy of it"


@dataclass
class JobView:
    """Every checkpoint of the job's nodes (and remote tier), oldest first."""

    checkpoints: list[Checkpoint]

    @classmethod
    def gather(cls, views: list[list[Copy] | None], remote: dict[str, CheckpointInfo] | None) -> JobView:
        """The view from every rank's description (``None`` for ranks that do not describe a node)."""
        found: dict[tuple[str, str], Checkpoint] = {}
        for copies in views:
            for copy in copies or []:
                found.setdefault((copy.name, copy.save_id), Checkpoint(copy.name, copy.save_id, [])).copies.append(copy)
        for name, info in (remote or {}).items():
            save_id = info.manifest.get("save_id")
            key = (name, save_id if isinstance(save_id, str) else "")
            found.setdefault(key, Checkpoint(name, key[1], [])).remote = info
        ordered = sorted(found.values(), key=lambda c: (c.step, float(c.manifest.get("created", 0.0)), c.name))
        return cls(ordered)

    @property
    def complete(self) -> list[Checkpoint]:
        return [c for c in self.checkpoints if c.complete]

    def newer_incomplete(self) -> list[Checkpoint]:
        """Incomplete checkpoints newer than the newest complete one."""
        complete = self.complete
        newest = complete[-1] if complete else None
        out = [c for c in self.checkpoints if not c.complete]
        if newest is not None:
            out = [
                c
                for c in out
                if (c.step, c.manifest.get("created", 0.0)) > (newest.step, newest.manifest.get("created", 0.0))
            ]
        return out

    def find(self, step: int | None, name: str | None) -> list[Checkpoint]:
        """The checkpoints called ``name``, or of ``step``, or all, oldest first (complete or not)."""
        if name is not None:
            return [c for c in self.checkpoints if c.name == name]
        if step is not None:
            return [c for c in self.checkpoints if c.step == step]
        return list(self.checkpoints)


__all__ = ["Checkpoint", "Copy", "JobView", "check_own_disks", "describe", "replica_parts", "replica_storage"]
