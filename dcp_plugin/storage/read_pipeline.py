"""Reading local files front to back with ``preadv``, several requests in flight, every byte hashed in order.

A file is cut into *batches*: contiguous ranges of at most :data:`BATCH_BYTES`, each read by one ``preadv`` whose
pieces are either a destination's own memory (a tensor's bytes go straight where they belong) or a reused scratch
buffer (record heads and tails, gaps, bytes only hashed). Batches of all files are read by a few threads at once
(``preadv`` and ``xxh3`` release the GIL), at most :data:`WINDOW` of them ahead of the one being hashed, so
memory stays bounded and the disk sees many requests in flight; the caller's thread hashes each file's batches in
order as they complete and runs the file's ``done`` once its last batch is hashed (which may queue more reads).
"""

from __future__ import annotations

import ctypes
import mmap
import os
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch
import xxhash

READ_THREADS = 4
"""Threads reading at once: each ``preadv`` of up to :data:`BATCH_BYTES` keeps the disk busy on its own."""
BATCH_BYTES = 8 * 2**20
"""Bytes per ``preadv``: large enough for the disk, small enough to hash while still in the CPU's cache."""
WINDOW = 2 * READ_THREADS
"""Batches read ahead of the one being hashed."""
SKIPPED = 2**16
"""Gaps of at most this many bytes between the ranges a read wants are read rather than skipped."""
_IOV_MAX = min(os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024, 1024)
_FREE: list[mmap.mmap] = []
_FREE_LOCK = threading.Lock()
_KEPT = WINDOW + READ_THREADS


class ShortFile(Exception):
    """A file ended before the bytes being read from it (it shrank after its size was checked)."""

    def __init__(self, at: int, name: str = "") -> None:
        super().__init__(f"{name} ends early (at {at} bytes)".lstrip())
        self.at, self.name = at, name


@dataclass
class Batch:
    """One ``preadv``: a contiguous range of a file and where each of its pieces goes."""

    offset: int
    pieces: list[tuple[int, Any]] = field(default_factory=list)
    """(size, destination memoryview, or ``None`` for scratch) in file order."""
    kept: list[tuple[int, Any]] = field(default_factory=list)
    """(index of a scratch piece, what to hand its bytes to) for the pieces the caller looks at afterwards."""
    size: int = 0


class FileRead:
    """The batches of one read of one open file (:meth:`take` adds pieces in file order), and what follows it."""

    def __init__(self, fd: int, name: str, *, start: int = 0, hashing: bool = False) -> None:
        self.fd, self.name = fd, name
        self.batches: list[Batch] = []
        self.position = start
        self.hasher = xxhash.xxh3_128() if hashing else None
        self.done: Callable[[str | None], None] = lambda _digest: None
        """Called with the file's digest (``None`` when not hashing) once every batch is read and hashed."""

    def skip_to(self, offset: int) -> None:
        """Go on reading at ``offset``: short gaps are read into scratch (one large read beats many small ones),
        longer ones skipped. Only for reads that do not hash."""
        if offset - self.position <= SKIPPED and self.batches:
            self.scratch(offset - self.position)
        elif offset != self.position:
            self.position = offset
            self.batches.append(Batch(offset))

    def scratch(self, nbytes: int, keep: Callable[[bytes], None] | None = None) -> None:
        """The next ``nbytes`` are hashed only; ``keep`` (for small pieces) is given them once read."""
        while nbytes > 0:
            piece = min(nbytes, BATCH_BYTES)
            self._add(piece, None, keep)
            nbytes -= piece

    def into(self, tensor: torch.Tensor, nbytes: int) -> None:
        """The next ``nbytes`` go straight into the memory of the contiguous CPU ``tensor``."""
        memory = _memory(tensor, nbytes)
        for start in range(0, nbytes, BATCH_BYTES):
            self._add(min(BATCH_BYTES, nbytes - start), memory[start : start + BATCH_BYTES], None)

    def _add(self, nbytes: int, target: Any, keep: Any) -> None:
        batch = self.batches[-1] if self.batches else None
        if batch is None or (batch.pieces and batch.size + nbytes > BATCH_BYTES) or len(batch.pieces) >= _IOV_MAX:
            batch = Batch(self.position)
            self.batches.append(batch)
        if keep is not None:
            batch.kept.append((len(batch.pieces), keep))
        batch.pieces.append((nbytes, target))
        batch.size += nbytes
        self.position += nbytes


