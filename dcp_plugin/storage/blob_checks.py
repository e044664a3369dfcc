"""Whether the shared blob a save is about to refer to still holds the bytes its checksum says.

A later checkpoint that refers to a blob instead of writing the tensor again is only as good as that blob. So a
blob is built upon only while it is *known intact* in this process: its content was hashed against its recorded
checksum (after it was written, by the load that read it, or by a later re-check) and the file has not changed
since (same file, size and modification time). A blob whose last check is older than the re-check interval is
hashed again before it is used, in the background after each save where possible. A blob that fails a check is
never referred to again by this process: the next save writes its tensors afresh from the live model, and a
warning names the file.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from dcp_plugin.errors import CheckpointError
from dcp_plugin.storage.integrity import hash_file
from dcp_plugin.storage.read_io import hash_descriptor
from dcp_plugin.storage.safe_io import open_local_regular, regular_file_size

log = logging.getLogger(__name__)

Signature = tuple[Any, ...]
"""What identifies a file's content without reading it: device, inode, size and modification time (local), or
size and ETag / modification time (object stores)."""


def signature(fs: Any, path: str, *, is_local: bool) -> Signature | None:
    """The file's :data:`Signature` now (``None`` if it is missing or not a regular file)."""
    try:
        if is_local:
            status = os.stat(path, follow_symlinks=False)
            return (status.st_dev, status.st_ino, status.st_size, status.st_mtime_ns)
        regular_file_size(fs, path, is_local=False)
        info = fs.info(path)
        return (info.get("size"), str(info.get("ETag") or info.get("mtime") or info.get("LastModified") or ""))
    except (OSError, ValueError, CheckpointError):
        return None


def check(fs: Any, path: str, record: Mapping[str, Any], *, is_local: bool) -> Signature | None:
    """Hash the file and compare it with ``record`` (``size``, ``xxh3_128``): its :data:`Signature` as it was
    while read if it matches, ``None`` if it does not (or changed while it was read, or cannot be read)."""
    try:
        if is_local:
            with open_local_regular(path) as handle:
                before = os.fstat(handle.fileno())
                digest = hash_descriptor(handle.fileno())
                after = os.fstat(handle.fileno())
            if (before.st_size, before.st_mtime_ns) != (after.st_size, after.st_mtime_ns):
                return None
            size, found = after.st_size, (after.st_dev, after.st_ino, after.st_size, after.st_mtime_ns)
        else:
            found = signature(fs, path, is_local=False)
            size, digest = hash_file(fs, path, is_local=False)
            if signature(fs, path, is_local=False) != found:
                return None
    except (OSError, ValueError, CheckpointError):
        return None
    return found if size == record.get("size") and digest == record.get("xxh3_128") else None


@dataclass
class _Checked:
    signature: Signature
    digest: str
    at: float


class BlobChecks:
    """The blobs this process checked, by path: when, and the file they were then; and the ones found damaged.

    Args:
        interval: seconds after which a blob is hashed again before a save refers to it (``0``: before every
            save that refers to it).
    """

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._checked: dict[str, _Checked] = {}
        self._damaged: set[str] = set()
        self._lock = threading.Lock()

    def checked(self, path: str, found: Signature, digest: str) -> None:
        """Record that the file at ``path``, as identified by ``found``, was hashed now and matched ``digest``."""
        with self._lock:
            self._checked[path] = _Checked(found, digest, time.monotonic())

    def intact(self, fs: Any, path: str, record: Mapping[str, Any], *, is_local: bool) -> bool:
        """Whether a save may refer to the blob at ``path`` (recorded as ``record``): known intact, or hashed now
        (when it was checked longer ago than the interval, or never by this process)."""
        now = signature(fs, path, is_local=is_local)
        with self._lock:
            if path in self._damaged:
                return False
            known = self._checked.get(path)
        fresh = known is not None and time.monotonic() - known.at < self.interval
        if known is not None and now == known.signature and known.digest == record.get("xxh3_128") and fresh:
            return True
        if known is not None and now != known.signature:
            return self._fail(path, "it changed on disk since it was written or last checked")
        return self.recheck(fs, path, record, is_local=is_local)

    def recheck(self, fs: Any, path: str, record: Mapping[str, Any], *, is_local: bool) -> bool:
        """Hash the blob at ``path`` now; record the result (a mismatch marks it damaged, with a warning)."""
        found = check(fs, path, record, is_local=is_local)
        if found is None:
            return self._fail(path, "its bytes do not match its checksum")
        self.checked(path, found, str(record.get("xxh3_128")))
        return True

    def due(self, path: str) -> bool:
        """Whether the blob at ``path`` should be hashed again soon (checked more than half an interval ago)."""
        with self._lock:
            known = self._checked.get(path)
            return path not in self._damaged and (known is None or time.monotonic() - known.at >= self.interval / 2)

    def _fail(self, path: str, why: str) -> bool:
        with self._lock:
            first = path not in self._damaged
            self._damaged.add(path)
            self._checked.pop(path, None)
        if first:
            log.warning(
                "The shared data file %s is not used again: %s. The next save writes its tensors afresh from the "
                "live model; checkpoints that refer to it fail their checksums (dcp-plugin verify names them).",
                path,
                why,
            )
        return False


__all__ = ["BlobChecks", "Signature", "check", "signature"]
