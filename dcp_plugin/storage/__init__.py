"""Where checkpoints live and how they become committed, on any fsspec filesystem.

Layout under a root directory or URL::

    <root>/<name>/                  a committed checkpoint: DCP files, ``.metadata`` and ``dcp_plugin.json``
    <root>/.tmp-<name>-<id>/        a checkpoint being written (never listed)
    <root>/.old-<name>-<id>/        a committed checkpoint being replaced (renamed back if the swap crashed)

Commit protocol: a checkpoint is written to a location nobody reads, and becomes visible only after
every rank succeeded (DCP's coordinator calls the writer's ``finish`` once all ranks wrote). Then
``dcp_plugin.json`` (the manifest and commit marker) is written last, and on filesystems with atomic
rename the directory is renamed into place. Object stores have no rename: there a fresh checkpoint is
written in place and the manifest alone marks it committed. Listing sees committed checkpoints only.

This module is the only place that handles paths; everything else passes names and URLs around.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader, FsspecWriter
from torch.distributed.checkpoint.metadata import Metadata

from dcp_plugin.errors import CheckpointExistsError, CheckpointNotFoundError, NotACheckpointError
from dcp_plugin.safety import load_metadata

log = logging.getLogger(__name__)

MANIFEST_NAME = "dcp_plugin.json"
METADATA_NAME = ".metadata"
FORMAT_VERSION = 1
TMP_PREFIX = ".tmp-"
OLD_PREFIX = ".old-"
STEP_NAME = re.compile(r"^step_(\d+)$")


def step_name(step: int) -> str:
    """Directory name for a step: zero-padded so names sort like steps."""
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be a non-negative integer, got {step!r}.")
    return f"step_{step:09d}"


@dataclass(frozen=True)
class CheckpointInfo:
    """A committed checkpoint."""

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


@dataclass
class PendingWrite:
    """A checkpoint being written: DCP writes to ``write_url``; commit makes it ``name``."""

    name: str
    write_name: str
    replaces_committed: bool
    manifest: dict[str, Any] = field(default_factory=dict)


class CheckpointStorage:
    """A directory (local path or fsspec URL) holding checkpoints."""

    def __init__(self, root: str | os.PathLike[str], storage_options: dict[str, Any] | None = None) -> None:
        root = os.fspath(root)
        if not root:
            raise ValueError("The checkpoint directory is empty; pass a local path or a URL such as s3://bucket/run.")
        self.storage_options = dict(storage_options or {})
        self.fs, path = url_to_fs(root, **self.storage_options)
        protocols = {self.fs.protocol} if isinstance(self.fs.protocol, str) else set(self.fs.protocol)
        self.is_local = isinstance(self.fs, LocalFileSystem) and bool(protocols & {"file", "local"})
        self.root = os.path.abspath(path) if self.is_local else path.rstrip("/")
        self.atomic_rename = self.is_local
        self.root_url = self.root if self.is_local else self.fs.unstrip_protocol(self.root)

    def __repr__(self) -> str:
        return f"CheckpointStorage({self.root_url!r})"

    @property
    def protocol(self) -> str:
        protocol = self.fs.protocol
        return protocol if isinstance(protocol, str) else protocol[0]

    # -- paths -----------------------------------------------------------------------------------
    def _path(self, name: str) -> str:
        return f"{self.root}/{name}" if name else self.root

    def url(self, name: str, *more: str) -> str:
        """What DCP is given: a plain path for local files, a URL otherwise (``more`` names go below ``name``)."""
        path = "/".join([self._path(name), *more])
        return path if self.is_local else self.fs.unstrip_protocol(path)

    # -- checks ----------------------------------------------------------------------------------
    def check_root(self) -> None:
        """Fail clearly if the root exists but is a file."""
        if self.fs.exists(self.root) and not self.fs.isdir(self.root):
            raise NotADirectoryError(
                f"The checkpoint directory {self.root_url} is a file; pass a directory (it is created if missing)."
            )

    def ensure_root(self) -> None:
        """Create the root directory, or say clearly why it cannot be one."""
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
            self.fs.makedirs(self.root, exist_ok=True)

    # -- writing ---------------------------------------------------------------------------------
    def begin_write(self, name: str, overwrite: bool = False) -> PendingWrite:
        """Prepare a fresh location for checkpoint ``name`` (called on one rank)."""
        self._check_name(name)
        self.ensure_root()
        self._recover(name)
        committed = self.is_committed(name)
        if committed and not overwrite:
            raise CheckpointExistsError(
                f"A committed checkpoint already exists at {self.url(name)}; pick another step/name, delete it "
                "first, or pass overwrite=True (the old one stays until the new one is committed)."
            )
        if self.fs.exists(self._path(name)) and not committed:
            if not self.fs.isdir(self._path(name)):
                raise NotACheckpointError(
                    f"{self.url(name)} is a file, not a checkpoint directory; move it away or choose another name."
                )
            log.warning("Removing %s: an earlier write there never committed.", self.url(name))
            self._remove_tree(self._path(name))
        # Object stores write a fresh checkpoint in place (the manifest commits it); everything else is staged.
        staged = self.atomic_rename or committed
        write_name = f"{TMP_PREFIX}{name}-{uuid.uuid4().hex[:12]}" if staged else name
        self.fs.makedirs(self._path(write_name), exist_ok=True)
        return PendingWrite(name=name, write_name=write_name, replaces_committed=committed)

    def commit(self, pending: PendingWrite, manifest: dict[str, Any]) -> None:
        """Mark a fully written checkpoint committed (runs after every rank wrote its part)."""
        manifest = {"format": FORMAT_VERSION, "name": pending.name, **manifest}
        self._write_manifest(pending.write_name, manifest)
        if pending.write_name == pending.name:
            return
        final = self._path(pending.name)
        staged = self._path(pending.write_name)
        if self.atomic_rename:
            if os.path.exists(final) and _exchange(staged, final):
                # One atomic step: readers see the old checkpoint or the new one, never neither.
                _fsync_dir(self.root)
                self._discard(pending.write_name)  # now holds the old checkpoint
                return
            old = None
            if os.path.exists(final):
                old = self._path(f"{OLD_PREFIX}{pending.name}-{uuid.uuid4().hex[:12]}")
                os.rename(final, old)
            os.rename(staged, final)
            _fsync_dir(self.root)
            if old is not None:
                self._discard(old.rsplit("/", 1)[-1])
            return
        # Object store replacing a committed checkpoint: the new copy is already committed under its
        # staging name, so a crash from here on is repaired by _recover().
        self._uncommit(pending.name)
        self._remove_tree(final)
        self._copy_tree(staged, final)
        self._write_manifest(pending.name, manifest)
        self._discard(pending.write_name)

    def abort(self, pending: PendingWrite) -> None:
        """Remove what a failed write left behind (best effort, never touches committed data).

        A staged copy that is already committed stays: a replacement that failed half-way may have removed
        the old checkpoint, and then this copy is the only one (the next writer moves it into place).
        """
        if self.is_committed(pending.write_name):
            return
        try:
            self._remove_tree(self._path(pending.write_name))
        except Exception as err:  # noqa: BLE001 - cleanup must not hide the original failure
            log.warning("Could not remove the incomplete checkpoint %s: %s", self.url(pending.write_name), err)

    # -- reading ---------------------------------------------------------------------------------
    def is_committed(self, name: str) -> bool:
        self._forget_listings()
        return self.fs.exists(f"{self._path(name)}/{MANIFEST_NAME}")

    def read_manifest(self, name: str) -> dict[str, Any]:
        try:
            with self.fs.open(f"{self._path(name)}/{MANIFEST_NAME}", "rb") as handle:
                return json.loads(handle.read().decode("utf-8"))
        except FileNotFoundError:
            raise CheckpointNotFoundError(self._explain_missing(name)) from None
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise NotACheckpointError(
                f"The manifest of {self.url(name)} is corrupted ({err}); the checkpoint cannot be trusted."
            ) from None

    def exists(self, name: str) -> bool:
        """Whether anything (committed or not, file or directory) is at ``name``."""
        self._forget_listings()
        path = self._path(name)
        return self.fs.exists(path) or (self.is_local and os.path.islink(path))

    def is_file(self, name: str) -> bool:
        """Whether ``name`` is a plain file (for example one written by ``torch.save``)."""
        self._forget_listings()
        return self.fs.isfile(self._path(name))

    def open_file(self, name: str, mode: str = "rb") -> Any:
        """Open the plain file ``name`` (to read checkpoints written by other tools)."""
        return self.fs.open(self._path(name), mode)

    def info(self, name: str) -> CheckpointInfo:
        """The committed checkpoint called ``name``. Read-only: if a replacement of it was interrupted, the
        committed copy it left under a staging name is returned (its ``name`` is then that directory)."""
        self._check_name(name)
        if not self.is_committed(name):
            staged = self._newest_staged_copy(name)
            if staged is not None:
                return CheckpointInfo(name=staged, url=self.url(staged), manifest=self.read_manifest(staged))
        return CheckpointInfo(name=name, url=self.url(name), manifest=self.read_manifest(name))

    def list(self) -> list[CheckpointInfo]:
        """Committed checkpoints, oldest first (by step, then creation time)."""
        self._forget_listings()
        if not self.fs.exists(self.root):
            return []
        if not self.fs.isdir(self.root):
            raise NotADirectoryError(f"The checkpoint directory {self.root_url} is a file.")
        infos = []
        for marker in sorted(self.fs.glob(f"{self.root}/*/{MANIFEST_NAME}")):
            name = marker[len(self.root) + 1 : -len(MANIFEST_NAME) - 1]
            if name.startswith("."):
                continue
            try:
                infos.append(CheckpointInfo(name=name, url=self.url(name), manifest=self.read_manifest(name)))
            except (CheckpointNotFoundError, NotACheckpointError) as err:
                log.warning("Skipping %s: %s", self.url(name), err)
        infos.extend(self._interrupted_swaps({info.name for info in infos}))
        return sorted(infos, key=lambda i: (i.step if i.step is not None else -1, i.created, i.name))

    def latest(self) -> CheckpointInfo | None:
        infos = self.list()
        return infos[-1] if infos else None

    def find_step(self, step: int) -> CheckpointInfo:
        name = step_name(step)
        if self.is_committed(name):
            return self.info(name)
        for info in self.list():
            if info.step == step:
                return info
        steps = [i.step for i in self.list() if i.step is not None]
        raise CheckpointNotFoundError(
            f"No committed checkpoint for step {step} in {self.root_url}; committed steps: "
            f"{steps if steps else 'none'}."
        )

    def data_problems(self, name: str) -> tuple[list[str], dict[str, int]]:
        """Data files of checkpoint ``name`` that are missing or shorter than its metadata says, and the bytes
        each data file must hold."""
        metadata = self.metadata_reader(name).read_metadata()
        needed: dict[str, int] = {}
        for location in (metadata.storage_data or {}).values():
            path = str(location.relative_path)
            needed[path] = max(needed.get(path, 0), int(location.offset) + int(location.length))
        problems = []
        for path, length in sorted(needed.items()):
            full = f"{self._path(name)}/{path}"
            if not self.fs.exists(full):
                problems.append(f"missing data file {path}")
            elif self.fs.size(full) < length:
                problems.append(f"{path} is truncated ({self.fs.size(full)} of {length} bytes)")
        return problems, needed

    def metadata_reader(self, name: str) -> FileSystemReader:
        """A DCP reader for a committed checkpoint whose ``.metadata`` is read without running code."""
        url = self.url(name)
        if self.is_local:
            return SafeFileSystemReader(url)
        return SafeFsspecReader(url, **self.storage_options)

    def writer(self, pending: PendingWrite, *, thread_count: int, sync_files: bool, per_thread_copy_ahead: int):
        """A DCP writer that commits ``pending`` once every rank has written."""
        url = self.url(pending.write_name)
        kwargs = dict(
            single_file_per_rank=True,
            sync_files=sync_files,
            thread_count=thread_count,
            per_thread_copy_ahead=per_thread_copy_ahead,
        )
        if self.is_local:
            return CommittingFileSystemWriter(url, storage=self, pending=pending, **kwargs)
        # Remote files are durable once closed; DCP would fall back to a machine-wide os.sync() per file.
        kwargs["sync_files"] = False
        return CommittingFsspecWriter(url, storage=self, pending=pending, **kwargs, **self.storage_options)

    # -- deleting --------------------------------------------------------------------------------
    def delete(self, name: str) -> None:
        """Delete a checkpoint: uncommit it first, so a crash mid-delete never leaves a broken committed one.

        A symbolic link (e.g. Lightning's ``save_last="link"``) or a plain file under ``name`` is removed
        itself; a link's target is left alone.
        """
        self._check_name(name)
        path = self._path(name)
        if self.is_local and os.path.islink(path):
            os.remove(path)
            return
        if not self.fs.exists(path):
            raise CheckpointNotFoundError(f"Nothing to delete at {self.url(name)}.")
        if self.is_file(name):
            self.fs.rm(path)
            return
        self._uncommit(name)
        if self.is_local:
            trash = self._path(f"{OLD_PREFIX}{name}-deleting-{uuid.uuid4().hex[:8]}")
            os.rename(path, trash)
            shutil.rmtree(trash)
            return
        self._remove_tree(path)

    def incomplete(self) -> list[str]:
        """Names of leftovers from writes that never committed (for cleanup tools)."""
        if not self.fs.exists(self.root):
            return []
        names = []
        for entry in self.fs.ls(self.root, detail=False):
            name = entry.rstrip("/").rsplit("/", 1)[-1]
            if name.startswith((TMP_PREFIX, OLD_PREFIX)) or (
                self.fs.isdir(entry)
                and not self.is_committed(name)
                and (STEP_NAME.match(name) or self._holds_dcp_files(entry))
            ):
                names.append(name)
        return sorted(names)

    def _holds_dcp_files(self, path: str) -> bool:
        return self.fs.exists(f"{path}/{METADATA_NAME}") or bool(self.fs.glob(f"{path}/*.distcp"))

    def remove_incomplete(self, name: str) -> None:
        if self.is_committed(name) and not name.startswith((TMP_PREFIX, OLD_PREFIX)):
            raise ValueError(f"{self.url(name)} is committed; use delete() to remove a committed checkpoint.")
        self._remove_tree(self._path(name))

    # -- internals -------------------------------------------------------------------------------
    def _forget_listings(self) -> None:
        # Other processes (ranks, the writer daemon) change the directory; never trust cached listings.
        if not self.is_local:
            self.fs.invalidate_cache()

    def _check_name(self, name: str) -> None:
        if not name or "/" in name or name in (".", "..") or name.startswith((TMP_PREFIX, OLD_PREFIX)):
            raise ValueError(f"Invalid checkpoint name {name!r}: use a plain directory name.")

    def _explain_missing(self, name: str) -> str:
        path = self._path(name)
        if not self.fs.exists(path):
            return f"No checkpoint at {self.url(name)}."
        if not self.fs.isdir(path):
            return (
                f"{self.url(name)} is a file, not a dcp-plugin checkpoint directory. If it was written by "
                "torch.save, load it with torch.load, or convert it with `dcp-plugin convert`."
            )
        if self.fs.exists(f"{path}/{METADATA_NAME}"):
            return (
                f"{self.url(name)} holds DCP files but was never committed by dcp-plugin (a write was interrupted, "
                "or another tool wrote it); it cannot be trusted. Use an earlier checkpoint."
            )
        return f"{self.url(name)} is not a committed checkpoint (no {MANIFEST_NAME}); the write was interrupted."

    def _write_manifest(self, name: str, manifest: dict[str, Any]) -> None:
        data = json.dumps(manifest, indent=1, sort_keys=True).encode("utf-8")
        path = f"{self._path(name)}/{MANIFEST_NAME}"
        if self.is_local:
            tmp = f"{path}.tmp"
            with open(tmp, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.rename(tmp, path)
            _fsync_dir(self._path(name))
        else:
            with self.fs.open(path, "wb") as handle:
                handle.write(data)

    def _uncommit(self, name: str) -> None:
        marker = f"{self._path(name)}/{MANIFEST_NAME}"
        if self.fs.exists(marker):
            self.fs.rm(marker)

    def _remove_tree(self, path: str) -> None:
        if self.is_local:
            shutil.rmtree(path, ignore_errors=False) if os.path.exists(path) else None
        elif self.fs.exists(path):
            self.fs.rm(path, recursive=True)

    def _copy_tree(self, source: str, target: str) -> None:
        """Copy the data files; the manifest is written by the caller, last, so a partial copy is never committed."""
        self.fs.makedirs(target, exist_ok=True)
        for src in self.fs.find(source):
            if src.rsplit("/", 1)[-1] != MANIFEST_NAME:
                self.fs.copy(src, target + src[len(source) :])

    def _discard(self, name: str) -> None:
        """Remove a superseded copy, uncommitted first, so an interrupted removal never brings it back."""
        try:
            self._uncommit(name)
            self._remove_tree(self._path(name))
        except Exception as err:  # noqa: BLE001 - a leftover is harmless once uncommitted
            log.warning("Could not remove the superseded copy %s: %s", self.url(name), err)

    def _newest_staged_copy(self, name: str) -> str | None:
        staged = self._staged_copies(name)
        if not staged:
            return None
        return max(staged, key=lambda n: float(self.read_manifest(n).get("created", 0.0)))

    def _staged_copies(self, name: str) -> list[str]:
        if not self.fs.exists(self.root):
            return []
        prefixes = (f"{TMP_PREFIX}{name}-", f"{OLD_PREFIX}{name}-")
        found = []
        for entry in self.fs.ls(self.root, detail=False):
            base = entry.rstrip("/").rsplit("/", 1)[-1]
            if base.startswith(prefixes) and "-deleting-" not in base and self.is_committed(base):
                found.append(base)
        return found

    def _recover(self, name: str) -> None:
        """Finish a replacement that crashed after the new copy was committed but before it was in place.

        Only the writer calls this (``begin_write``). A copy committed moments ago may belong to another
        process's writer that is swapping it in right now; leave it alone.
        """
        if self.is_committed(name):
            return
        horizon = time.time() - _LIVE_SWAP_S
        staged = [n for n in self._staged_copies(name) if float(self.read_manifest(n).get("committed", 0)) < horizon]
        if not staged:
            return
        newest = max(staged, key=lambda n: float(self.read_manifest(n).get("created", 0.0)))
        log.warning("Restoring %s from %s (an earlier replacement was interrupted).", name, newest)
        if self.is_committed(name):
            return
        self._remove_tree(self._path(name))
        if self.atomic_rename:
            os.rename(self._path(newest), self._path(name))
        else:
            self._copy_tree(self._path(newest), self._path(name))
            self._write_manifest(name, self.read_manifest(newest))
            self._discard(newest)

    def _interrupted_swaps(self, listed: set[str]) -> list[CheckpointInfo]:
        """Committed copies left under staging names by interrupted replacements whose name is now empty."""
        if not self.fs.exists(self.root):
            return []
        found: dict[str, CheckpointInfo] = {}
        for entry in self.fs.ls(self.root, detail=False):
            base = entry.rstrip("/").rsplit("/", 1)[-1]
            if not base.startswith((TMP_PREFIX, OLD_PREFIX)) or "-deleting-" in base or not self.is_committed(base):
                continue
            try:
                manifest = self.read_manifest(base)
            except (CheckpointNotFoundError, NotACheckpointError):
                continue
            name = manifest.get("name")
            if not name or name in listed or self.is_committed(name):
                continue
            if name not in found or manifest.get("created", 0) > found[name].manifest.get("created", 0):
                found[name] = CheckpointInfo(name=base, url=self.url(base), manifest=manifest)
        return list(found.values())


# A staged copy committed less than this long ago may still be moved into place by its writer.
_LIVE_SWAP_S = 60.0

_RENAME_EXCHANGE = 2  # linux/fs.h


def _exchange(source: str, target: str) -> bool:
    """Atomically swap two paths with renameat2(RENAME_EXCHANGE); False where the OS or filesystem can't."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    result = renameat2(at_fdcwd, os.fsencode(source), at_fdcwd, os.fsencode(target), _RENAME_EXCHANGE)
    return result == 0


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _bytes_written(metadata: Metadata) -> int:
    return sum(int(getattr(info, "length", 0)) for info in (metadata.storage_data or {}).values())


class _CommitOnFinish:
    """Mixed into DCP writers: after DCP's coordinator writes ``.metadata``, commit the checkpoint."""

    def _init_commit(self, storage: CheckpointStorage, pending: PendingWrite) -> None:
        self._dcp_plugin_storage = storage
        self._dcp_plugin_pending = pending

    def finish(self, metadata: Metadata, results: list) -> None:  # type: ignore[override]
        super().finish(metadata, results)  # type: ignore[misc]
        manifest = dict(self._dcp_plugin_pending.manifest)
        manifest["bytes"] = _bytes_written(metadata)
        manifest["committed"] = time.time()
        self._dcp_plugin_storage.commit(self._dcp_plugin_pending, manifest)


class CommittingFileSystemWriter(_CommitOnFinish, FileSystemWriter):
    def __init__(self, path: str, *, storage: CheckpointStorage, pending: PendingWrite, **kwargs: Any) -> None:
        FileSystemWriter.__init__(self, path, **kwargs)
        self._init_commit(storage, pending)


class CommittingFsspecWriter(_CommitOnFinish, FsspecWriter):
    def __init__(self, path: str, *, storage: CheckpointStorage, pending: PendingWrite, **kwargs: Any) -> None:
        FsspecWriter.__init__(self, path, **kwargs)
        self._init_commit(storage, pending)


class _SafeMetadata:
    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = self.fs.concat_path(self.path, METADATA_NAME)  # type: ignore[attr-defined]
        with self.fs.create_stream(path, "rb") as stream:  # type: ignore[attr-defined]
            metadata = load_metadata(stream)
        if not isinstance(metadata, Metadata):
            raise NotACheckpointError(f"{path} does not hold DCP metadata.")
        if getattr(metadata, "storage_meta", None) is not None:
            metadata.storage_meta.load_id = self.load_id  # type: ignore[attr-defined]
        return metadata


class SafeFileSystemReader(_SafeMetadata, FileSystemReader):
    pass


class SafeFsspecReader(_SafeMetadata, FsspecReader):
    pass


def open_url(url: str, storage_options: dict[str, Any] | None = None) -> tuple[CheckpointStorage, str]:
    """Split a checkpoint URL/path into (storage of its parent, name)."""
    text = os.fspath(url).rstrip("/")
    fs, path = url_to_fs(text, **(storage_options or {}))
    path = path.rstrip("/")
    parent, _, name = path.rpartition("/")
    if not name:
        raise ValueError(f"{url!r} does not name a checkpoint directory.")
    if isinstance(fs, LocalFileSystem):
        root: str = parent or "/"
    else:
        root = fs.unstrip_protocol(parent)
    return CheckpointStorage(root, storage_options), name


__all__ = [
    "CheckpointExistsError",
    "CheckpointInfo",
    "CheckpointNotFoundError",
    "CheckpointStorage",
    "NotACheckpointError",
    "PendingWrite",
    "open_url",
    "step_name",
]
