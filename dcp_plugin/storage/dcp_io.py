"""DCP writers that hash every file while DCP writes it and commit the checkpoint from ``finish`` (which DCP's
coordinator calls once every rank wrote its part). The readers live in :mod:`dcp_plugin.storage.reader`."""

from __future__ import annotations

import dataclasses
import logging
import os
import queue
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint._fsspec_filesystem import FsspecWriter
from torch.distributed.checkpoint.filesystem import (
    SerializationFormat,
    _item_size,
    _split_by_size_and_type,
    _StorageInfo,
)
from torch.distributed.checkpoint.metadata import Metadata, MetadataIndex
from torch.distributed.checkpoint.planner import WriteItemType
from torch.distributed.checkpoint.storage import WriteResult
from torch.futures import Future

from dcp_plugin.errors import CheckpointSaveError
from dcp_plugin.storage.blobs import blob_name, chunk_key, fingerprint, write_id_of
from dcp_plugin.storage.commit import CommitStrategy, PendingWrite
from dcp_plugin.storage.integrity import ChecksumSink, HashingStream
from dcp_plugin.storage.names import BLOBS
from dcp_plugin.storage.node_commit import HANDOFF_ATTRIBUTE
from dcp_plugin.storage.record_writer import FileWriting, open_record_file
from dcp_plugin.storage.repeat_io import WriterContext
from dcp_plugin.storage.root import StorageRoot
from dcp_plugin.storage.sealing import Written, seal

log = logging.getLogger(__name__)

_WARNED_UNCHECKED: set[str] = set()
DIRECT_IO_ATTRIBUTE = "dcp_plugin_direct_io"
"""Set on the Metadata a save returns: whether its files went to the disk with O_DIRECT (``SaveStats.direct_io``)."""
SET_AFTER_WRITING = (
    DIRECT_IO_ATTRIBUTE,
    "dcp_plugin_blobs_checked",
    "dcp_plugin_blobs",
    "dcp_plugin_fingerprints",
    HANDOFF_ATTRIBUTE,
)
"""Attributes a save sets on the ``Metadata`` it returns, after ``.metadata`` was written (never written into it):
``dcp_plugin_blobs_checked`` (the new blobs as checked before the commit), ``dcp_plugin_blobs`` (the blobs the
checkpoint lists) and ``dcp_plugin_fingerprints`` (of the chunks kept in blobs), for incremental saves; with a commit
across nodes, the handoff every rank completes it with."""
_CHECKSUMS_FQN = "__dcp_plugin_checksums__"
"""WriteResults under this name carry a rank's file checksums to the coordinator's ``finish``; they are
taken out before DCP builds ``.metadata``."""


T = TypeVar("T")

RunWrite = Callable[[Callable[[], Any]], Any]
"""How a write runs ``work()``: the engine passes one that lowers the writing thread's priority. Picklable,
since writers travel to the writer daemon."""


def run_here(work: Callable[[], T]) -> T:
    """The default :data:`RunWrite`: ``work()`` on the calling thread."""
    return work()


class StagingSession(Protocol):
    """A bounded staging pool's view of one save (:class:`dcp_plugin.engine.staging.pool.StagingSession`)."""

    def writing(self, buckets: Sequence[Sequence[Any]], planner: Any) -> AbstractContextManager[Any]: ...

    def stream_closed(self, error: BaseException | None) -> None: ...


# -- writing --------------------------------------------------------------------------------------------
ONE_FILE_BELOW = 32 * 2**20
"""A rank whose tensors hold fewer bytes than this writes them to one file (``thread_count`` files otherwise)."""


def _tensor_bytes(items: Sequence[Any]) -> int:
    return sum(_item_size(item) for item in items if item.type != WriteItemType.BYTE_IO)


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


@dataclass
class IncrementalPlan:
    """What one rank's writer needs for an incremental save (picklable: it travels to the writer daemon).

    ``blob_keys``: the tensors (by DCP key) to keep in blobs; ``reuse``: per chunk (``chunk_key``), where its bytes
    already are and their fingerprint; ``records``: the committed size and checksum of each of those blobs;
    ``unchanged``: the tensors known to hold the bytes ``reuse`` points at (handed to DCP as stand-ins: never
    read, never written)."""

    write_id: str
    rank: int
    blob_keys: frozenset[str] = frozenset()
    reuse: dict[str, tuple[_StorageInfo, str]] = field(default_factory=dict)
    records: dict[str, dict[str, Any]] = field(default_factory=dict)
    unchanged: frozenset[str] = frozenset()


def _stored(metadata: Metadata) -> dict[tuple[str, int], int]:
    """Each stored region once (tied tensors share one): ``(file, offset) -> length``."""
    return {
        (str(info.relative_path), int(info.offset)): int(info.length)
        for info in (metadata.storage_data or {}).values()
        if hasattr(info, "length")
    }


