"""Reading a checkpoint root: which checkpoints are committed, their manifests, DCP readers for them, and
verification against their checksums."""

from __future__ import annotations

import builtins
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from fsspec.core import url_to_fs

from dcp_plugin.errors import CheckpointError, CheckpointNotFoundError
from dcp_plugin.storage import plain
from dcp_plugin.storage.base import StorageBase
from dcp_plugin.storage.integrity import blob_area_of, check_checkpoint_files
from dcp_plugin.storage.listing import Scan
from dcp_plugin.storage.names import BLOBS, MANIFEST_NAME, check_name, step_name
from dcp_plugin.storage.node_parts import part_files
from dcp_plugin.storage.root import storage_errors

log = logging.getLogger("dcp_plugin.storage")


@dataclass(frozen=True)
class CheckpointInfo:
    """A committed checkpoint: its name in the root, the URL of its data, and its validated manifest.

    ``unverified`` marks a directory written by plain ``dcp.save`` (no manifest, so no checksums): its manifest
    is made up from its metadata, and it is only read (``dcp-plugin adopt`` commits one)."""

    name: str
    """The checkpoint's name in its root (``step_000000100``, or the name it was saved under)."""
    url: str
    """Where its data files are: a local path or fsspec URL that DCP's readers accept."""
    manifest: dict[str, Any]
    """The validated manifest (``dcp_plugin.json``): step, ranks, entries, files and their checksums."""
    unverified: bool = False
    """True for a directory written by plain ``dcp.save``: read only, nothing checksummed."""
    restored_from: dict[str, int] = field(default_factory=dict, compare=False)
    """After a load on node-local disks (``local_scope="node"``): how many bytes came from each place, summed over
    the nodes: ``"local"`` (the node's own disk: its part, or the copies of other parts it keeps), ``"peer"``
    (fetched from another node over the process group), ``"remote"`` (the remote tier). Empty otherwise."""

    @property
    def layout(self) -> str | None:
        """``"dcp"`` when the state is stored under DCP's own keys without a dcp-plugin skeleton (plain DCP)."""
        layout = self.manifest.get("layout")
        return layout if isinstance(layout, str) else None

    @property
    def step(self) -> int | None:
        """The training step it was saved at, or ``None`` when the save named none."""
        return self.manifest.get("step")

    @property
    def created(self) -> float:
        """When it was written, in seconds since the epoch (0.0 when unknown)."""
        return float(self.manifest.get("created", 0.0))

    @property
    def metadata(self) -> dict[str, Any]:
        """The plain values saved with it (``save(metadata=...)``, metrics, the adapters' notes)."""
        return self.manifest.get("metadata", {})

    @property
    def has_checksums(self) -> bool:
        """Whether its manifest records a checksum for every file (all checkpoints since format 2)."""
        return isinstance(self.manifest.get("files"), dict)


