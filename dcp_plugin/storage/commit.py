"""How a written checkpoint becomes committed, replaced or deleted: one strategy per kind of storage.

**Rename commit** (local and POSIX filesystems). States of checkpoint ``N`` and what a crash in each leaves::

    WRITING    .dcp-plugin/staging/N.<id>/ gets data files      -> leftover; purge removes it
    SEALED     ... and its manifest (fsynced)                     -> leftover; purge removes it (never committed)
    COMMITTED  renamed to N/ (no-replace unless overwriting;      -> N is committed; a superseded copy left in
               atomic exchange when replacing)                       staging is a leftover; purge removes it
    DELETED    N/ renamed to .dcp-plugin/trash/N.<id>/            -> N is gone; purge removes the trash

The commit point is the rename. Without an atomic exchange (some filesystems) a replacement takes two renames;
between them ``N/`` is missing and ``.dcp-plugin/replaced/N.<id>/`` *is* checkpoint ``N`` (listed and loaded
under that name); the next writer of ``N`` or ``purge`` moves it back.

**Marker commit** (object stores, which have no rename). Data is written to ``.dcp-plugin/objects/N.<id>/``;
the commit point is the single PUT of ``N/dcp_plugin.json``, which names that location::

    WRITING    objects/N.<id>/ gets data files and .metadata      -> unreferenced objects; purge removes them
    COMMITTED  N/dcp_plugin.json written (conditional create      -> N is committed; superseded data is
               unless overwriting)                                    unreferenced; purge removes it
    DELETED    N/dcp_plugin.json removed                          -> unreferenced data; purge removes it

Of two writers of one name without overwrite, exactly one commits; the other gets ``CheckpointExistsError``.
Object stores use a conditional create (``If-None-Match: *``) where the filesystem offers one
(``mode="create"``), otherwise a check-then-write that is exact within one process only.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

from dcp_plugin.errors import CheckpointExistsError, NotACheckpointError
from dcp_plugin.storage import manifest as manifests
from dcp_plugin.storage import work_areas
from dcp_plugin.storage.blobs import write_id_of, write_id_of_entry
from dcp_plugin.storage.faults import reached
from dcp_plugin.storage.names import (
    BLOBS,
    MANIFEST_NAME,
    OBJECTS,
    REPLACED,
    STAGING,
    TRASH,
    WORK_DIR,
    work_name,
)
from dcp_plugin.storage.root import StorageRoot
from dcp_plugin.storage.safe_io import MAX_MANIFEST_BYTES, open_local_regular

log = logging.getLogger(__name__)


@dataclass
class PendingWrite:
    """A checkpoint being written: DCP writes into ``directory``; committing makes it checkpoint ``name``."""

    name: str
    directory: str
    overwrite: bool
    manifest: dict[str, Any] = field(default_factory=dict)
    handoff: dict[str, Any] | None = None
    """A commit across nodes: what the coordinator hands every node once DCP's write returned."""
    keep: bool = False
    """A commit across nodes: every node voted to commit, so only the coordinator's decision to abort removes this
    copy; after any other failure it stays for the next start to complete (or, never decided, for ``purge``)."""

    @property
    def write_name(self) -> str:
        return self.directory.rsplit("/", 1)[-1]


