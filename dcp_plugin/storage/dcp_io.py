"""The glue between DCP's file readers/writers and our commit protocol, checksums and distrust of input.

Writers hash every file while DCP writes it and commit the checkpoint from ``finish`` (which DCP's coordinator
calls once every rank wrote its part). Readers read ``.metadata`` size-bounded and without running code, check
every path and size in it, verify the checksums of the files a load reads before DCP reads them, and open
only regular files inside the checkpoint directory.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Mapping
from contextlib import contextmanager
from typing import Any

from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader, FsspecWriter
from torch.distributed.checkpoint.filesystem import FileSystem
from torch.distributed.checkpoint.metadata import Metadata, MetadataIndex, TensorStorageMetadata
from torch.distributed.checkpoint.storage import WriteResult
from torch.futures import Future

from dcp_plugin.errors import CheckpointCorruptError, UnsafeCheckpointError
from dcp_plugin.safety import loads_metadata
from dcp_plugin.storage.commit import CommitStrategy, PendingWrite
from dcp_plugin.storage.faults import reached
from dcp_plugin.storage.integrity import ChecksumSink, HashingStream, check_files, hash_file
from dcp_plugin.storage.names import METADATA_NAME, is_safe_data_file
from dcp_plugin.storage.root import StorageRoot
from dcp_plugin.storage.safe_io import MAX_METADATA_BYTES, open_local_regular, read_bounded, regular_file_size

log = logging.getLogger(__name__)

_WARNED_UNCHECKED: set[str] = set()
_CHECKSUMS_FQN = "__dcp_plugin_checksums__"
"""WriteResults under this name carry a rank's file checksums to the coordinator's ``finish``; they are
taken out before DCP builds ``.metadata``."""


# -- writing --------------------------------------------------------------------------------------------
class _HashingFileSystem:
    """Wraps a DCP filesystem so every stream opened for writing is hashed into ``sink``."""

    def __init__(self, inner: Any, sink: ChecksumSink) -> None:
        self._inner = inner
        self._sink = sink

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    @contextmanager
    def create_stream(self, path: Any, mode: str) -> Any:
        with self._inner.create_stream(path, mode) as stream:
            if "w" not in mode:
                yield stream
                return
            hashing = HashingStream(stream, self._sink.recorder(os.path.basename(os.fspath(path))))
            try:
                yield hashing
            finally:
                hashing.close()


def _bytes_written(metadata: Metadata) -> int:
    return sum(int(getattr(info, "length", 0)) for info in (metadata.storage_data or {}).values())


class _CommitOnFinish:
    """Mixed into DCP writers: hash while writing; in ``finish`` record checksums and commit."""

    def _init_commit(self, root: StorageRoot, strategy: CommitStrategy, pending: PendingWrite) -> None:
        self._dcp_plugin_root = root
        self._dcp_plugin_strategy = strategy
        self._dcp_plugin_pending = pending

    def write_data(self, plan: Any, planner: Any) -> Any:
        sink = ChecksumSink()
        original = self.fs  # type: ignore[has-type]
        self.fs = _HashingFileSystem(original, sink)
        try:
            future = super().write_data(plan, planner)  # type: ignore[misc]
        finally:
            self.fs = original
        results = list(future.wait())
        results.append(WriteResult(index=MetadataIndex(_CHECKSUMS_FQN), size_in_bytes=0, storage_data=sink.files))
        out: Future = Future()
        out.set_result(results)
        return out

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
        self, path: str, *, root: StorageRoot, strategy: CommitStrategy, pending: PendingWrite, **kwargs: Any
    ) -> None:
        FileSystemWriter.__init__(self, path, **kwargs)
        self._init_commit(root, strategy, pending)


class CommittingFsspecWriter(_CommitOnFinish, FsspecWriter):
    def __init__(
        self, path: str, *, root: StorageRoot, strategy: CommitStrategy, pending: PendingWrite, **kwargs: Any
    ) -> None:
        FsspecWriter.__init__(self, path, **kwargs)
        self._init_commit(root, strategy, pending)


# -- reading --------------------------------------------------------------------------------------------
class _RegularFilesOnly(FileSystem):
    """DCP's local filesystem, opening only regular files (no FIFO, device or symbolic link; never blocks)."""

    @contextmanager
    def create_stream(self, path: Any, mode: str) -> Any:
        if "r" in mode and "+" not in mode:
            with open_local_regular(os.fspath(path)) as stream:
                yield stream
            return
        with super().create_stream(path, mode) as stream:
            yield stream


