"""Files sent from one node to another over a gloo process group (no shared filesystem).

A file travels as consecutive chunks of at most :data:`CHUNK` bytes (its size is known to both ends in advance,
from the manifest). Both ends keep two chunks in flight, so the sender reads the next chunk from its disk while
the previous one is on the wire and the receiver writes one while the next arrives. The receiver hashes what it
writes and compares it with the committed checksum: a file that does not arrive as committed is never kept.

The chunks live in page-aligned buffers that gloo sends from and receives into directly; the sender reads with
``O_DIRECT`` and a receiver that keeps the file (a peer replica) writes it with ``O_DIRECT``, so neither end copies
the bytes through the page cache (several times cheaper in CPU than buffered I/O on our hosts); a restore writes
through the page cache, because its reader uses the file right away. Filesystems without ``O_DIRECT`` (tmpfs) are
read and written the ordinary way.

:func:`run_transfers` runs a list of transfers that every rank holds in the same order; each rank takes part only
in those it sends or receives, in that order, so two ranks always meet at the same transfer.
"""

from __future__ import annotations

import errno
import mmap
import os
import stat
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import xxhash

from dcp_plugin.errors import CheckpointCorruptError
from dcp_plugin.storage.integrity import ALGORITHM

CHUNK = 32 * 2**20
"""Bytes per message (a multiple of the page size); two are in flight at each end."""
_BLOCK = 4096


@dataclass(frozen=True)
class Transfer:
    """One file from the leader of one node to the leader of another."""

    source: int
    """The rank that sends it."""
    target: int
    """The rank that receives it."""
    name: str
    """The file's name in the checkpoint."""
    size: int
    """Its committed size in bytes."""
    part: int = 0
    """Which copy it belongs to at the receiver (peer replicas: the part it is a file of)."""


class Buffers:
    """Two page-aligned chunks a rank sends from or receives into (reused for every file of a round)."""

    def __init__(self) -> None:
        self._maps = [mmap.mmap(-1, CHUNK) for _ in range(2)]
        self.tensors = [torch.frombuffer(memory, dtype=torch.uint8) for memory in self._maps]

    def view(self, slot: int, length: int) -> memoryview:
        return memoryview(self._maps[slot])[:length]

    def close(self) -> None:
        self.tensors.clear()
        for memory in self._maps:
            try:
                memory.close()
            except BufferError:  # a tensor still views it: the garbage collector frees it
                pass


def send_file(path: str, size: int, target: int, group: Any, buffers: Buffers) -> None:
    """Send ``size`` bytes of the regular file at ``path`` to rank ``target``. If the file cannot be read, zeros
    take the place of what is missing (the receiver then finds the checksum wrong) and the error is raised once
    everything was sent: the receiver never waits for bytes that will not come."""
    works: list[Any] = [None, None]
    failure: BaseException | None = None
    fd = -1
    try:
        fd = _open_read(path)
    except OSError as err:
        failure = err
    try:
        offset, index = 0, 0
        while offset < size:
            slot = index % 2
            if works[slot] is not None:
                works[slot].wait()
            count = min(CHUNK, size - offset)
            if failure is None:
                try:
                    _read_at(fd, buffers.view(slot, _rounded(count)), offset, count, path)
                except (OSError, CheckpointCorruptError) as err:
                    failure = err
            if failure is not None:
                buffers.tensors[slot][:count].zero_()
            works[slot] = dist.isend(buffers.tensors[slot][:count], target, group=group)
            offset, index = offset + count, index + 1
        for work in works:
            if work is not None:
                work.wait()
    finally:
        if fd >= 0:
            os.close(fd)
    if failure is not None:
        raise failure