class CommitStrategy(ABC):
    """Where writes happen, and how they become visible (see the module docstring for the states)."""

    def __init__(self, root: StorageRoot) -> None:
        self.root = root

    @abstractmethod
    def begin(self, name: str, overwrite: bool) -> PendingWrite:
        """A fresh, private location for a new copy of ``name``."""

    @abstractmethod
    def commit(self, pending: PendingWrite, manifest: dict[str, Any]) -> None:
        """Make the fully written copy checkpoint ``pending.name`` (after every rank wrote its part)."""

    @abstractmethod
    def delete(self, name: str) -> None:
        """Remove committed checkpoint ``name`` (its visibility first, then its data)."""

    def abort(self, pending: PendingWrite) -> None:
        """Remove what a failed write left (best effort; never touches committed data): its work entry and the
        shared blobs it was creating, which no committed checkpoint can list (a disk filled by a failed save's
        partial blob would fail the next saves too). A write found committed (a failure reported after its commit
        point) is left alone."""
        if self._committed(pending):
            return
        try:
            remove_tree(self.root, pending.directory)
        except Exception as err:  # noqa: BLE001 - cleanup must not hide the original failure
            log.warning("Could not remove the incomplete write %s: %s", self.root.url(pending.directory), err)
        try:
            remove_blobs_of(self.root, write_id_of_entry(pending.write_name))
        except Exception as err:  # noqa: BLE001 - as above; purge removes what is left
            log.warning("Could not remove the shared files of the incomplete write %s: %s", pending.name, err)
        if self.root.is_local:
            tidy_work_dir(self.root)

    def _committed(self, pending: PendingWrite) -> bool:
        """Whether ``pending`` is the committed copy of its name (its save id is in the committed manifest)."""
        save_id = pending.manifest.get("save_id")
        if not isinstance(save_id, str):
            return False
        marker = self.root.join(pending.name, MANIFEST_NAME)
        try:
            if self.root.is_local:
                with open_local_regular(marker) as handle:
                    data = handle.read(MAX_MANIFEST_BYTES)
            else:
                self.root.forget_listings()
                data = self.root.fs.cat_file(marker)
            return manifests.decode(data, marker).get("save_id") == save_id
        except Exception:  # noqa: BLE001 - no readable marker: not committed
            return False


class RenameCommit(CommitStrategy):
    """Atomic rename into place (local filesystems)."""

    def begin(self, name: str, overwrite: bool) -> PendingWrite:
        work_areas.check(self.root)  # a save may write blobs and retention delete: no area may be a link
        entry = work_name(name)
        for attempt in range(5):
            try:
                directory = work_areas.make_entry(self.root, STAGING, entry)
                break
            except FileNotFoundError:  # another process tidied an empty work folder at this moment
                if attempt == 4:
                    raise
        reached("save.begun")
        return PendingWrite(name=name, directory=directory, overwrite=overwrite)

    def commit(self, pending: PendingWrite, manifest: dict[str, Any]) -> None:
        write_local_manifest(pending.directory, manifest)
        reached("save.sealed")
        final = self.root.join(pending.name)
        if not pending.overwrite:
            if not rename_noreplace(pending.directory, final):
                self.abort(pending)
                raise CheckpointExistsError(
                    f"A checkpoint was committed at {final} while this one was being written; nothing was replaced. "
                    "Pick another name, or pass overwrite=True to replace it."
                )
            fsync_dir(self.root.path)
            reached("save.committed")
            tidy_work_dir(self.root)
            return
        if not os.path.lexists(final):
            if not rename_noreplace(pending.directory, final):  # another writer got there first: replace it
                return self.commit(pending, manifest)
        elif os.path.isdir(final) and not os.path.islink(final) and exchange(pending.directory, final):
            fsync_dir(self.root.path)
            reached("save.committed")
            discard_local(self.root, STAGING, pending.write_name)  # holds the old copy now
            tidy_work_dir(self.root)
            return
        else:
            self._replace_in_two_steps(pending.directory, final)
        fsync_dir(self.root.path)
        reached("save.committed")
        tidy_work_dir(self.root)

    def _replace_in_two_steps(self, staged: str, final: str) -> None:
        name = os.path.basename(final)
        aside = work_name(name)
        work_areas.move_in(self.root, name, REPLACED, aside)  # a link or file is moved itself, never its target
        reached("replace.old_moved")
        os.rename(staged, final)
        fsync_dir(self.root.path)
        discard_local(self.root, REPLACED, aside)

    def delete(self, name: str) -> None:
        path = self.root.join(name)
        if os.path.islink(path) or os.path.isfile(path):
            os.remove(path)  # a link (save_last="link") or a torch.save file: never its target
            return
        work_areas.check(self.root, (TRASH,))
        trash = work_name(name)
        work_areas.move_in(self.root, name, TRASH, trash)
        fsync_dir(self.root.path)
        reached("delete.hidden")
        try:
            work_areas.remove_entry(self.root, TRASH, trash)
        except OSError as err:
            log.warning("Could not remove the deleted checkpoint %s: %s (purge removes it)", path, err)
        tidy_work_dir(self.root)

    def restore_interrupted(self, name: str) -> None:
        """Move back a copy left aside by a two-step replacement that crashed (writer and purge only)."""
        final = self.root.join(name)
        if os.path.lexists(final):
            return
        for entry in sorted(work_areas.entries(self.root, REPLACED), reverse=True):
            if work_areas.is_ours(REPLACED, entry) and entry.rsplit(".", 1)[0] == name:
                work_areas.move_out(self.root, REPLACED, entry, name)
                fsync_dir(self.root.path)
                log.warning("Restored %s from an interrupted replacement.", final)
                return