class StorageCatalog(StorageBase):
    """The reading half of :class:`~dcp_plugin.storage.CheckpointStorage`."""

    @storage_errors("list")
    def scan(self) -> Scan:
        """Committed checkpoints (oldest first) and the entries that look like checkpoints but are broken."""
        return self._listing.scan()

    def list(self) -> list[CheckpointInfo]:
        """Committed checkpoints, oldest first (by step, then creation time). Broken ones are skipped with a
        warning; see :meth:`scan` for them."""
        scan = self.scan()
        for name, reason in scan.broken:
            log.warning("Skipping %s: %s", self.url(name), reason)
        return [self._info(found) for found in scan.found]

    def latest(self) -> CheckpointInfo | None:
        infos = self.list()
        return infos[-1] if infos else None

    @storage_errors("read")
    def info(self, name: str) -> CheckpointInfo:
        """The committed checkpoint called ``name``, or the plain-DCP directory called ``name`` (``unverified``);
        raises a project error saying why if there is neither."""
        check_name(name)
        found = self._listing.find(name)
        if found is None:
            if plain.holds_plain_dcp(self._root, name):
                return self._plain_info(name)
            raise CheckpointNotFoundError(self._listing.explain_missing(name))
        return self._info(found)

    def _plain_info(self, name: str) -> CheckpointInfo:
        manifest, written_by_us = plain.describe(self._root, name)
        if written_by_us:  # a dcp-plugin write that never committed: it may be incomplete
            raise CheckpointNotFoundError(self._listing.explain_missing(name))
        return CheckpointInfo(name=name, url=self.url(name), manifest=manifest, unverified=True)

    @storage_errors("list")
    def plain_dcp(self) -> builtins.list[str]:
        """Names of the directories written by plain ``dcp.save`` (no manifest), by the step their names end with.
        They are never listed as committed checkpoints; :meth:`info` reads one, unverified."""
        return plain.plain_names(self._root)

    def _info(self, found: Any) -> CheckpointInfo:
        return CheckpointInfo(name=found.name, url=self._root.url(found.directory), manifest=found.manifest)

    def read_manifest(self, name: str) -> dict[str, Any]:
        return self.info(name).manifest

    def is_committed(self, name: str) -> bool:
        try:
            return self._listing.find(name) is not None
        except (CheckpointError, ValueError):
            return False

    @storage_errors("read")
    def find_step(self, step: int) -> CheckpointInfo:
        name = step_name(step)
        if self.is_committed(name):
            return self.info(name)
        infos = self.list()
        for info in infos:
            if info.step == step:
                return info
        steps = [i.step for i in infos if i.step is not None]
        raise CheckpointNotFoundError(
            f"No committed checkpoint for step {step} in {self.root_url}; committed steps: "
            f"{steps if steps else 'none'}."
        )

    def metadata_reader(self, name: str | CheckpointInfo) -> Any:
        """A DCP reader for a committed checkpoint: ``.metadata`` read without running code, paths confined to
        the checkpoint, checksums verified before data is used."""
        from dcp_plugin.storage.reader import SafeFileSystemReader, SafeFsspecReader  # imports torch

        info = name if isinstance(name, CheckpointInfo) else self.info(name)
        directory = self.data_path(info)
        if self.is_local:
            return SafeFileSystemReader(self._root, directory, info.url, info.manifest)
        return SafeFsspecReader(self._root, directory, info.url, info.manifest)

    def data_path(self, info: CheckpointInfo) -> str:
        """Where a committed checkpoint's files are, as a filesystem path without protocol (for ``self.fs``)."""
        if self.is_local:
            return info.url
        _, path = url_to_fs(info.url, **self.storage_options)
        return path.rstrip("/")

    def verify(self, name: str | CheckpointInfo, progress: Any = None) -> builtins.list[str]:
        """Every problem found with a committed checkpoint: malformed metadata, paths leaving it, missing or
        changed files (checksums). An empty list means it verifies."""
        try:
            info = name if isinstance(name, CheckpointInfo) else self.info(name)
            reader = self.metadata_reader(info)
            reader.bound_allocations = False  # nothing is allocated: a checkpoint larger than this machine verifies
            reader.read_metadata()
        except (CheckpointError, ValueError, OSError) as err:
            return [str(err)]
        files = info.manifest.get("files")
        if not isinstance(files, dict):
            return []  # written before checksums: the metadata checks above are all there is
        files = {name: files[name] for name in part_files(info.manifest)}  # a node's part: the files it holds
        return check_checkpoint_files(
            self.fs,
            self.data_path(info),
            files,
            blob_area=blob_area_of(self._root),
            blobs=info.manifest.get("blobs") or {},
            is_local=self.is_local,
            progress=progress,
        )

    @property
    def blob_area(self) -> str:
        """Where writers keep the shared blobs of incremental checkpoints (a path for ``self.fs``). Readers of a local
        checkpoint never need it: each blob a checkpoint uses is linked into its own directory."""
        return self._root.work(BLOBS)

    def newest_verified_before(self, info: CheckpointInfo, *, limit: int = 3) -> CheckpointInfo | None:
        """The newest checkpoint older than ``info`` that verifies (checking at most ``limit`` of them), to name
        a fallback when ``info`` is damaged."""
        try:
            older = [i for i in self.list() if (i.step or -1, i.created) < (info.step or -1, info.created)]
        except CheckpointError:
            return None
        for candidate in reversed(older[-limit:]):
            if not self.verify(candidate):
                return candidate
        return None

    def is_occupied(self, name: str) -> bool:
        """Whether something is at ``name`` that a save there would replace: a checkpoint (even a damaged one), a
        symbolic link (``save_last="link"``) or a plain file (e.g. a ``torch.save`` checkpoint). A directory
        without a manifest is not: a save there fails rather than replace what it holds."""
        if self.is_committed(name) or self.is_file(name):
            return True
        path = self._root.join(name)
        if self.is_local:
            return os.path.islink(path) or os.path.lexists(f"{path}/{MANIFEST_NAME}")
        return bool(self.fs.exists(f"{path}/{MANIFEST_NAME}"))

    def is_file(self, name: str) -> bool:
        """Whether ``name`` is a plain file (for example one written by ``torch.save``)."""
        self._root.forget_listings()
        return self.fs.isfile(self._root.join(name))

    def open_file(self, name: str, mode: str = "rb") -> Any:
        """Open the plain file ``name`` (to read checkpoints written by other tools)."""
        return self.fs.open(self._root.join(name), mode)

    def foreign_entries(self, marker_files: Sequence[str]) -> builtins.list[str]:
        """The names in the root (sorted) holding any of ``marker_files``: directories another tool wrote (say,
        Accelerate's own ``save_state``), for messages that say what is there; empty if the root is missing or
        cannot be listed."""
        self._root.forget_listings()
        try:
            if not self.fs.exists(self.root):
                return []
            names = sorted(str(p).rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(self.root, detail=False))
            return [
                name
                for name in names
                if not name.startswith(".") and any(self.fs.exists(self._root.join(name, f)) for f in marker_files)
            ]
        except OSError:
            return []

    def root_exists(self) -> bool | None:
        """Whether the root directory exists (``None`` when the storage cannot tell)."""
        try:
            return bool(self.fs.exists(self.root))
        except OSError:
            return None


__all__ = ["CheckpointInfo", "StorageCatalog"]