def _bytes_written(metadata: Metadata) -> int:
    return sum(_stored(metadata).values())


class _CommitOnFinish:
    """Mixed into DCP writers: hash while writing; in ``finish`` record checksums and commit."""

    fs: Any

    def _init_commit(
        self,
        root: StorageRoot,
        strategy: CommitStrategy,
        pending: PendingWrite,
        run_write: RunWrite,
        incremental: IncrementalPlan | None,
        direct_io: bool = True,
        aliases: dict[str, str] | None = None,
    ) -> None:
        self._dcp_plugin_root = root
        self._dcp_plugin_aliases = dict(aliases or {})
        self._dcp_plugin_direct_io = direct_io
        self._dcp_plugin_strategy = strategy
        self._dcp_plugin_pending = pending
        self._dcp_plugin_run_write = run_write
        self._dcp_plugin_incremental = incremental

    @property
    def incremental_plan(self) -> IncrementalPlan | None:
        """The incremental plan this save's writer was made with."""
        return self._dcp_plugin_incremental

    def repeat_context(self) -> WriterContext:
        """This writer's save, for writing it without DCP (:mod:`dcp_plugin.storage.repeat_io`)."""
        return WriterContext(
            fs=self.fs,
            path=self.path,  # type: ignore[attr-defined]
            root=self._dcp_plugin_root,
            strategy=self._dcp_plugin_strategy,
            pending=self._dcp_plugin_pending,
            sync_files=self.sync_files,  # type: ignore[attr-defined]
            direct_io=self._dcp_plugin_direct_io,
            thread_count=self.thread_count,  # type: ignore[attr-defined]
            incremental=self._dcp_plugin_incremental,
            checkpoint_id=self.checkpoint_id,  # type: ignore[attr-defined]
        )

    @property
    def final_items(self) -> list[Any] | None:
        """The write items DCP's final plan gave this rank (``None`` before DCP called :meth:`write_data`)."""
        return getattr(self, "_dcp_plugin_final_items", None)

    def attach_staging(self, session: StagingSession) -> None:
        """Write this save's tensors from a bounded staging pool (``max_staging_bytes``)."""
        self._dcp_plugin_staging: StagingSession | None = session
        self.per_thread_copy_ahead = 0  # DCP's copy-ahead loader would take tensors before they are written

    def write_data(self, plan: Any, planner: Any) -> Any:
        self._dcp_plugin_final_items = list(plan.items)
        plan, tied = self._without_ties(plan)
        sink = ChecksumSink()
        staging = getattr(self, "_dcp_plugin_staging", None)
        original = self.fs  # type: ignore[has-type]
        self.fs = _HashingFileSystem(original, sink, staging)
        writing = self._dcp_plugin_writing = _file_writing(
            original, sink, staging, fsync=self.sync_files, direct=self._dcp_plugin_direct_io
        )  # type: ignore[attr-defined]
        write = super().write_data  # type: ignore[misc]
        # A bounded staging pool hands tensors out in writing order only: such saves write everything.
        incremental = self._dcp_plugin_incremental if staging is None else None
        if incremental is None and _tensor_bytes(plan.items) < ONE_FILE_BELOW:
            self.thread_count = 1  # one file: a second would cost an open, an fsync and a thread for little
        report: dict[str, Any] = {"new_blobs": [], "used_blobs": {}, "fingerprints": {}}
        reused: list[WriteResult] = []
        try:
            # in a thread of lower priority (background saves only); DCP's writer threads inherit it
            run_write = self._dcp_plugin_run_write
            if incremental is not None:
                future, reused = run_write(lambda: self._write_incrementally(plan, planner, incremental, report))
            elif staging is None:
                future = run_write(lambda: write(plan, planner))
            else:
                with staging.writing(self._files_in_writing_order(plan), planner) as pool_planner:
                    future = run_write(lambda: write(plan, pool_planner))
        finally:
            self.fs = original
            self._dcp_plugin_writing = None
        results = list(future.wait()) + reused
        results += self._tied_results(tied, results, report["fingerprints"])
        report["files"] = sink.files
        report["direct_io"] = writing.direct_io
        results.append(WriteResult(index=MetadataIndex(_CHECKSUMS_FQN), size_in_bytes=0, storage_data=report))
        out: Future = Future()
        out.set_result(results)
        return out

    def _without_ties(self, plan: Any) -> tuple[Any, list[Any]]:
        """The plan without the tensors that view the same memory as another tensor this rank writes (tied
        weights: stored once), and those tensors' write items."""
        aliases = self._dcp_plugin_aliases
        if not aliases:
            return plan, []
        fqns = {item.index.fqn for item in plan.items}
        tied = [
            item for item in plan.items if item.type != WriteItemType.BYTE_IO and aliases.get(item.index.fqn) in fqns
        ]
        if not tied:
            return plan, []
        skipped = {id(item) for item in tied}
        return dataclasses.replace(plan, items=[item for item in plan.items if id(item) not in skipped]), tied

    def _tied_results(self, tied: list[Any], results: list[WriteResult], fingerprints: dict[str, str]) -> list:
        """A tied tensor's storage entry points at the bytes of the tensor it shares memory with."""
        by_fqn = {result.index.fqn: result for result in results}
        out = []
        for item in tied:
            primary = self._dcp_plugin_aliases[item.index.fqn]
            written = by_fqn[primary]
            out.append(
                WriteResult(index=item.index, size_in_bytes=written.size_in_bytes, storage_data=written.storage_data)
            )
            digest = fingerprints.get(chunk_key(primary, written.index.offset))
            if digest is not None:
                fingerprints[chunk_key(item.index.fqn, item.index.offset)] = digest
        return out

    def _write_incrementally(
        self, plan: Any, planner: Any, incremental: IncrementalPlan, report: dict[str, Any]
    ) -> tuple[Future, list[WriteResult]]:
        """Chunks whose fingerprint matches bytes already in a blob are not written (their storage entry points
        at those bytes); other chunks kept in blobs go to new blob files; everything else to the usual files."""
        own, fresh, reused = [], [], []
        for item in plan.items:
            if item.type == WriteItemType.BYTE_IO or item.index.fqn not in incremental.blob_keys:
                own.append(item)
                continue
            key = chunk_key(item.index.fqn, item.index.offset)
            if item.index.fqn in incremental.unchanged:
                if key not in incremental.reuse:  # a stand-in's bytes are not the tensor's: never write them
                    raise CheckpointSaveError(
                        f"{item.index.fqn} was planned as unchanged, but the base checkpoint has no chunk {key}; "
                        "nothing was committed. Save again: the next save writes it afresh."
                    )
                digest = incremental.reuse[key][1]
            else:
                digest = fingerprint(planner.resolve_data(item))
            if digest is None:
                own.append(item)
                continue
            report["fingerprints"][key] = digest
            earlier = incremental.reuse.get(key)
            if earlier is not None and earlier[1] == digest:
                info = earlier[0]
                reused.append(WriteResult(index=item.index, size_in_bytes=info.length, storage_data=info))
                report["used_blobs"][info.relative_path] = incremental.records[info.relative_path]
            else:
                fresh.append(item)
        files: queue.Queue = queue.Queue()
        prefix = plan.storage_data.prefix
        for number, bucket in enumerate(b for b in _split_by_size_and_type(self._files_for(own), own) if b):
            name = f"{prefix}{number}.distcp"
            files.put((self.fs.concat_path(self.path, name), name, bucket))  # type: ignore[attr-defined]
        if fresh:
            root = self._dcp_plugin_root
            area = root.url(root.work(BLOBS))
            area_path = type(self.path)(area)  # type: ignore[attr-defined]
            self.fs.mkdir(area_path)
            for number, bucket in enumerate(b for b in _split_by_size_and_type(self._files_for(fresh), fresh) if b):
                name = blob_name(incremental.write_id, incremental.rank, number)
                report["new_blobs"].append(name)
                files.put((self.fs.concat_path(area_path, name), name, bucket))
        return self._write_data(planner, files), reused  # type: ignore[attr-defined]

    def _files_for(self, items: Sequence[Any]) -> int:
        """How many files ``items`` are written to: one below ``ONE_FILE_BELOW`` bytes, ``thread_count`` above."""
        return 1 if _tensor_bytes(items) < ONE_FILE_BELOW else self.thread_count  # type: ignore[attr-defined]

    def _write_data(self, planner: Any, file_queue: queue.Queue) -> Future:
        """DCP's file layout written by :class:`FileWriting` (records without crc32, hashed once); DCP's own loop
        for what it does not cover (stream transform extensions, safetensors)."""
        writing = getattr(self, "_dcp_plugin_writing", None)
        standard = self.serialization_format == SerializationFormat.TORCH_SAVE and not self.transforms.extensions  # type: ignore[attr-defined]
        if writing is None or not standard:
            return super()._write_data(planner, file_queue)  # type: ignore[misc]
        out: Future = Future()
        threads = min(self.thread_count, file_queue.qsize())  # type: ignore[attr-defined]
        out.set_result(writing.write_all(planner, file_queue, max(1, threads)))
        return out

    def bytes_added(self, metadata: Metadata) -> int:
        """Bytes of tensor data this save wrote itself (chunks that refer to earlier blobs are not counted)."""
        plan = self._dcp_plugin_incremental
        return sum(
            length
            for (relative, _), length in _stored(metadata).items()
            if plan is None or write_id_of(relative) in (None, plan.write_id)
        )

    def _files_in_writing_order(self, plan: Any) -> list[list[Any]]:
        """The write items of each file, in the order DCP's writer threads write them (as its ``write_data``
        splits them: one file per thread; one file per item, taken in plan order, otherwise)."""
        if self.single_file_per_rank:  # type: ignore[attr-defined]
            return _split_by_size_and_type(self.thread_count, plan.items)  # type: ignore[attr-defined]
        return [list(plan.items)]

    def finish(self, metadata: Metadata, results: list) -> None:  # type: ignore[override]
        files: dict[str, dict[str, Any]] = {}
        blobs: dict[str, dict[str, Any]] = {}
        fingerprints: dict[str, str] = {}
        direct: list[bool] = []
        data_results = []
        for rank_results in results:
            kept = []
            for result in rank_results:
                if result.index.fqn != _CHECKSUMS_FQN:
                    kept.append(result)
                    continue
                report = result.storage_data
                for name, record in report["files"].items():
                    (blobs if name in report["new_blobs"] else files)[name] = record
                blobs.update(report["used_blobs"])
                fingerprints.update(report["fingerprints"])
                if report.get("direct_io") is not None:
                    direct.append(report["direct_io"])
            data_results.append(kept)
        # DCP's plan cache hands the same Metadata object to the next save: what the last one set is not written.
        for name in SET_AFTER_WRITING:
            vars(metadata).pop(name, None)
        super().finish(metadata, data_results)  # type: ignore[misc]
        needed = {str(info.relative_path) for info in (metadata.storage_data or {}).values()}
        incremental = self._dcp_plugin_incremental
        written = Written(files, blobs, fingerprints, needed, _bytes_written(metadata))
        checked = seal(
            self._dcp_plugin_root,
            self._dcp_plugin_strategy,
            self._dcp_plugin_pending,
            written,
            None if incremental is None else incremental.write_id,
        )
        # Set after .metadata is written: it travels back to every rank's save (and from the writer daemon) only.
        metadata.dcp_plugin_direct_io = all(direct) if direct else None  # type: ignore[attr-defined]
        if incremental is not None:
            metadata.dcp_plugin_blobs_checked = checked  # type: ignore[attr-defined]
            metadata.dcp_plugin_blobs = blobs  # type: ignore[attr-defined]
            metadata.dcp_plugin_fingerprints = fingerprints  # type: ignore[attr-defined]
        pending = self._dcp_plugin_pending
        if pending.handoff is not None:  # a commit across nodes: every rank completes it (NodeCommit.complete)
            setattr(metadata, HANDOFF_ATTRIBUTE, pending.handoff)


