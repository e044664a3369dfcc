"""Checksums of checkpoint files: computed while the bytes are written, checked before they are trusted.

The hash is xxh3-128 (the ``xxhash`` package): about 10 GB/s per core here, so hashing the stream as DCP
writes it costs a few percent of the write, and no second read pass is needed at save time. It detects
accidental damage (bit flips, zeroed pages, truncation, a shard swapped from another checkpoint); it is not a
signature against a deliberate forger who can also rewrite the manifest.
"""

from __future__ import annotations

import io
import os
import threading
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import xxhash

from dcp_plugin.storage.names import BLOBS
from dcp_plugin.storage.read_io import hash_descriptor
from dcp_plugin.storage.root import StorageRoot
from dcp_plugin.storage.safe_io import open_local_regular, regular_file_size

ALGORITHM = "xxh3_128"
_CHUNK = 64 * 2**20


class HashingStream(io.RawIOBase):
    """A write-only stream that hashes every byte on its way to ``inner`` and reports (size, digest) on close."""

    def __init__(self, inner: Any, on_close: Callable[[int, str], None]) -> None:
        super().__init__()
        self._inner = inner
        self._hasher = xxhash.xxh3_128()
        self._size = 0
        self._on_close = on_close
        self._reported = False

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        written = self._inner.write(view)
        written = len(view) if written is None else written
        self._hasher.update(view[:written])
        self._size += written
        return written

    def tell(self) -> int:
        return self._inner.tell()

    def fileno(self) -> int:
        return self._inner.fileno()

    def flush(self) -> None:
        if not getattr(self._inner, "closed", False):
            self._inner.flush()

    def close(self) -> None:
        if self.closed:
            return
        try:
            self._inner.close()
        finally:
            super().close()
        if not self._reported:
            self._reported = True
            self._on_close(self._size, self._hasher.hexdigest())


class ChecksumSink:
    """Collects the checksums of the files one rank wrote (DCP writes from several threads)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.files: dict[str, dict[str, Any]] = {}

    def recorder(self, relative: str) -> Callable[[int, str], None]:
        def record(size: int, digest: str) -> None:
            with self._lock:
                self.files[relative] = {"size": size, ALGORITHM: digest}

        return record


def hash_file(fs: Any, path: str, *, is_local: bool, progress: Callable[[int], None] | None = None) -> tuple[int, str]:
    """(size, xxh3-128 hex digest) of a regular file, read once in large chunks; ``progress`` is called with the
    byte count of each chunk."""
    if is_local:
        with open_local_regular(path) as handle:
            return os.fstat(handle.fileno()).st_size, hash_descriptor(handle.fileno(), progress)
    hasher = xxhash.xxh3_128()
    regular_file_size(fs, path, is_local=False)
    size = 0
    with fs.open(path, "rb", block_size=_CHUNK) as handle:
        while True:
            chunk = handle.read(_CHUNK)
            if not chunk:
                break
            size += len(chunk)
            hasher.update(chunk)
            if progress is not None:
                progress(len(chunk))
    return size, hasher.hexdigest()


def check_files(
    fs: Any,
    directory: str,
    records: Mapping[str, Mapping[str, Any]],
    *,
    is_local: bool,
    only: Iterable[str] | None = None,
    progress: Callable[[int], None] | None = None,
) -> list[str]:
    """Problems with the files of one checkpoint: missing, special, wrong size, or wrong checksum.

    ``records`` maps file names to ``{"size", "xxh3_128"}``; ``only`` limits the check to some of them.
    ``progress`` is called with byte counts as files are hashed, chunk by chunk (a file that is not hashed counts
    its recorded size), so that the counts add up to the recorded sizes.
    """
    problems = []
    names = sorted(records) if only is None else sorted(set(only))
    for relative in names:
        record = records.get(relative)
        path = f"{directory}/{relative}"
        if record is None:
            problems.append(f"{relative} has no recorded checksum")
            continue
        hashed = 0

        def counted(count: int) -> None:
            nonlocal hashed
            hashed += count
            if progress is not None:
                progress(count)

        try:
            size = regular_file_size(fs, path, is_local=is_local)
            if size < record["size"]:
                problems.append(f"{relative} is truncated ({size} of {record['size']} bytes)")
            elif size > record["size"]:
                problems.append(f"{relative} has {size - record['size']} bytes appended ({record['size']} committed)")
            else:
                size, digest = hash_file(fs, path, is_local=is_local, progress=counted)
                if digest != record.get(ALGORITHM):
                    problems.append(f"{relative} does not match its checksum (the file was changed or damaged)")
        except FileNotFoundError:
            problems.append(f"{relative} is missing")
        except Exception as err:  # noqa: BLE001 - every problem is reported, not just the first
            problems.append(f"{relative}: {err}")
        if progress is not None and hashed < int(record.get("size", 0)):
            progress(int(record.get("size", 0)) - hashed)
    return problems


def blob_area_of(root: StorageRoot) -> str | None:
    """Where readers find the shared blobs an incremental checkpoint uses: ``None`` on a local disk, where each is
    linked into the checkpoint's own directory at the commit (the directory is then complete by itself, and what
    is verified is what every DCP reader of it reads); the root's blob area on object stores, which have no links."""
    return None if root.is_local else root.work(BLOBS)


def shared_directory(
    root: StorageRoot, directory: str, relative: str, files: Mapping[str, Any], blobs: Mapping[str, Any]
) -> str:
    """The directory holding data file ``relative`` of the checkpoint in ``directory``."""
    area = blob_area_of(root)
    return area if area is not None and relative not in files and relative in blobs else directory


def check_checkpoint_files(
    fs: Any,
    directory: str,
    files: Mapping[str, Mapping[str, Any]],
    *,
    blob_area: str | None,
    blobs: Mapping[str, Mapping[str, Any]],
    is_local: bool,
    only: Iterable[str] | None = None,
    progress: Callable[[int], None] | None = None,
) -> list[str]:
    """:func:`check_files` for a checkpoint whose records are partly its own (``files``) and partly shared blobs
    (``blobs``, used by incremental checkpoints), which are in ``blob_area`` or, where that is ``None`` (local
    disks: see :func:`blob_area_of`), in the checkpoint directory too. A name in ``files`` is in the directory."""
    names = (set(files) | set(blobs)) if only is None else set(only)
    shared = sorted(n for n in names if n not in files and n in blobs)
    own = sorted(names - set(shared))
    problems = check_files(fs, directory, files, is_local=is_local, only=own, progress=progress) if own else []
    if shared:
        where = directory if blob_area is None else blob_area
        problems += check_files(fs, where, blobs, is_local=is_local, only=shared, progress=progress)
    return problems


__all__ = [
    "ALGORITHM",
    "ChecksumSink",
    "HashingStream",
    "blob_area_of",
    "check_checkpoint_files",
    "check_files",
    "hash_file",
    "shared_directory",
]
