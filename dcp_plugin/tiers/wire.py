"""Files sent from one node to another over a gloo process group (no shared filesystem).

A file travels as consecutive chunks of at most :data:`CHUNK` bytes (its size is known to both ends in advance,
from the manifest). Both ends keep two chunks in flight, so the sender reads the next chunk from its disk while
the previous one is on the wire and the receiver writes one while the next arrives. The receiver hashes what it
writes and compares it with the committed checksum: a file that does not arrive as committed is never kept.

:func:`run_transfers` runs a list of transfers that every rank holds in the same order; each rank takes part only
in those it sends or receives, in that order, so two ranks always meet at the same transfer.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import xxhash

from dcp_plugin.errors import CheckpointCorruptError
from dcp_plugin.storage.integrity import ALGORITHM
from dcp_plugin.storage.safe_io import open_local_regular

CHUNK = 32 * 2**20
"""Bytes per message; two are in flight at each end."""


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


def send_file(path: str, size: int, target: int, group: Any) -> None:
    """Send ``size`` bytes of the regular file at ``path`` to rank ``target``. If the file cannot be read, zeros
    take the place of what is missing (the receiver then finds the checksum wrong) and the error is raised once
    everything was sent: the receiver never waits for bytes that will not come."""
    buffers = [torch.zeros(min(CHUNK, size), dtype=torch.uint8) for _ in range(2 if size > CHUNK else 1)]
    works: list[Any] = [None] * len(buffers)
    failure: BaseException | None = None
    handle = None
    try:
        handle = open_local_regular(path)
    except OSError as err:
        failure = err
    try:
        offset, index = 0, 0
        while offset < size:
            slot = index % len(buffers)
            if works[slot] is not None:
                works[slot].wait()
            count = min(CHUNK, size - offset)
            chunk = buffers[slot][:count]
            if failure is None:
                try:
                    _read_into(handle, memoryview(chunk.numpy()), path)
                except (OSError, CheckpointCorruptError) as err:
                    failure = err
            if failure is not None:
                chunk.zero_()
            works[slot] = dist.isend(chunk, target, group=group)
            offset, index = offset + count, index + 1
        for work in works:
            if work is not None:
                work.wait()
    finally:
        if handle is not None:
            handle.close()
    if failure is not None:
        raise failure


def receive_file(path: str, record: dict[str, Any], source: int, group: Any, *, durable: bool) -> None:
    """Receive a file from rank ``source`` into ``path`` (created), checking it against its committed ``record``
    (``size`` and checksum); ``durable``: fsync it. A file that cannot be written or does not match is removed and
    an error raised, after every byte was received (the sender never waits for a receiver that gave up)."""
    size = int(record["size"])
    hasher = xxhash.xxh3_128()
    count = -(-size // CHUNK)
    buffers = [torch.empty(min(CHUNK, size), dtype=torch.uint8) for _ in range(min(2, count))]
    works: list[Any] = []
    failure: BaseException | None = None
    fd = -1
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    except OSError as err:
        failure = err
    for index in range(min(2, count)):
        works.append(dist.irecv(buffers[index][: _length(index, size)], source, group=group))
    for index in range(count):
        slot = index % len(buffers)
        works[slot].wait()
        if failure is None:
            view = memoryview(buffers[slot][: _length(index, size)].numpy())
            hasher.update(view)
            try:
                _write_all(fd, view)
            except OSError as err:
                failure = err
        if index + 2 < count:
            works[slot] = dist.irecv(buffers[slot][: _length(index + 2, size)], source, group=group)
    if fd >= 0:
        try:
            if durable and failure is None:
                os.fsync(fd)
        except OSError as err:
            failure = err
        os.close(fd)
    if failure is None and hasher.hexdigest() != record[ALGORITHM]:
        failure = CheckpointCorruptError(f"{os.path.basename(path)} did not arrive as committed (its checksum differs)")
    if failure is not None:
        if fd >= 0:
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
    receive: Callable[[Transfer], None],
) -> None:
    """Take part in the transfers this rank sends or receives, in the order given (the same on every rank).
    ``source_path`` says where a file this rank sends is; ``receive`` receives one (with :func:`receive_file`).
    A failed transfer does not stop the later ones (the other ranks wait for them); the first error is raised
    at the end."""
    failure: BaseException | None = None
    for transfer in transfers:
        if rank not in (transfer.source, transfer.target):
            continue
        try:
            if transfer.target == rank:
                receive(transfer)  # a file of no bytes: nothing travels, the receiver creates it
            elif transfer.size > 0:
                send_file(source_path(transfer), transfer.size, transfer.target, group)
        except Exception as err:  # noqa: BLE001 - raised once every transfer is done
            failure = failure or err
    if failure is not None:
        raise failure


def _length(index: int, size: int) -> int:
    return min(CHUNK, size - index * CHUNK)


def _read_into(handle: Any, view: memoryview, path: str) -> None:
    done = 0
    while done < len(view):
        got = handle.readinto(view[done:])
        if not got:
            raise CheckpointCorruptError(f"{path} ended early while it was sent")
        done += got


def _write_all(fd: int, view: memoryview) -> None:
    done = 0
    while done < len(view):
        done += os.write(fd, view[done:])


__all__ = ["CHUNK", "Transfer", "receive_file", "run_transfers", "send_file"]
