"""Opening files of a checkpoint that may have been written by someone hostile.

Only regular files are opened (never a FIFO, device, socket or symbolic link), nothing blocks while checking,
and small files (manifest, ``.metadata``) are size-bounded before they are read.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
from typing import IO, Any

from dcp_plugin.errors import CheckpointCorruptError, UnsafeCheckpointError

MAX_MANIFEST_BYTES = 64 * 2**20
MAX_METADATA_BYTES = 512 * 2**20

_KINDS = {
    stat.S_IFIFO: "FIFO",
    stat.S_IFCHR: "character device",
    stat.S_IFBLK: "block device",
    stat.S_IFSOCK: "socket",
    stat.S_IFDIR: "directory",
    stat.S_IFLNK: "symbolic link",
}


def _kind(mode: int) -> str:
    return _KINDS.get(stat.S_IFMT(mode), "special file")


def open_local_regular(path: str) -> IO[bytes]:
    """Open ``path`` for reading only if it is a regular file and not a symbolic link; never blocks."""
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise UnsafeCheckpointError(
                f"{path} is a symbolic link; checkpoint files must be regular files inside the checkpoint. "
                "Refusing to follow it."
            ) from None
        if err.errno == errno.ENXIO:  # a socket or a FIFO without a writer on some systems
            raise CheckpointCorruptError(f"{path} is not a regular file; refusing to read it.") from None
        raise
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise CheckpointCorruptError(
                f"{path} is a {_kind(mode)}, not a regular file; a checkpoint never contains one. Refusing to read it."
            )
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def regular_file_size(fs: Any, path: str, *, is_local: bool) -> int:
    """Size of ``path`` if it is a regular file (not a link, FIFO, device...); raises otherwise."""
    if is_local:
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            raise
        if stat.S_ISLNK(st.st_mode):
            raise UnsafeCheckpointError(
                f"{path} is a symbolic link; checkpoint files must be regular files inside the checkpoint."
            )
        if not stat.S_ISREG(st.st_mode):
            raise CheckpointCorruptError(f"{path} is a {_kind(st.st_mode)}, not a regular file.")
        return st.st_size
    info = fs.info(path)
    if info.get("type") != "file":
        raise CheckpointCorruptError(f"{fs.unstrip_protocol(path)} is a {info.get('type')}, not a file.")
    return int(info.get("size") or 0)


def read_bounded(fs: Any, path: str, *, is_local: bool, limit: int, what: str) -> bytes:
    """The whole content of a small file, refusing special files and anything over ``limit`` bytes."""
    shown = path if is_local else fs.unstrip_protocol(path)
    if is_local:
        with open_local_regular(path) as handle:
            size = os.fstat(handle.fileno()).st_size
            if size > limit:
                raise CheckpointCorruptError(
                    f"The {what} {shown} is {size} bytes, more than a {what} can be ({limit}); it is not trusted."
                )
            return handle.read(limit + 1)[: limit + 1]
    size = regular_file_size(fs, path, is_local=False)
    if size > limit:
        raise CheckpointCorruptError(
            f"The {what} {shown} is {size} bytes, more than a {what} can be ({limit}); it is not trusted."
        )
    data = fs.cat_file(path)
    if len(data) > limit:
        raise CheckpointCorruptError(f"The {what} {shown} grew past {limit} bytes while being read.")
    return data


__all__ = ["MAX_MANIFEST_BYTES", "MAX_METADATA_BYTES", "open_local_regular", "read_bounded", "regular_file_size"]
