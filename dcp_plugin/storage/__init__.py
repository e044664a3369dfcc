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

import builtins
import functools
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem

from dcp_plugin.errors import (
    CheckpointCorruptError,
    CheckpointError,
    CheckpointExistsError,
    CheckpointNotFoundError,
    NotACheckpointError,
    StorageAccessError,
    UnsafeCheckpointError,
)
from dcp_plugin.storage import manifest as manifests
from dcp_plugin.storage.commit import (
    MarkerCommit,
    PendingWrite,
    RenameCommit,
    check_target_is_replaceable,
    strategy_for,
)
from dcp_plugin.storage.integrity import check_checkpoint_files
from dcp_plugin.storage.listing import Listing, Scan
from dcp_plugin.storage.names import (
    BLOBS,
    FORMAT_VERSION,
    MANIFEST_NAME,
    METADATA_NAME,
    STEP_NAME,
    check_name,
    step_name,
)
from dcp_plugin.storage.root import StorageRoot, access_error
from dcp_plugin.storage.transfer import copy_checkpoint

if TYPE_CHECKING:
    from dcp_plugin.storage.dcp_io import IncrementalPlan, RunWrite

log = logging.getLogger(__name__)

_F = TypeVar("_F", bound=Callable[..., Any])


def _storage_errors(action: str) -> Callable[[_F], _F]:
    """On remote storage, turn the client's own errors (botocore, aiohttp, gcsfs...) into one
    :class:`StorageAccessError` naming the URL and the likely fix. Project errors pass through unchanged."""

    def decorate(method: _F) -> _F:
        @functools.wraps(method)
        def wrapper(self: CheckpointStorage, *args: Any, **kwargs: Any) -> Any:
            try:
                return method(self, *args, **kwargs)
            except (CheckpointError, ValueError, NotADirectoryError):
                raise
            except Exception as err:
                if self.is_local:
                    raise
                raise access_error(err, self.root_url, action=action) from err

        return wrapper  # type: ignore[return-value]

    return decorate


@dataclass(frozen=True)
class CheckpointInfo:
    """A committed checkpoint: its name in the root, the URL of its data, and its validated manifest."""

    name: str
    url: str
    manifest: dict[str, Any]

    @property
    def step(self) -> int | None:
        return self.manifest.get("step")

    @property
    def created(self) -> float:
        return float(self.manifest.get("created", 0.0))

    @property
    def metadata(self) -> dict[str, Any]:
        return self.manifest.get("metadata", {})

    @property
    def has_checksums(self) -> bool:
        return isinstance(self.manifest.get("files"), dict)


