"""Writing a rank's checkpoint files: DCP's file layout, records without crc32, every byte hashed once.

This replaces the loop of DCP's ``FileSystemWriter`` (``_write_files_from_queue``) for our writers: same files,
same order of items in a file, same ``WriteResult`` byte ranges, so DCP's ``.metadata`` and reader see what they
always see. The hot path per tensor is one hash over its memory and one ``writev`` of (head, memory, tail) on a
local disk; no per-chunk Python work, no copy of the tensor's bytes.

On a local disk that accepts it, files are written with ``O_DIRECT`` instead, so the kernel neither copies the
bytes into the page cache nor writes them back later, which costs less CPU per byte than a buffered write. A large
tensor goes to the disk straight from its own memory in one ``pwrite``: its record is placed in the file so that
the data's file offset and memory address agree modulo the block size (the gap before it is zeros that no item
covers), the few bytes up to the first aligned address, the record's head and tail and small records go through a
page-aligned buffer of a few MiB. One large write keeps many requests in flight, so the disk never waits for the
next buffer to be filled. The last block is padded for the disk and the file truncated to its size; fsync and the
commit protocol are as before. Where the filesystem refuses ``O_DIRECT`` (tmpfs, some network filesystems: ``EINVAL`` on
open or on write), the file is written through the page cache, and the save reports it (``SaveStats.direct_io``).
"""

from __future__ import annotations

import errno
import fcntl
import logging
import mmap
import os
import queue
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from io import UnsupportedOperation
from typing import Any

import torch
import xxhash
from torch.distributed.checkpoint.filesystem import FileSystem, _StorageInfo
from torch.distributed.checkpoint.planner import WriteItemType
from torch.distributed.checkpoint.storage import WriteResult

from dcp_plugin.storage.records import storage_alignment, tensor_record

log = logging.getLogger(__name__)

_WRITEV_MAX = 0x7FFFF000  # Linux writes at most this many bytes per call
DIRECT_BUFFER = 8 * 2**20
"""Bytes per ``O_DIRECT`` write: large enough for the disk, small enough to stay in the CPU's cache."""
_BLOCK = 4096  # O_DIRECT needs offsets, lengths and addresses in multiples of the logical block size (512 or 4096)
DIRECT_FROM_MEMORY = 2**20
"""Tensors of at least this many bytes are written to an ``O_DIRECT`` file from their own memory; smaller ones
are copied into the buffer (a gap of up to a block before each would cost more than the copy saves)."""
_O_DIRECT = getattr(os, "O_DIRECT", 0)
_REFUSED_LOGGED: set[Any] = set()
_FREE_BUFFERS: list[mmap.mmap] = []
_FREE_BUFFERS_LOCK = threading.Lock()
_BUFFERS_KEPT = 4


def _take_buffer() -> mmap.mmap:
    """A page-aligned buffer, one whose pages are already mapped where there is one: the writer threads are new at
    every save, and a fresh mapping would fault in every page it is filled with."""
    with _FREE_BUFFERS_LOCK:
        if _FREE_BUFFERS:
            return _FREE_BUFFERS.pop()
    # Private, not mmap's default shared mapping: a process forked later (notebook_launcher, DataLoader workers,
    # ddp_fork) gets its own copy of a kept buffer instead of writing into the same pages as its siblings.
    return mmap.mmap(-1, DIRECT_BUFFER, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)


def _give_back(buffer: mmap.mmap) -> None:
    with _FREE_BUFFERS_LOCK:
        if len(_FREE_BUFFERS) < _BUFFERS_KEPT:
            _FREE_BUFFERS.append(buffer)


def _refused(path: str, reason: str) -> None:
    """Log once per filesystem (device) that it refuses ``O_DIRECT``."""
    directory = os.path.dirname(path)
    try:
        device: Any = os.stat(directory).st_dev
    except OSError:
        device = directory
    if device not in _REFUSED_LOGGED:
        _REFUSED_LOGGED.add(device)
        log.info(
            "The filesystem of %s refuses O_DIRECT (%s); checkpoint files there go through the page cache.",
            directory,
            reason,
        )


