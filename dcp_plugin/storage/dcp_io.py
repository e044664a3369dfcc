"""DCP writers that hash every file while DCP writes it and commit the checkpoint from ``finish`` (which DCP's
coordinator calls once every rank wrote its part). The readers live in :mod:`dcp_plugin.storage.reader`."""

from __future__ import annotations

import logging
import os
import time
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint._fsspec_filesystem import FsspecWriter
from torch.distributed.checkpoint.filesystem import _split_by_size_and_type
from torch.distributed.checkpoint.metadata import Metadata, MetadataIndex
from torch.distributed.checkpoint.storage import WriteResult
from torch.futures import Future

from dcp_plugin import priority
from dcp_plugin.storage.commit import CommitStrategy, PendingWrite
from dcp_plugin.storage.faults import reached
from dcp_plugin.storage.integrity import ChecksumSink, HashingStream, hash_file
from dcp_plugin.storage.names import METADATA_NAME
from dcp_plugin.storage.root import StorageRoot

if TYPE_CHECKING:
    from dcp_plugin.staging_pool import StagingSession

log = logging.getLogger(__name__)

_WARNED_UNCHECKED: set[str] = set()
_CHECKSUMS_FQN = "__dcp_plugin_checksums__"
"""WriteResults under this name carry a rank's file checksums to the coordinator's ``finish``; they are
taken out before DCP builds ``.metadata``."""


# -- writing --------------------------------------------------------------------------------------------
class _HashingFileSystem:
    """Wraps a DCP filesystem so every stream opened for writing is hashed into ``sink`` (and, with a staging
    pool, the pool hears when a writer thread closed its file, and of the error that closed it)."""

    def __init__(self, inner: Any, sink: ChecksumSink, staging: StagingSession | None = None) -> None:
        self._inner = inner
        self._sink = sink
        self._staging = staging

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    @contextmanager
    def create_stream(self, path: Any, mode: str) -> Any:
        with self._inner.create_stream(path, mode) as stream:
            if "w" not in mode:
                yield stream
                return
            hashing = HashingStream(stream, self._sink.recorder(os.path.basename(os.fspath(path))))
            error: BaseException | None = None
            try:
                yield hashing
            except BaseException as err:
                error = err
                raise
            finally:
                hashing.close()
                if self._staging is not None:
                    self._staging.stream_closed(error)


def _bytes_written(metadata: Metadata) -> int:
    return sum(int(getattr(info, "length", 0)) for info in (metadata.storage_data or {}).values())


class _CommitOnFinish:
    """Mixed into DCP writers: hash while writing; in ``finish`` record checksums and commit."""

    fs: Any

    def _init_commit(
        self, root: StorageRoot, strategy: CommitStrategy, pending: PendingWrite, background_nice: int
    ) -> None:
        self._dcp_plugin_root = root
        self._dcp_plugin_strategy = strategy
        self._dcp_plugin_pending = pending
        self._dcp_plugin_nice = background_nice

    def attach_staging(self, session: StagingSession) -> None:
        """Write this save's tensors from a bounded staging pool (``max_staging_bytes``)."""
        self._dcp_plugin_staging: StagingSession | None = session
        self.per_thread_copy_ahead = 0  # DCP's copy-ahead loader would take tensors before they are written

    def write_data(self, plan: Any, planner: Any) -> Any:
        sink = ChecksumSink()
        staging = getattr(self, "_dcp_plugin_staging", None)
        original = self.fs  # type: ignore[has-type]
        self.fs = _HashingFileSystem(original, sink, staging)
        write = super().write_data  # type: ignore[misc]
        try:
            # in a thread of lower priority (background saves only); DCP's writer threads inherit it
            if staging is None:
                future = priority.run_lowered(self._dcp_plugin_nice, lambda: write(plan, planner))
            else:
                with staging.writing(self._files_in_writing_order(plan), planner) as pool_planner:
                    future = priority.run_lowered(self._dcp_plugin_nice, lambda: write(plan, pool_planner))
        finally:
            self.fs = original
        results = list(future.wait())
        results.append(WriteResult(index=MetadataIndex(_CHECKSUMS_FQN), size_in_bytes=0, storage_data=sink.files))
        out: Future = Future()
        out.set_result(results)
        return out

    def _files_in_writing_order(self, plan: Any) -> list[list[Any]]:
        """The write items of each file, in the order DCP's writer threads write them (as its ``write_data``
        splits them: one file per thread; one file per item, taken in plan order, otherwise)."""
        if self.single_file_per_rank:  # type: ignore[attr-defined]
            return _split_by_size_and_type(self.thread_count, plan.items)  # type: ignore[attr-defined]
        return [list(plan.items)]

    def finish(self, metadata: Metadata, results: list) -> None:  # type: ignore[override]
        files: dict[str, dict[str, Any]] = {}
        data_results = []
        for rank_results in results:
            kept = []
            for result in rank_results:
                if result.index.fqn == _CHECKSUMS_FQN:
                    files.update(result.storage_data)
                else:
                    kept.append(result)
            data_results.append(kept)
        super().finish(metadata, data_results)  # type: ignore[misc]
        reached("save.written")
        root, pending = self._dcp_plugin_root, self._dcp_plugin_pending
        needed = {str(info.relative_path) for info in (metadata.storage_data or {}).values()}
        unhashed = sorted(needed - set(files))
        if unhashed:
            raise RuntimeError(f"No checksum was recorded for {unhashed[:3]}; the checkpoint is not committed.")
        size, digest = hash_file(root.fs, f"{pending.directory}/{METADATA_NAME}", is_local=root.is_local)
        files[METADATA_NAME] = {"size": size, "xxh3_128": digest}
        manifest = dict(pending.manifest)
        manifest.update(bytes=_bytes_written(metadata), committed=time.time(), files=files)
        self._dcp_plugin_strategy.commit(pending, manifest)


class CommittingFileSystemWriter(_CommitOnFinish, FileSystemWriter):
    def __init__(
        self,
        path: str,
        *,
        root: StorageRoot,
        strategy: CommitStrategy,
        pending: PendingWrite,
        background_nice: int = 0,
        **kwargs: Any,
    ) -> None:
        FileSystemWriter.__init__(self, path, **kwargs)
        self._init_commit(root, strategy, pending, background_nice)


class CommittingFsspecWriter(_CommitOnFinish, FsspecWriter):
    def __init__(
        self,
        path: str,
        *,
        root: StorageRoot,
        strategy: CommitStrategy,
        pending: PendingWrite,
        background_nice: int = 0,
        **kwargs: Any,
    ) -> None:
        FsspecWriter.__init__(self, path, **kwargs)
        self._init_commit(root, strategy, pending, background_nice)


__all__ = ["CommittingFileSystemWriter", "CommittingFsspecWriter"]
