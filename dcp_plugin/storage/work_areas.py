"""The work areas under ``<root>/.dcp-plugin/`` on a local disk, handled without ever following a link.

A run directory may come from elsewhere (untarred, synced, downloaded), so any name in it can be a symbolic link,
our own work areas included; following one would write or delete outside the run. dcp-plugin creates
``.dcp-plugin/`` and its areas as plain directories, and reaches them only through directory descriptors opened
with ``O_DIRECTORY | O_NOFOLLOW`` relative to their parent's: an area that is a link (or not a directory) is an
:class:`~dcp_plugin.errors.UnsafeCheckpointError` saying what to do, and swapping one for a link while an
operation runs cannot redirect it. Entries are examined with ``lstat`` and removed through those descriptors
(:func:`remove_entry`): a link is unlinked itself, a directory is emptied depth-first without following links or
crossing into another filesystem. Only names dcp-plugin gives (:func:`is_ours`) are ever listed for removal.

The checkpoint root itself is the user's choice and may be a link (a run directory on a larger disk).
"""

from __future__ import annotations

import errno
import logging
import os
import re
import stat
from collections.abc import Iterator
from contextlib import contextmanager

from dcp_plugin.errors import UnsafeCheckpointError
from dcp_plugin.storage.blobs import is_blob
from dcp_plugin.storage.names import BLOBS, OBJECTS, PROBE, REPLACED, REPLICAS, RESTORE, STAGING, TRASH, WORK_DIR
from dcp_plugin.storage.root import StorageRoot

log = logging.getLogger(__name__)

AREAS = (STAGING, TRASH, REPLACED, OBJECTS, BLOBS)
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
_WORK_ENTRY = re.compile(r"^[^/\x00]+\.[0-9a-f]{12}$")
_LEGACY_ENTRY = re.compile(r"^\.(tmp|old)-[^/\x00]+-(deleting-[0-9a-f]{8}|[0-9a-f]{12})$")
_MAX_DEPTH = 32
"""What dcp-plugin writes is at most two levels deep; anything deeper is not ours and is left alone."""


def is_ours(area: str, entry: str) -> bool:
    """Whether ``entry`` of work ``area`` has a name dcp-plugin gives (``<name>.<12 hex>``, blob names; in the root
    when ``area`` is ``""``, v0.1's ``.tmp-<name>-<12 hex>`` and ``.old-<name>-<12 hex>``)."""
    if area == BLOBS:
        return is_blob(entry)
    if area == "":
        return bool(_LEGACY_ENTRY.match(entry))
    return bool(_WORK_ENTRY.match(entry))


def _shown(root: StorageRoot, area: str) -> str:
    return root.join(WORK_DIR, area) if area else root.join(WORK_DIR)


def _unsafe(root: StorageRoot, area: str) -> UnsafeCheckpointError:
    path = _shown(root, area)
    try:
        mode = os.lstat(path).st_mode
    except OSError:
        mode = 0
    if stat.S_ISLNK(mode):
        try:
            what = f"a symbolic link to {os.readlink(path)}"
        except OSError:
            what = "a symbolic link"
        fix = f"remove the link itself (`rm {path}`, no trailing slash: its target is left alone)"
    else:
        what = "not a directory"
        fix = f"move {path} out of the way"
    return UnsafeCheckpointError(
        f"{path} is {what}. dcp-plugin keeps its work areas under {root.join(WORK_DIR)} as plain directories and "
        f"never follows a link there, so that nothing outside {root.path} is written or deleted (a run directory "
        f"copied or untarred from elsewhere can carry such links). Nothing was changed; {fix} and try again: "
        "dcp-plugin creates the folder afresh."
    )


def _open_dir(name: str, dir_fd: int) -> int | None:
    """A descriptor of directory ``name`` under ``dir_fd`` (never through a link); ``None`` if it is missing.
    Raises ``NotADirectoryError`` when ``name`` is a link or anything but a directory."""
    try:
        return os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
    except FileNotFoundError:
        return None
    except OSError as err:
        if err.errno in (errno.ELOOP, errno.ENOTDIR):
            raise NotADirectoryError(err.errno, err.strerror, name) from None
        raise


def _open_or_make(name: str, dir_fd: int, create: bool) -> int | None:
    fd = _open_dir(name, dir_fd)
    for _ in range(5 if create else 0):
        if fd is not None:
            break
        try:
            os.mkdir(name, dir_fd=dir_fd)
        except FileExistsError:
            pass
        fd = _open_dir(name, dir_fd)  # None again if another process tidied the empty folder meanwhile
    if fd is None and create:
        raise FileNotFoundError(errno.ENOENT, "removed by another process while being created", name)
    return fd


@contextmanager
def opened(root: StorageRoot, area: str = "", *, create: bool = False) -> Iterator[int | None]:
    """A descriptor of ``.dcp-plugin/<area>`` (of ``.dcp-plugin`` itself for ``""``), reached without following
    a link below the root; ``None`` when it does not exist (created first with ``create``)."""
    with _opened(root, area, create) as (_, fd):
        yield fd


@contextmanager
def _opened(root: StorageRoot, area: str, create: bool) -> Iterator[tuple[int | None, int | None]]:
    """(the root's descriptor, the area's) as :func:`opened` reaches them."""
    held: list[int] = []
    try:
        try:
            held.append(_open_root(root))
        except FileNotFoundError:
            if not create:
                yield None, None
                return
            os.makedirs(root.path, exist_ok=True)
            held.append(_open_root(root))
        fd: int | None = held[0]
        for level, name in enumerate(p for p in (WORK_DIR, area) if p):
            try:
                fd = _open_or_make(name, held[-1], create)
            except NotADirectoryError:
                raise _unsafe(root, area if level else "") from None
            if fd is None:
                break
            held.append(fd)
        yield held[0], fd
    finally:
        for fd in reversed(held):
            os.close(fd)