class MarkerCommit(CommitStrategy):
    """A commit marker naming the data's location (object stores and other filesystems without rename)."""

    _local_lock = threading.Lock()  # makes check-then-create exact within one process (memory://)

    def begin(self, name: str, overwrite: bool) -> PendingWrite:
        directory = self.root.work(OBJECTS, work_name(name))
        if self.root.protocol == "memory" or not self.root.bucket:
            self.root.fs.makedirs(directory, exist_ok=True)
        reached("save.begun")
        return PendingWrite(name=name, directory=directory, overwrite=overwrite)

    def commit(self, pending: PendingWrite, manifest: dict[str, Any]) -> None:
        fs = self.root.fs
        manifest = {**manifest, "location": self.root.relative(pending.directory)}
        data = manifests.encode(manifest)
        marker = self.root.join(pending.name, MANIFEST_NAME)
        reached("save.sealed")
        previous = self.committed_location(pending.name) if pending.overwrite else None
        if pending.overwrite:
            if self.root.bucket is None:
                fs.makedirs(self.root.join(pending.name), exist_ok=True)
            fs.pipe_file(marker, data)
        else:
            self._create_exclusively(marker, data, pending)
        self.root.forget_listings()
        reached("save.committed")
        if previous is not None and previous != pending.directory:
            remove_tree(self.root, previous)

    def _create_exclusively(self, marker: str, data: bytes, pending: PendingWrite) -> None:
        fs = self.root.fs
        exists_error = CheckpointExistsError(
            f"A checkpoint was committed at {self.root.url(self.root.join(pending.name))} while this one was being "
            "written; nothing was replaced. Pick another name, or pass overwrite=True to replace it."
        )
        if self.root.bucket is not None:
            try:
                fs.pipe_file(marker, data, mode="create")
            except FileExistsError:
                self.abort(pending)
                raise exists_error from None
            except Exception as err:  # noqa: BLE001 - S3's PreconditionFailed arrives as a generic error
                if "precondition" in str(err).lower() or "412" in str(err):
                    self.abort(pending)
                    raise exists_error from None
                raise
            return
        with self._local_lock:
            self.root.forget_listings()
            if fs.exists(marker):
                self.abort(pending)
                raise exists_error
            fs.makedirs(self.root.join(pending.name), exist_ok=True)
            fs.pipe_file(marker, data)

    def committed_location(self, name: str) -> str | None:
        """The data directory the committed marker of ``name`` names (``None`` if not committed)."""
        marker = self.root.join(name, MANIFEST_NAME)
        try:
            record = manifests.decode(self.root.fs.cat_file(marker), self.root.url(marker))
        except FileNotFoundError:
            return None
        except Exception:  # noqa: BLE001 - a damaged marker: its data cannot be located
            return None
        location = record.get("location")
        return self.root.join(location) if isinstance(location, str) else self.root.join(name)

    def delete(self, name: str) -> None:
        fs = self.root.fs
        location = self.committed_location(name)
        marker = self.root.join(name, MANIFEST_NAME)
        if fs.exists(marker):
            fs.rm(marker)
        elif fs.isfile(self.root.join(name)):
            fs.rm(self.root.join(name))
            return
        self.root.forget_listings()
        reached("delete.hidden")
        if location is not None:
            remove_tree(self.root, location)
        remove_tree(self.root, self.root.join(name))


def strategy_for(root: StorageRoot) -> CommitStrategy:
    return RenameCommit(root) if root.is_local else MarkerCommit(root)


