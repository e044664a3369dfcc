"""Writing a rank's checkpoint files: DCP's file layout, records without crc32, every byte hashed once.

This replaces the loop of DCP's ``FileSystemWriter`` (``_write_files_from_queue``) for our writers: same files,
same order of items in a file, same ``WriteResult`` byte ranges, so DCP's ``.metadata`` and reader see what they
always see. The hot path per tensor is one hash over its memory and one ``writev`` of (head, memory, tail) on a
local disk; no per-chunk Python work, no copy of the tensor's bytes.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable
from io import UnsupportedOperation
from typing import Any

import xxhash
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.planner import WriteItemType
from torch.distributed.checkpoint.storage import WriteResult

from dcp_plugin.storage.records import tensor_record

_WRITEV_MAX = 0x7FFFF000  # Linux writes at most this many bytes per call


class RecordFile:
    """One checkpoint file being written: buffers appended in order and hashed with xxh3-128 as they go.

    Local files are written with ``os.writev`` on a descriptor; other filesystems through their stream."""

    def __init__(self, *, fd: int | None = None, stream: Any = None) -> None:
        self._fd = fd
        self._stream = stream
        self._hasher = xxhash.xxh3_128()
        self.size = 0

    @classmethod
    def create_local(cls, path: str) -> RecordFile:
        return cls(fd=os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o666))

    def append(self, *buffers: Any) -> None:
        views = [view for view in (memoryview(b).cast("B") for b in buffers) if len(view)]
        for view in views:
            self._hasher.update(view)
        total = sum(len(view) for view in views)
        if self._fd is not None:
            _writev_all(self._fd, list(views))
        else:
            for view in views:
                while len(view):
                    written = self._stream.write(view)
                    view = view[len(view) if written is None else written :]
        self.size += total

    def close(self, *, fsync: bool) -> tuple[int, str]:
        """Make the file durable (``fsync``) and close it; returns (size, xxh3-128 hex digest)."""
        if self._fd is not None:
            try:
                if fsync:
                    os.fsync(self._fd)
            finally:
                os.close(self._fd)
                self._fd = None
        elif self._stream is not None:
            self._stream.flush()
            if fsync:
                try:
                    os.fsync(self._stream.fileno())
                except (AttributeError, UnsupportedOperation):
                    os.sync()  # as DCP does for streams without a descriptor
        return self.size, self._hasher.hexdigest()

    def abandon(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _writev_all(fd: int, views: list[memoryview]) -> None:
    while views:
        batch, total = [], 0
        for view in views:
            if total + len(view) > _WRITEV_MAX:
                if not batch:
                    batch.append(view[:_WRITEV_MAX])
                break
            batch.append(view)
            total += len(view)
        written = os.writev(fd, batch)
        while written:
            if written >= len(views[0]):
                written -= len(views[0])
                views.pop(0)
            else:
                views[0] = views[0][written:]
                written = 0


OpenFile = Callable[[Any], Any]
"""Opens one file for writing; a context manager that yields a :class:`RecordFile`."""


class FileWriting:
    """What the writer threads of one rank share: how to open a file, where checksums go, who hears of a closed
    file (a bounded staging pool gives back what the thread held), and whether files are fsynced."""

    def __init__(
        self,
        open_file: OpenFile,
        record: Callable[[str, int, str], None],
        *,
        fsync: bool,
        on_closed: Callable[[BaseException | None], None] | None = None,
    ) -> None:
        self.open_file = open_file
        self.record = record
        self.fsync = fsync
        self.on_closed = on_closed

    def write_all(self, planner: Any, file_queue: queue.Queue, thread_count: int) -> list[WriteResult]:
        """Write every file in ``file_queue`` with ``thread_count`` threads (this one included), as DCP does."""
        results: queue.Queue = queue.Queue()
        errors: list[BaseException] = []

        def drain() -> None:
            try:
                self._drain(planner, file_queue, results)
            except BaseException as err:  # noqa: BLE001 - raised on the calling thread below
                errors.append(err)

        threads = [threading.Thread(target=drain, name="dcp-plugin-writer") for _ in range(1, thread_count)]
        for thread in threads:
            thread.start()
        drain()
        for thread in threads:
            thread.join()
        if errors:
            raise errors[0]
        out: list[WriteResult] = []
        while not results.empty():
            out += results.get_nowait()
        return out

    def _drain(self, planner: Any, file_queue: queue.Queue, results: queue.Queue) -> None:
        while True:
            try:
                path, storage_key, items = file_queue.get_nowait()
            except queue.Empty:
                return
            results.put(self._write_file(planner, path, storage_key, items))

    def _write_file(self, planner: Any, path: Any, storage_key: str, items: list[Any]) -> list[WriteResult]:
        written: list[WriteResult] = []
        error: BaseException | None = None
        try:
            with self.open_file(path) as out:
                try:
                    for item in items:
                        if item.type == WriteItemType.BYTE_IO:
                            written.append(_append(out, item, storage_key, planner.resolve_data(item).getbuffer()))
                    for item in items:
                        if item.type != WriteItemType.BYTE_IO:
                            tensor = _cpu_tensor(planner.resolve_data(item))
                            written.append(_append(out, item, storage_key, *tensor_record(tensor)))
                            del tensor
                    size, digest = out.close(fsync=self.fsync)
                except BaseException:
                    out.abandon()
                    raise
            self.record(os.path.basename(os.fspath(path)), size, digest)
        except BaseException as err:
            error = err
            raise
        finally:
            if self.on_closed is not None:
                self.on_closed(error)
        return written


def _cpu_tensor(tensor: Any) -> Any:
    """As DCP's writer loads a tensor: detached, on the CPU, and holding no bytes beyond its own."""
    tensor = tensor.detach().cpu()
    if tensor.untyped_storage().nbytes() != tensor.nbytes:
        tensor = tensor.clone()
    return tensor


def _append(out: RecordFile, item: Any, storage_key: str, *buffers: Any) -> WriteResult:
    offset = out.size
    out.append(*buffers)
    length = out.size - offset
    return WriteResult(index=item.index, size_in_bytes=length, storage_data=_StorageInfo(storage_key, offset, length))


__all__ = ["FileWriting", "RecordFile"]