def _open_root(root: StorageRoot) -> int:
    return os.open(root.path, os.O_RDONLY | os.O_DIRECTORY | getattr(os, "O_CLOEXEC", 0))


def check(root: StorageRoot, areas: tuple[str, ...] = AREAS) -> None:
    """Raise :class:`UnsafeCheckpointError` if ``.dcp-plugin`` or one of ``areas`` is a link or not a directory."""
    for area in ("", *areas):
        with opened(root, area):
            pass


def entries(root: StorageRoot, area: str, *, strict: bool = True) -> list[str]:
    """The names in work ``area`` (none if it is missing). A linked area raises, or with ``strict=False`` (readers
    looking for set-aside checkpoints) is treated as empty, with a warning."""
    try:
        with opened(root, area) as fd:
            return [] if fd is None else sorted(os.listdir(fd))
    except UnsafeCheckpointError as err:
        if strict:
            raise
        log.warning("Ignoring %s: %s", _shown(root, area), err)
        return []


def make_entry(root: StorageRoot, area: str, entry: str) -> str:
    """Create the directory ``.dcp-plugin/<area>/<entry>`` (the areas as needed, never through a link); its path."""
    with opened(root, area, create=True) as fd:
        assert fd is not None
        os.mkdir(entry, dir_fd=fd)
    return root.work(area, entry)


def move_in(root: StorageRoot, name: str, area: str, entry: str) -> None:
    """Rename ``<root>/<name>`` (a link or file is moved itself) to ``.dcp-plugin/<area>/<entry>``."""
    with _opened(root, area, True) as (top, fd):
        assert top is not None and fd is not None
        os.rename(name, entry, src_dir_fd=top, dst_dir_fd=fd)


def move_out(root: StorageRoot, area: str, entry: str, name: str) -> None:
    """Rename ``.dcp-plugin/<area>/<entry>`` back to ``<root>/<name>``."""
    with _opened(root, area, False) as (top, fd):
        if top is None or fd is None:
            raise FileNotFoundError(errno.ENOENT, "no such work area", root.work(area))
        os.rename(entry, name, src_dir_fd=fd, dst_dir_fd=top)


def remove_entry(root: StorageRoot, area: str, entry: str, *, manifest_first: str | None = None) -> None:
    """Remove ``entry`` of work ``area`` (``""``: a v0.1 leftover in the root itself) without following links.

    ``manifest_first``: a file removed from the entry before anything else, so that an interrupted removal of a
    superseded checkpoint never looks committed."""
    if not entry or "/" in entry or entry in (".", ".."):
        raise ValueError(f"{entry!r} is not an entry of a work area.")
    if area == "":
        top = _open_root(root)
        try:
            _remove_at(top, entry, os.fstat(top).st_dev, 0, manifest_first)
        finally:
            os.close(top)
        return
    with opened(root, area) as fd:
        if fd is not None:
            _remove_at(fd, entry, os.fstat(fd).st_dev, 0, manifest_first)


def _remove_at(dir_fd: int, name: str, device: int, depth: int, first: str | None = None) -> None:
    try:
        status = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(status.st_mode):
        _ignore_missing(os.unlink, name, dir_fd)
        return
    if status.st_dev != device:
        raise OSError(errno.EXDEV, "another filesystem is mounted there; left alone", name)
    if depth >= _MAX_DEPTH:
        raise OSError(
            errno.ELOOP, f"nested deeper than {_MAX_DEPTH} levels: not written by dcp-plugin; left alone", name
        )
    try:
        fd = os.open(name, _DIR_FLAGS, dir_fd=dir_fd)  # a link swapped in after the lstat fails here (ELOOP)
    except FileNotFoundError:
        return
    try:
        if not os.path.samestat(status, os.fstat(fd)):
            raise OSError(errno.EAGAIN, "changed while being removed; left alone", name)
        if first is not None:
            _remove_at(fd, first, device, depth + 1)
        for child in os.listdir(fd):
            _remove_at(fd, child, device, depth + 1)
    finally:
        os.close(fd)
    _ignore_missing(os.rmdir, name, dir_fd)


def _ignore_missing(call: object, name: str, dir_fd: int) -> None:
    try:
        call(name, dir_fd=dir_fd)  # type: ignore[operator]
    except FileNotFoundError:
        pass  # removed by another cleanup at the same time


def tidy(root: StorageRoot) -> None:
    """Remove the empty work folders, so a quiet root holds only checkpoints (only empty folders go; ``rmdir`` of
    a link fails, so nothing is followed)."""
    try:
        with _opened(root, "", False) as (top, fd):
            if top is None or fd is None:
                return
            for area in (STAGING, TRASH, REPLACED, BLOBS, RESTORE, REPLICAS, PROBE):
                try:
                    os.rmdir(area, dir_fd=fd)
                except OSError:
                    pass
            try:
                os.rmdir(WORK_DIR, dir_fd=top)
            except OSError:
                pass
    except (OSError, UnsafeCheckpointError):
        return


__all__ = ["AREAS", "check", "entries", "is_ours", "make_entry", "move_in", "move_out", "remove_entry", "tidy"]