class CheckpointStorage:
    """A directory (local path or fsspec URL) holding checkpoints."""

    def __init__(self, root: str | os.PathLike[str], storage_options: dict[str, Any] | None = None) -> None:
        self._root = StorageRoot(root, storage_options)
        self.strategy = strategy_for(self._root)
        self._listing = Listing(self._root, self.strategy)

    def __repr__(self) -> str:
        return f"CheckpointStorage({self.root_url!r})"

    # -- identity ---------------------------------------------------------------------------------
    @property
    def fs(self) -> Any:
        return self._root.fs

    @property
    def root(self) -> str:
        return self._root.path

    @property
    def root_url(self) -> str:
        return self._root.url_root

    @property
    def is_local(self) -> bool:
        return self._root.is_local

    @property
    def protocol(self) -> str:
        return self._root.protocol

    @property
    def storage_options(self) -> dict[str, Any]:
        return self._root.storage_options

    def url(self, name: str, *more: str) -> str:
        """A user-facing path or URL of ``name`` (and of ``more`` names below it)."""
        return self._root.url(self._root.join(name, *more))

    # -- checks -----------------------------------------------------------------------------------
    @_storage_errors("use")
    def check_root(self) -> None:
        """Fail clearly if the root exists but is a file."""
        if self.fs.exists(self.root) and not self.fs.isdir(self.root):
            raise NotADirectoryError(
                f"The checkpoint directory {self.root_url} is a file; pass a directory (it is created if missing)."
            )

    def ensure_root(self) -> None:
        """Create the root directory (never a bucket), or say clearly why it cannot be one."""
        self.check_root()
        if self.is_local:
            try:
                os.makedirs(self.root, exist_ok=True)
            except OSError as err:
                raise OSError(f"Cannot create the checkpoint directory {self.root_url}: {err.strerror}.") from err
            if not os.access(self.root, os.W_OK | os.X_OK):
                raise PermissionError(
                    f"The checkpoint directory {self.root_url} is not writable; choose a writable directory or "
                    "fix its permissions."
                )
        else:
            self._root.check_reachable()
            if self._root.bucket is None:
                self.fs.makedirs(self.root, exist_ok=True)

    # -- writing ----------------------------------------------------------------------------------
    @_storage_errors("write a checkpoint to")
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
    ) -> Any:
        """A DCP writer that hashes what it writes and commits ``pending`` once every rank has written.
        ``run_write(work)`` runs the write (by default on the calling thread; the engine lowers its priority).
        With ``incremental``, tensors kept in shared blobs are written there, or not at all when unchanged."""
        from dcp_plugin.storage.dcp_io import CommittingFileSystemWriter, CommittingFsspecWriter  # imports torch

        kwargs: dict[str, Any] = dict(
            single_file_per_rank=True,
            sync_files=sync_files,
            thread_count=thread_count,
            per_thread_copy_ahead=per_thread_copy_ahead,
            incremental=incremental,
        )
        root, strategy = self._root, self.strategy
        commit: dict[str, Any] = dict(root=root, strategy=strategy, pending=pending)
        if run_write is not None:
            commit["run_write"] = run_write
        if self.is_local:
            return CommittingFileSystemWriter(pending.directory, **commit, **kwargs)
        # Remote files are durable once closed; DCP would fall back to a machine-wide os.sync() per file.
        kwargs["sync_files"] = False
        url = self._root.url(pending.directory)
        return CommittingFsspecWriter(url, **commit, **kwargs, **self.storage_options)

    def abort(self, pending: PendingWrite) -> None:
        """Remove what a failed write left behind (best effort; never touches committed data)."""
        self.strategy.abort(pending)

    # -- reading ----------------------------------------------------------------------------------
    @_storage_errors("list")
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

    @_storage_errors("read")
    def info(self, name: str) -> CheckpointInfo:
        """The committed checkpoint called ``name``; raises a project error saying why if there is none."""
        check_name(name)
        found = self._listing.find(name)
        if found is None:
            raise CheckpointNotFoundError(self._listing.explain_missing(name))
        return self._info(found)

    def _info(self, found: Any) -> CheckpointInfo:
        return CheckpointInfo(name=found.name, url=self._root.url(found.directory), manifest=found.manifest)

    def read_manifest(self, name: str) -> dict[str, Any]:
        return self.info(name).manifest

    def is_committed(self, name: str) -> bool:
        try:
            return self._listing.find(name) is not None
        except (CheckpointError, ValueError):
            return False

    @_storage_errors("read")
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
            reader.read_metadata()
        except (CheckpointError, ValueError, OSError) as err:
            return [str(err)]
        files = info.manifest.get("files")
        if not isinstance(files, dict):
            return []  # written before checksums: the metadata checks above are all there is
        return check_checkpoint_files(
            self.fs,
            self.data_path(info),
            files,
            blob_area=self.blob_area,
            blobs=info.manifest.get("blobs") or {},
            is_local=self.is_local,
            progress=progress,
        )

    @property
    def blob_area(self) -> str:
        """Where the shared blobs of incremental checkpoints are (a path for ``self.fs``)."""
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

    # -- deleting and cleaning up -----------------------------------------------------------------
    @_storage_errors("delete from")
    def delete(self, name: str) -> None:
        """Delete a checkpoint: invisible first, so a crash mid-delete never leaves a broken committed one.

        A symbolic link (e.g. Lightning's ``save_last="link"``) or a plain file under ``name`` is removed itself;
        a link's target is left alone."""
        check_name(name)
        self._root.forget_listings()
        path = self._root.join(name)
        if not (self.fs.exists(path) or (self.is_local and os.path.islink(path))):
            raise CheckpointNotFoundError(f"Nothing to delete at {self.url(name)}.")
        self.strategy.delete(name)

    @_storage_errors("list")
    def incomplete(self) -> builtins.list[str]:
        """Leftovers of writes, replacements and deletions that never finished (paths relative to the root)."""
        return self._listing.leftovers()

    def remove_incomplete(self, entry: str) -> None:
        """Remove one leftover named by :meth:`incomplete` (never committed data)."""
        self._listing.remove_leftover(entry)

    @_storage_errors("clean up")
    def collect_blobs(self) -> builtins.list[str]:
        """Remove the shared blobs of incremental checkpoints that no committed checkpoint uses any more and no
        write in flight creates or refers to (retention calls it after deleting); returns their names."""
        return self._listing.collect_blobs()

    @_storage_errors("clean up")
    def purge(self) -> builtins.list[str]:
        """Remove every leftover; returns what was removed. Committed checkpoints are never touched."""
        removed = []
        for entry in self.incomplete():
            self.remove_incomplete(entry)
            removed.append(entry)
        return removed


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