def _memory(tensor: torch.Tensor, nbytes: int) -> memoryview:
    return memoryview((ctypes.c_char * nbytes).from_address(tensor.data_ptr())).cast("B")


def _take_scratch() -> mmap.mmap:
    with _FREE_LOCK:
        if _FREE:
            return _FREE.pop()
    return mmap.mmap(-1, BATCH_BYTES, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)


def _give_back(buffer: mmap.mmap) -> None:
    with _FREE_LOCK:
        if len(_FREE) < _KEPT:
            _FREE.append(buffer)
            return
    buffer.close()


def _read(fd: int, batch: Batch) -> tuple[list[memoryview], mmap.mmap | None]:
    """Read one batch; returns the views of its pieces in file order, and the scratch buffer they use."""
    needs_scratch = any(target is None for _size, target in batch.pieces)
    buffer = _take_scratch() if needs_scratch else None
    whole = memoryview(buffer) if buffer is not None else None
    views: list[memoryview] = []
    used = 0
    for size, target in batch.pieces:
        if target is None:
            assert whole is not None
            views.append(whole[used : used + size])
            used += size
        else:
            views.append(target)
    offset, pending, first = batch.offset, [view for view in views if len(view)], 0
    while first < len(pending):
        count = os.preadv(fd, pending[first:], offset)
        if count <= 0:
            raise ShortFile(offset)
        offset += count
        while first < len(pending) and count >= len(pending[first]):
            count -= len(pending[first])
            first += 1
        if count:  # a short read (a signal, a large range): go on from inside this piece
            pending[first] = pending[first][count:]
    return views, buffer


class Pipeline:
    """Runs file reads through a thread pool, hashing each file's batches in order in the caller's thread."""

    def __init__(self, *, threads: bool = True) -> None:
        self._threads = threads
        self._pool: ThreadPoolExecutor | None = None
        self._queue: deque[tuple[FileRead, int]] = deque()

    def add(self, read: FileRead) -> None:
        """Queue ``read`` (its batches follow every batch queued before)."""
        if not read.batches:
            self._queue.append((read, -1))
        for index in range(len(read.batches)):
            self._queue.append((read, index))

    def run(self) -> None:
        """Read and hash everything queued, calling each read's ``done`` in order; reads queued by a ``done``
        run too. The first error stops the reads and is raised here."""
        flight: deque[tuple[FileRead, int, Future]] = deque()
        try:
            while self._queue or flight:
                while self._queue and len(flight) < WINDOW:
                    read, index = self._queue.popleft()
                    flight.append((read, index, self._submit(read, index)))
                read, index, future = flight.popleft()
                if index >= 0:
                    try:
                        views, buffer = future.result()
                    except ShortFile as err:
                        raise ShortFile(err.at, read.name) from None
                    self._hash(read, read.batches[index], views, buffer)
                if index == len(read.batches) - 1 or index < 0:
                    read.done(read.hasher.hexdigest() if read.hasher is not None else None)
        finally:
            for _read, _index, future in flight:
                future.cancel()

    def _submit(self, read: FileRead, index: int) -> Future:
        if index < 0 or not self._threads:
            done: Future = Future()
            try:
                done.set_result(_read(read.fd, read.batches[index]) if index >= 0 else None)
            except BaseException as err:  # noqa: BLE001 - raised where the result is taken
                done.set_exception(err)
            return done
        if self._pool is None:
            self._pool = ThreadPoolExecutor(READ_THREADS, thread_name_prefix="dcp-plugin-read")
        return self._pool.submit(_read, read.fd, read.batches[index])

    @staticmethod
    def _hash(read: FileRead, batch: Batch, views: list[memoryview], buffer: mmap.mmap | None) -> None:
        try:
            if read.hasher is not None:
                for view in views:
                    read.hasher.update(view)
            for index, keep in batch.kept:
                keep(bytes(views[index]))
        finally:
            for view in views:
                view.release()
            if buffer is not None:
                _give_back(buffer)

    def close(self) -> None:
        """Wait for reads still running (they write into tensors and buffers) and stop the threads."""
        pool, self._pool = self._pool, None
        self._queue.clear()
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)


__all__ = ["BATCH_BYTES", "FileRead", "Pipeline", "READ_THREADS", "ShortFile", "WINDOW"]