def receive_file(
    path: str, record: dict[str, Any], source: int, group: Any, buffers: Buffers, *, durable: bool
) -> None:
    """Receive a file from rank ``source`` into ``path`` (created), checking it against its committed ``record``
    (``size`` and checksum); ``durable``: written past the page cache where the filesystem allows, and fsynced. A
    file that cannot be written or does not match is removed and an error raised, after every byte was received
    (the sender never waits for a receiver that gave up)."""
    size = int(record["size"])
    hasher = xxhash.xxh3_128()
    count = -(-size // CHUNK)
    works: list[Any] = []
    failure: BaseException | None = None
    files: tuple[int, int] = (-1, -1)
    try:
        files = _open_write(path, direct=durable)
    except OSError as err:
        failure = err
    for index in range(min(2, count)):
        works.append(dist.irecv(buffers.tensors[index][: _length(index, size)], source, group=group))
    for index in range(count):
        slot = index % 2
        works[slot].wait()
        if failure is None:
            length = _length(index, size)
            view = buffers.view(slot, length)
            hasher.update(view)
            try:
                _write_at(files, view, index * CHUNK)
            except OSError as err:
                failure = err
        if index + 2 < count:
            works[slot] = dist.irecv(buffers.tensors[slot][: _length(index + 2, size)], source, group=group)
    buffered, direct = files
    if buffered >= 0:
        try:
            if durable and failure is None:
                os.fsync(buffered)
        except OSError as err:
            failure = err
        for fd in {buffered, direct} - {-1}:
            os.close(fd)
    if failure is None and hasher.hexdigest() != record[ALGORITHM]:
        failure = CheckpointCorruptError(f"{os.path.basename(path)} did not arrive as committed (its checksum differs)")
    if failure is not None:
        if buffered >= 0:
            try:
                os.unlink(path)
            except OSError:
                pass
        raise failure


def run_transfers(
    transfers: Iterable[Transfer],
    rank: int,
    group: Any,
    *,
    source_path: Callable[[Transfer], str],
    receive: Callable[[Transfer, Buffers], None],
) -> None:
    """Take part in the transfers this rank sends or receives, in the order given (the same on every rank).
    ``source_path`` says where a file this rank sends is; ``receive`` receives one (with :func:`receive_file`).
    A failed transfer does not stop the later ones (the other ranks wait for them); the first error is raised
    at the end."""
    failure: BaseException | None = None
    mine = [t for t in transfers if rank in (t.source, t.target)]
    if not mine:
        return
    buffers = Buffers()
    try:
        for transfer in mine:
            try:
                if transfer.target == rank:
                    receive(transfer, buffers)  # a file of no bytes: nothing travels, the receiver creates it
                elif transfer.size > 0:
                    send_file(source_path(transfer), transfer.size, transfer.target, group, buffers)
            except Exception as err:  # noqa: BLE001 - raised once every transfer is done
                failure = failure or err
    finally:
        buffers.close()
    if failure is not None:
        raise failure


def _length(index: int, size: int) -> int:
    return min(CHUNK, size - index * CHUNK)


def _rounded(count: int) -> int:
    return -(-count // _BLOCK) * _BLOCK


def _open_read(path: str) -> int:
    """A regular file opened for reading without following links or blocking, with ``O_DIRECT`` where the
    filesystem allows it."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK
    try:
        fd = os.open(path, flags | getattr(os, "O_DIRECT", 0))
    except OSError as err:
        if err.errno != errno.EINVAL:
            raise
        fd = os.open(path, flags)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(errno.EINVAL, f"{path} is not a regular file")
    return fd


def _read_at(fd: int, view: memoryview, offset: int, count: int, path: str) -> None:
    """Read ``count`` bytes at ``offset`` into ``view`` (whose length is ``count`` rounded up to a block)."""
    done = 0
    while done < count:
        got = os.preadv(fd, [view[done:]], offset + done)
        if got <= 0:
            raise CheckpointCorruptError(f"{path} ended early while it was sent")
        done += got


def _open_write(path: str, *, direct: bool) -> tuple[int, int]:
    """``path`` created for writing: a descriptor through the page cache, and one with ``O_DIRECT`` (or -1)."""
    buffered = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    if not direct or not hasattr(os, "O_DIRECT"):
        return buffered, -1
    try:
        return buffered, os.open(path, os.O_WRONLY | os.O_NOFOLLOW | os.O_DIRECT)
    except OSError:  # tmpfs and others without O_DIRECT: through the page cache
        return buffered, -1


def _write_at(files: tuple[int, int], view: memoryview, offset: int) -> None:
    """Write ``view`` at ``offset``: its whole blocks past the page cache when possible, the rest through it."""
    buffered, direct = files
    aligned = len(view) // _BLOCK * _BLOCK if direct >= 0 else 0
    done = 0
    while done < aligned:
        done += os.pwrite(direct, view[done:aligned], offset + done)
    while done < len(view):
        done += os.pwrite(buffered, view[done:], offset + done)


__all__ = ["CHUNK", "Buffers", "Transfer", "receive_file", "run_transfers", "send_file"]