# -- local filesystem primitives ---------------------------------------------------------------------------
_RENAME_NOREPLACE = 1  # linux/fs.h
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _renameat2(source: str, target: str, flags: int) -> int:
    """0 on success, else the errno (ENOSYS/EINVAL where the OS or filesystem lacks renameat2 or the flag)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        call = libc.renameat2
    except (OSError, AttributeError):
        return errno.ENOSYS
    if call(_AT_FDCWD, os.fsencode(source), _AT_FDCWD, os.fsencode(target), flags) == 0:
        return 0
    return ctypes.get_errno()


def rename_noreplace(source: str, target: str) -> bool:
    """Rename ``source`` to ``target`` unless ``target`` exists (atomically); False if it exists."""
    result = _renameat2(source, target, _RENAME_NOREPLACE)
    if result == 0:
        return True
    if result == errno.EEXIST:
        return False
    if result not in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        raise OSError(result, os.strerror(result), target)
    # Fallback: renaming a directory onto an existing non-empty directory or a file fails.
    if os.path.lexists(target) and not (os.path.isdir(target) and not os.listdir(target)):
        return False
    try:
        os.rename(source, target)
    except OSError as err:
        if err.errno in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR):
            return False
        raise
    return True


def exchange(source: str, target: str) -> bool:
    """Atomically swap two paths; False where the OS or filesystem cannot."""
    return _renameat2(source, target, _RENAME_EXCHANGE) == 0


def fsync_dir(path: str) -> None:
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


def write_local_manifest(directory: str, manifest: dict[str, Any]) -> None:
    data = manifests.encode(manifest)
    path = f"{directory}/{MANIFEST_NAME}"
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.rename(tmp, path)
    fsync_dir(directory)


def discard_local(root: StorageRoot, area: str, entry: str) -> None:
    """Remove a superseded local copy: its manifest first, so an interrupted removal never looks committed."""
    try:
        work_areas.remove_entry(root, area, entry, manifest_first=MANIFEST_NAME)
    except OSError as err:
        log.warning("Could not remove the superseded copy %s: %s (purge removes it)", root.work(area, entry), err)


def remove_tree(root: StorageRoot, path: str) -> None:
    """Remove a work entry or a v0.1 leftover of ``root`` (local disks: only those, never following a link)."""
    if root.is_local:
        parts = root.relative(path).split("/")
        if len(parts) == 3 and parts[0] == WORK_DIR:
            work_areas.remove_entry(root, parts[1], parts[2])
        elif len(parts) == 1 and path != root.path:
            work_areas.remove_entry(root, "", parts[0])
        else:
            raise ValueError(f"{path} is not a work entry of {root.path}; nothing was removed.")
        return
    root.forget_listings()
    if root.fs.exists(path):
        root.fs.rm(path, recursive=True)


def remove_blobs_of(root: StorageRoot, write_id: str) -> None:
    """Remove the blobs the write ``write_id`` created (a failed write: no committed checkpoint lists them)."""
    if root.is_local:
        names = work_areas.entries(root, BLOBS)
    else:
        root.forget_listings()
        try:
            names = [p.rstrip("/").rsplit("/", 1)[-1] for p in root.fs.ls(root.work(BLOBS), detail=False)]
        except FileNotFoundError:
            return
    for name in names:
        if write_id_of(name) == write_id:
            remove_tree(root, root.work(BLOBS, name))


def tidy_work_dir(root: StorageRoot) -> None:
    """Remove the empty work folders, so a quiet root holds only checkpoints (only empty folders go)."""
    work_areas.tidy(root)


def list_dir(path: str) -> list[str]:
    try:
        return os.listdir(path)
    except (FileNotFoundError, NotADirectoryError):
        return []


def check_target_is_replaceable(root: StorageRoot, name: str) -> None:
    """A plain file where a checkpoint directory goes may only be replaced when overwriting."""
    path = root.join(name)
    if root.is_local and os.path.isfile(path) and not os.path.islink(path):
        raise NotACheckpointError(f"{path} is a file, not a checkpoint directory; move it away or choose another name.")


__all__ = ["CommitStrategy", "MarkerCommit", "PendingWrite", "RenameCommit", "strategy_for", "WORK_DIR"]
