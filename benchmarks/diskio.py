"""Raw disk figures and page-cache handling for the checkpoint files.

Dropping the whole page cache needs privileges and disturbs everyone on a shared machine, so the
benchmark evicts only its own files: ``fsync`` then ``posix_fadvise(POSIX_FADV_DONTNEED)`` on each one,
which removes their clean pages from the page cache without privileges.
"""

from __future__ import annotations

import os
import shutil
import time

CHUNK = 16 * 2**20


def files_under(path: str) -> list[str]:
    if os.path.isfile(path):
        return [path]
    out = []
    for root, _dirs, names in os.walk(path):
        out.extend(os.path.join(root, name) for name in names)
    return out


def size_of(path: str) -> int:
    """Bytes of all files under ``path`` (a file or a directory)."""
    return sum(os.path.getsize(name) for name in files_under(path))


def evict(path: str) -> None:
    """Make the files under ``path`` durable and drop them from the page cache (so a load reads the disk)."""
    for name in files_under(path):
        fd = os.open(name, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def remove(path: str) -> None:
    if os.path.isdir(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.exists(path):
        os.unlink(path)


def raw_write(path: str, nbytes: int) -> float:
    """Seconds to write ``nbytes`` sequentially and fsync them: the disk's floor for a durable checkpoint."""
    chunk = os.urandom(min(CHUNK, max(nbytes, 1)))
    started = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        left = nbytes
        while left > 0:
            left -= os.write(fd, chunk[: min(left, len(chunk))])
        os.fsync(fd)
    finally:
        os.close(fd)
    return time.perf_counter() - started


def raw_read(path: str) -> float:
    """Seconds to read ``path`` sequentially after evicting it from the page cache."""
    evict(path)
    started = time.perf_counter()
    fd = os.open(path, os.O_RDONLY)
    try:
        while os.read(fd, CHUNK):
            pass
    finally:
        os.close(fd)
    return time.perf_counter() - started