class _Distrustful:
    """Mixed into DCP readers: see the module docstring."""

    def _init_checks(self, root: StorageRoot, directory: str, shown: str, manifest: Mapping[str, Any]) -> None:
        self._dcp_plugin_root = root
        self._dcp_plugin_directory = directory
        self._dcp_plugin_shown = shown
        files = manifest.get("files")
        self._dcp_plugin_files: dict[str, Any] | None = dict(files) if isinstance(files, dict) else None
        self._dcp_plugin_verified: set[str] = set()
        if root.is_local:
            self.fs = _RegularFilesOnly()

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        root, directory, shown = self._dcp_plugin_root, self._dcp_plugin_directory, self._dcp_plugin_shown
        path = f"{directory}/{METADATA_NAME}"
        shown_path = root.url(path)
        if self._dcp_plugin_files is not None:
            self._verify([METADATA_NAME])
        data = read_bounded(root.fs, path, is_local=root.is_local, limit=MAX_METADATA_BYTES, what="metadata file")
        try:
            metadata = loads_metadata(data)
        except UnsafeCheckpointError as err:
            raise UnsafeCheckpointError(f"{shown_path}: {err}") from None
        except Exception as err:  # noqa: BLE001 - any damage to the pickle stream
            raise CheckpointCorruptError(
                f"The metadata file {shown_path} of checkpoint {shown} is unreadable ({type(err).__name__}: {err}); "
                "the checkpoint is damaged. Load an earlier checkpoint."
            ) from None
        if not isinstance(metadata, Metadata):
            raise CheckpointCorruptError(f"{shown_path} does not hold DCP metadata; the checkpoint is damaged.")
        self._check_metadata(metadata, shown_path)
        if getattr(metadata, "storage_meta", None) is not None:
            metadata.storage_meta.load_id = self.load_id  # type: ignore[attr-defined]
        return metadata

    def _check_metadata(self, metadata: Metadata, shown_path: str) -> None:
        """Every file the metadata points at stays inside the checkpoint and holds the bytes it claims; the
        tensors it declares fit in those bytes (so nothing huge is allocated on a forged size)."""
        root, directory = self._dcp_plugin_root, self._dcp_plugin_directory
        sizes: dict[str, int] = {}
        stored = 0
        for index, info in (metadata.storage_data or {}).items():
            relative = getattr(info, "relative_path", None)
            if not is_safe_data_file(relative):
                raise UnsafeCheckpointError(
                    f"{shown_path} points {getattr(index, 'fqn', index)} at {relative!r}, outside the checkpoint "
                    "directory; refusing to read it."
                )
            offset, length = getattr(info, "offset", None), getattr(info, "length", None)
            if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (offset, length)):
                raise CheckpointCorruptError(f"{shown_path} has an invalid offset or length for {relative}.")
            if relative not in sizes:
                record = (self._dcp_plugin_files or {}).get(relative)
                try:
                    sizes[relative] = (
                        record["size"]
                        if record is not None
                        else regular_file_size(root.fs, f"{directory}/{relative}", is_local=root.is_local)
                    )
                except FileNotFoundError:
                    raise CheckpointCorruptError(
                        f"Data file {root.url(f'{directory}/{relative}')} is missing; the checkpoint is damaged."
                    ) from None
            if offset + length > sizes[relative]:
                raise CheckpointCorruptError(
                    f"{shown_path} says {relative} holds bytes up to {offset + length}, but it has {sizes[relative]}."
                )
            stored += length
        declared = 0
        for fqn, item in (metadata.state_dict_metadata or {}).items():
            if isinstance(item, TensorStorageMetadata):
                try:
                    itemsize = item.properties.dtype.itemsize
                    declared += math.prod(int(d) for d in item.size) * itemsize
                except (AttributeError, TypeError, ValueError) as err:
                    raise CheckpointCorruptError(f"{shown_path} declares tensor {fqn} malformed ({err}).") from None
        if declared > stored + 2**20:
            raise CheckpointCorruptError(
                f"{shown_path} declares {declared} bytes of tensors but its files hold only {stored}; "
                "the metadata is damaged or forged."
            )

    def read_data(self, plan: Any, planner: Any) -> Any:
        storage_data = self.storage_data  # type: ignore[attr-defined]
        needed = {str(storage_data[item.storage_index].relative_path) for item in plan.items}
        self._verify(sorted(needed))
        return super().read_data(plan, planner)  # type: ignore[misc]

    def _verify(self, names: list[str]) -> None:
        todo = [n for n in names if n not in self._dcp_plugin_verified]
        if not todo:
            return
        root, directory = self._dcp_plugin_root, self._dcp_plugin_directory
        if self._dcp_plugin_files is None:  # written before checksums existed: check what can be checked
            if self._dcp_plugin_shown not in _WARNED_UNCHECKED:
                _WARNED_UNCHECKED.add(self._dcp_plugin_shown)
                log.warning(
                    "%s was written without checksums (dcp-plugin 0.1); its files are checked for size only. "
                    "Save it again to protect it.",
                    self._dcp_plugin_shown,
                )
            for name in todo:
                regular_file_size(root.fs, f"{directory}/{name}", is_local=root.is_local)
        else:
            problems = check_files(root.fs, directory, self._dcp_plugin_files, is_local=root.is_local, only=todo)
            if problems:
                raise CheckpointCorruptError(
                    f"Checkpoint {self._dcp_plugin_shown} is damaged: {'; '.join(problems)}. It was not loaded."
                )
        self._dcp_plugin_verified.update(todo)


class SafeFileSystemReader(_Distrustful, FileSystemReader):
    def __init__(self, root: StorageRoot, directory: str, shown: str, manifest: Mapping[str, Any]) -> None:
        FileSystemReader.__init__(self, directory)
        self._init_checks(root, directory, shown, manifest)


class SafeFsspecReader(_Distrustful, FsspecReader):
    def __init__(self, root: StorageRoot, directory: str, shown: str, manifest: Mapping[str, Any]) -> None:
        FsspecReader.__init__(self, root.url(directory), **root.storage_options)
        self._init_checks(root, directory, shown, manifest)


__all__ = ["CommittingFileSystemWriter", "CommittingFsspecWriter", "SafeFileSystemReader", "SafeFsspecReader"]
