"""Deleting checkpoints and cleaning up what interrupted writes, replacements and deletions left behind."""

from __future__ import annotations

import builtins
import os

from dcp_plugin.errors import CheckpointNotFoundError
from dcp_plugin.storage.base import StorageBase
from dcp_plugin.storage.names import check_name
from dcp_plugin.storage.root import storage_errors


class StorageCleanup(StorageBase):
    """The deleting half of :class:`~dcp_plugin.storage.CheckpointStorage`; committed data is removed only by
    :meth:`delete`."""

    @storage_errors("delete from")
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

    @storage_errors("list")
    def incomplete(self) -> builtins.list[str]:
        """Leftovers of writes, replacements and deletions that never finished (paths relative to the root)."""
        return self._listing.leftovers()

    def remove_incomplete(self, entry: str) -> None:
        """Remove one leftover named by :meth:`incomplete` (never committed data)."""
        self._listing.remove_leftover(entry)

    @storage_errors("clean up")
    def collect_blobs(self) -> builtins.list[str]:
        """Remove the shared blobs of incremental checkpoints that no committed checkpoint uses any more and no
        write in flight creates or refers to (retention calls it after deleting); returns their names."""
        return self._listing.collect_blobs()

    @storage_errors("clean up")
    def purge(self) -> builtins.list[str]:
        """Remove every leftover; returns what was removed. Committed checkpoints are never touched."""
        removed = []
        for entry in self.incomplete():
            try:
                self.remove_incomplete(entry)
            except ValueError:
                if self._still_there(entry):
                    raise
                continue  # removed meanwhile (another purge running at the same time)
            removed.append(entry)
        return removed

    def _still_there(self, entry: str) -> bool:
        path = self._root.join(entry)
        self._root.forget_listings()
        return os.path.lexists(path) if self.is_local else bool(self.fs.exists(path))


__all__ = ["StorageCleanup"]