class RecordFile:
    """One checkpoint file being written: buffers appended in order and hashed with xxh3-128 as they go.

    Local files are written with ``os.writev`` on a descriptor; other filesystems through their stream."""

    def __init__(
        self, *, fd: int | None = None, stream: Any = None, direct: bool = False, path: str = "", buffered: bool = True
    ) -> None:
        self._fd = fd
        self._stream = stream
        self._hasher = xxhash.xxh3_128()
        self.size = 0
        self._path = path
        self.direct: bool | None = direct if fd is not None else None
        """``O_DIRECT`` for this file: True, False (refused: through the page cache), None (not a local file)."""
        self._mapping = _take_buffer() if direct and buffered else None
        self._buffer = memoryview(self._mapping) if self._mapping is not None else None
        self._fill = 0  # bytes waiting in the buffer, to be written at file offset ``_flushed``
        self._flushed = 0
        self._padded = False  # a :meth:`put` wrote past the end (O_DIRECT pads the last block): truncate on close

    @classmethod
    def create_local(cls, path: str, *, direct: bool = True, buffered: bool = True) -> RecordFile:
        """A new local file, written with ``O_DIRECT`` where asked for (``CheckpointConfig.direct_io``) and the
        filesystem accepts it. ``buffered=False``: the file is written with :meth:`put` only."""
        # every file of a save has a fresh name: one already there (a link planted by someone else) is never
        # written through
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0)
        if direct and _O_DIRECT:
            try:
                return cls(fd=os.open(path, flags | _O_DIRECT, 0o666), direct=True, path=path, buffered=buffered)
            except OSError as err:
                if err.errno != errno.EINVAL:
                    raise
                _refused(path, "EINVAL on open")
        return cls(fd=os.open(path, flags, 0o666), path=path, buffered=buffered)

    def put(self, data: memoryview, offset: int, room: int | None = None) -> None:
        """Write ``data`` at ``offset``, right after what was written so far (files written with ``put`` only). With
        ``O_DIRECT``, ``offset`` and ``data``'s address are block-aligned, and a length that is not is padded from
        ``room`` (``data`` extended over its buffer up to the next block, a view of at least that many bytes)."""
        if offset != self.size:
            raise ValueError(f"put at {offset}, but the file is written up to {self.size}")
        self._hasher.update(data)
        self.size = offset + len(data)
        if self._fd is None:
            while len(data):
                written = self._stream.write(data)
                data = data[len(data) if written is None else written :]
            return
        if self.direct and len(data) % _BLOCK:
            padded = -(-len(data) // _BLOCK) * _BLOCK
            if room is None or len(room) < padded:
                raise ValueError("an O_DIRECT write needs room to pad its last block")
            data, self._padded = room[:padded], True
        self._pwrite(data, offset)

    def append(self, *buffers: Any) -> None:
        views = [view for view in (memoryview(b).cast("B") for b in buffers) if len(view)]
        total = sum(len(view) for view in views)
        if self._buffer is not None:
            for view in views:
                self._buffered(view)
            self.size += total
            return
        for view in views:
            self._hasher.update(view)
        if self._fd is not None:
            _writev_all(self._fd, list(views))
        else:
            for view in views:
                while len(view):
                    written = self._stream.write(view)
                    view = view[len(view) if written is None else written :]
        self.size += total

    def append_record(self, head: Any, data: memoryview, tail: Any, *, address: int) -> int:
        """Append one tensor record (``data`` is the tensor's memory, which starts at ``address``); returns the
        file offset where the record begins, which on an ``O_DIRECT`` file may follow a gap of zeros."""
        if self._buffer is None or len(data) < DIRECT_FROM_MEMORY:
            start = self.size
            self.append(head, data, tail)
            return start
        gap = (address - self.size - len(head)) % _BLOCK
        if gap:
            self.append(bytes(gap))
        start = self.size
        lead = (-address) % _BLOCK
        self.append(head, data[:lead])
        body = (len(data) - lead) // _BLOCK * _BLOCK
        self._write_buffer(self._fill)  # the file is now written up to a block boundary: ``size``
        aligned = data[lead : lead + body]
        self._hasher.update(aligned)
        self._pwrite(aligned, self._flushed)
        self._flushed += body
        self.size += body
        self.append(data[lead + body :], tail)
        return start

    def _buffered(self, view: memoryview) -> None:
        buffer = self._buffer
        assert buffer is not None
        while len(view):
            piece = view[: len(buffer) - self._fill]
            self._hasher.update(piece)
            buffer[self._fill : self._fill + len(piece)] = piece
            self._fill += len(piece)
            view = view[len(piece) :]
            if self._fill == len(buffer):
                self._write_buffer(len(buffer))

    def _write_buffer(self, length: int) -> None:
        """Write the buffer's first ``length`` bytes (a multiple of the block size) at their file offset."""
        assert self._buffer is not None
        self._pwrite(self._buffer[:length], self._flushed)
        self._flushed += length
        self._fill = 0

    def _pwrite(self, data: memoryview, offset: int) -> None:
        """Write ``data`` at ``offset``; where the filesystem refuses ``O_DIRECT`` on write, through the page cache."""
        assert self._fd is not None
        while len(data):
            try:
                written = os.pwrite(self._fd, data, offset)
            except OSError as err:
                if err.errno != errno.EINVAL or not self.direct:
                    raise
                _refused(self._path, "EINVAL on write")
                fcntl.fcntl(self._fd, fcntl.F_SETFL, fcntl.fcntl(self._fd, fcntl.F_GETFL) & ~_O_DIRECT)
                self.direct = False
                continue
            data, offset = data[written:], offset + written

    def close(self, *, fsync: bool) -> tuple[int, str]:
        """Make the file durable (``fsync``) and close it; returns (size, xxh3-128 hex digest)."""
        if self._buffer is not None and self._fd is not None:
            if self._fill:
                padded = -(-self._fill // _BLOCK) * _BLOCK
                self._buffer[self._fill : padded] = bytes(padded - self._fill)
                self._write_buffer(padded)
                os.ftruncate(self._fd, self.size)
            self._release_buffer()
        elif self._padded and self._fd is not None:
            os.ftruncate(self._fd, self.size)
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

    def _release_buffer(self) -> None:
        if self._buffer is not None:
            self._buffer.release()
            self._buffer = None
        if self._mapping is not None:
            _give_back(self._mapping)
            self._mapping = None

    def abandon(self) -> None:
        self._release_buffer()
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


@contextmanager
def open_record_file(fs: Any, path: Any, *, direct: bool, buffered: bool = True) -> Iterator[RecordFile]:
    """A new file of a DCP filesystem ``fs`` to write records to: a descriptor on a local disk (``O_DIRECT`` where
    asked for and accepted), the filesystem's stream otherwise. ``buffered=False``: written with ``put`` only."""
    if isinstance(fs, FileSystem):
        yield RecordFile.create_local(os.fspath(path), direct=direct, buffered=buffered)
        return
    with fs.create_stream(path, "wb") as stream:
        yield RecordFile(stream=stream)


OpenFile = Callable[[Any], Any]
"""Opens one file for writing; a context manager that yields a :class:`RecordFile`."""


def on_writer_threads(work: Callable[[], None], count: int) -> None:
    """Run ``work`` (a loop that takes files until none are left) on this thread and on ``count - 1`` more at
    once; the first error any of them raised is raised here, once all of them have ended."""
    errors: list[BaseException] = []

    def guarded() -> None:
        try:
            work()
        except BaseException as err:  # noqa: BLE001 - raised on the calling thread below
            errors.append(err)

    threads = [threading.Thread(target=guarded, name="dcp-plugin-writer") for _ in range(1, count)]
    for thread in threads:
        thread.start()
    guarded()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]


def direct_io_of(used: list[bool | None]) -> bool | None:
    """Whether files went to the disk with ``O_DIRECT``, from each file's answer (``None``: not tried): False if
    any was refused it, None if none tried."""
    tried = [d for d in used if d is not None]
    return None if not tried else all(tried)


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
        self._direct: list[bool | None] = []

    @property
    def direct_io(self) -> bool | None:
        """Whether the files went to the disk with ``O_DIRECT``: False if any was refused it, None if none tried."""
        return direct_io_of(self._direct)

    def write_all(self, planner: Any, file_queue: queue.Queue, thread_count: int) -> list[WriteResult]:
        """Write every file in ``file_queue`` with ``thread_count`` threads (this one included), as DCP does."""
        results: queue.Queue = queue.Queue()
        on_writer_threads(lambda: self._drain(planner, file_queue, results), thread_count)
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
                    alignment = storage_alignment()
                    for item in items:
                        if item.type != WriteItemType.BYTE_IO:
                            tensor = _cpu_tensor(planner.resolve_data(item))
                            head, data, tail = tensor_record(tensor, alignment)
                            address = tensor.untyped_storage().data_ptr()
                            offset = out.append_record(head, data, tail, address=address)
                            written.append(_result(item, storage_key, offset, out.size - offset))
                            del tensor, data
                    size, digest = out.close(fsync=self.fsync)
                    self._direct.append(out.direct)
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
    if tensor.requires_grad or type(tensor) is not torch.Tensor:  # a Parameter becomes a plain tensor
        tensor = tensor.detach()
    if tensor.device.type != "cpu":
        tensor = tensor.cpu()
    if tensor.untyped_storage().nbytes() != tensor.nbytes:
        tensor = tensor.clone()
    return tensor


def _append(out: RecordFile, item: Any, storage_key: str, *buffers: Any) -> WriteResult:
    offset = out.size
    out.append(*buffers)
    return _result(item, storage_key, offset, out.size - offset)


def _result(item: Any, storage_key: str, offset: int, length: int) -> WriteResult:
    return WriteResult(index=item.index, size_in_bytes=length, storage_data=_StorageInfo(storage_key, offset, length))


__all__ = ["FileWriting", "RecordFile", "direct_io_of", "on_writer_threads", "open_record_file"]