def _file_writing(
    fs: Any, sink: ChecksumSink, staging: StagingSession | None, *, fsync: bool, direct: bool
) -> FileWriting:
    """How this save's writer threads open files: a descriptor on a local disk, the filesystem's stream otherwise."""

    def open_file(path: Any) -> Any:
        return open_record_file(fs, path, direct=direct)

    def record(name: str, size: int, digest: str) -> None:
        sink.recorder(name)(size, digest)

    return FileWriting(open_file, record, fsync=fsync, on_closed=None if staging is None else staging.stream_closed)


class CommittingFileSystemWriter(_CommitOnFinish, FileSystemWriter):
    def __init__(
        self,
        path: str,
        *,
        root: StorageRoot,
        strategy: CommitStrategy,
        pending: PendingWrite,
        run_write: RunWrite = run_here,
        incremental: IncrementalPlan | None = None,
        direct_io: bool = True,
        aliases: dict[str, str] | None = None,
        **kwargs: Any,
    ) -> None:
        FileSystemWriter.__init__(self, path, **kwargs)
        self._init_commit(root, strategy, pending, run_write, incremental, direct_io, aliases)


class CommittingFsspecWriter(_CommitOnFinish, FsspecWriter):
    def __init__(
        self,
        path: str,
        *,
        root: StorageRoot,
        strategy: CommitStrategy,
        pending: PendingWrite,
        run_write: RunWrite = run_here,
        incremental: IncrementalPlan | None = None,
        aliases: dict[str, str] | None = None,
        **kwargs: Any,
    ) -> None:
        FsspecWriter.__init__(self, path, **kwargs)
        self._init_commit(root, strategy, pending, run_write, incremental, aliases=aliases)


__all__ = ["CommittingFileSystemWriter", "CommittingFsspecWriter"]
