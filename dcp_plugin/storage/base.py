"""The identity of a checkpoint root (its filesystem, paths and URLs) and the checks that it can be used: the
part every other piece of :class:`~dcp_plugin.storage.CheckpointStorage` builds on."""

from __future__ import annotations

import errno
import os
from typing import Any

from dcp_plugin.errors import CheckpointSaveError
from dcp_plugin.storage.commit import strategy_for
from dcp_plugin.storage.listing import Listing
from dcp_plugin.storage.names import WORK_DIR
from dcp_plugin.storage.root import StorageRoot, storage_errors


class StorageBase:
    """A directory (local path or fsspec URL) holding checkpoints: where it is, and whether it can be used.
    :class:`~dcp_plugin.storage.CheckpointStorage` adds reading, writing and cleaning up."""

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

    def root_path(self, name: str, *more: str) -> str:
        """The filesystem path (no protocol) of ``name`` (and of ``more`` names below it) in this root."""
        return self._root.join(name, *more)

    def work_path(self, area: str, *more: str) -> str:
        """The filesystem path of work ``area`` of this root (``.dcp-plugin/<area>``), and of ``more`` names below."""
        return self._root.join(WORK_DIR, area, *more)

    def url(self, name: str, *more: str) -> str:
        """A user-facing path or URL of ``name`` (and of ``more`` names below it)."""
        return self._root.url(self._root.join(name, *more))

    # -- checks -----------------------------------------------------------------------------------
    @storage_errors("use")
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
                if err.errno == errno.EROFS:
                    raise self._read_only() from err
                raise OSError(f"Cannot create the checkpoint directory {self.root_url}: {err.strerror}.") from err
            if _on_read_only_filesystem(self.root):
                raise self._read_only()
            if not os.access(self.root, os.W_OK | os.X_OK):
                raise PermissionError(
                    f"The checkpoint directory {self.root_url} is not writable; choose a writable directory or "
                    "fix its permissions."
                )
        else:
            self._root.check_reachable()
            if self._root.bucket is None:
                self.fs.makedirs(self.root, exist_ok=True)

    def _read_only(self) -> CheckpointSaveError:
        return CheckpointSaveError(
            f"Cannot write to {self.root_url}: it is on a read-only filesystem (mounted read-only), so nothing can be "
            "saved there; its checkpoints can still be listed and loaded. Save to a directory on a writable "
            "filesystem, or remount this one read-write."
        )


def _on_read_only_filesystem(path: str) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except (OSError, AttributeError):
        return False


__all__ = ["StorageBase"]
