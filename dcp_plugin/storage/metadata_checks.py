"""Checking DCP's ``.metadata`` against the files it names, item by item, before anything is allocated from it.

A forged ``.metadata`` can declare any size, and sums of sizes can be made to cancel (a negative dimension). So
every item is checked on its own:

* every data file is one plain name inside the checkpoint, and every record lies inside its file;
* on a local disk, the first byte of every record is stored: every DCP writer starts a record with a header, so a
  hole there is a file made to look large (``truncate -s 2T``). Holes *inside* a record are allowed: a tensor's
  zeros may be stored as holes (``rsync --sparse``, ``cp --sparse=always``, ZFS compression);
* every tensor: its dimensions are non-negative integers, each chunk lies inside it and has a record, and the
  chunk's bytes fit in that record (records without stream transforms, which may compress);
* for a load (``memory`` given): no tensor, chunk or stored value needs more bytes than this machine has memory
  (RAM and swap). Such a checkpoint cannot be read here; it is refused naming the file, not by the allocator.
"""

from __future__ import annotations

import errno
import functools
import math
import os
from collections.abc import Callable
from typing import Any

from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata

from dcp_plugin.errors import CheckpointCorruptError, UnsafeCheckpointError
from dcp_plugin.storage.names import is_safe_data_file

_SLACK = 2**20
"""Bytes the declared tensors may exceed the stored ones by in all (records of empty tensors, rounding)."""


@functools.cache
def memory_bytes() -> int:
    """RAM and swap of this machine: no single tensor or value larger than this can be read here."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("SwapTotal:"):
                    total += int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return total


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def check_records(
    metadata: Metadata, shown: str, size_of: Callable[[str], int], first_hole: Callable[[str, list[int]], int | None]
) -> int:
    """Every record's file is a plain name, and the record lies inside it with its first byte stored; returns the
    bytes all records hold. ``size_of(file)`` is its committed (or actual) size; ``first_hole(file, offsets)`` the
    first of ``offsets`` at which the file stores no data (``None``: all stored; remote files have no holes)."""
    sizes: dict[str, int] = {}
    starts: dict[str, list[int]] = {}
    stored = 0
    for index, info in (metadata.storage_data or {}).items():
        relative = getattr(info, "relative_path", None)
        if not is_safe_data_file(relative):
            raise UnsafeCheckpointError(
                f"{shown} points {getattr(index, 'fqn', index)} at {relative!r}, outside the checkpoint directory; "
                "refusing to read it."
            )
        relative = str(relative)
        raw_offset, raw_length = getattr(info, "offset", None), getattr(info, "length", None)
        if not (_is_count(raw_offset) and _is_count(raw_length)):
            raise CheckpointCorruptError(f"{shown} has an invalid offset or length for {relative}.")
        offset, length = int(raw_offset), int(raw_length)  # type: ignore[arg-type]
        if relative not in sizes:
            sizes[relative] = size_of(relative)
        if offset + length > sizes[relative]:
            raise CheckpointCorruptError(
                f"{shown} says {relative} holds bytes up to {offset + length}, but it has {sizes[relative]}."
            )
        if length:
            starts.setdefault(relative, []).append(offset)
        stored += length
    for relative, offsets in sorted(starts.items()):
        hole = first_hole(relative, sorted(set(offsets)))
        if hole is not None:
            raise CheckpointCorruptError(
                f"{shown} says a record of {relative} starts at byte {hole}, but the file stores nothing there (a "
                "hole: the file was made to look larger than what was written, e.g. with truncate); the metadata "
                "or the file is forged or damaged."
            )
    return stored


def check_items(metadata: Metadata, shown: str, stored: int, memory: int | None) -> None:
    """Each tensor's dimensions and chunks against its records, and (``memory``: for a load) what reading each
    tensor and value would allocate against this machine's memory."""
    storage = metadata.storage_data or {}
    if memory is not None:
        for index, info in storage.items():  # a record is read whole: a value, or the data of a tensor chunk
            if int(info.length) > memory:
                raise _too_large(shown, index.fqn, int(info.length), memory)
    records = _records_by_chunk(storage, shown)
    declared = 0
    for fqn, item in (metadata.state_dict_metadata or {}).items():
        if isinstance(item, TensorStorageMetadata):
            declared += _check_tensor(fqn, item, records if storage else None, shown, memory)
    if declared > stored + _SLACK:
        raise CheckpointCorruptError(
            f"{shown} declares {declared} bytes of tensors but its files hold only {stored}; "
            "the metadata is damaged or forged."
        )


def _records_by_chunk(storage: Any, shown: str) -> dict[tuple[Any, ...], Any]:
    """The records of tensor chunks by (name, offsets), looked up once per chunk below."""
    records = {}
    for index, info in storage.items():
        offset = getattr(index, "offset", None)
        if offset is None:
            continue
        try:
            records[(index.fqn, tuple(offset))] = info
        except (AttributeError, TypeError) as err:
            raise CheckpointCorruptError(f"{shown} has a malformed record ({type(err).__name__}: {err}).") from None
    return records


def _check_tensor(fqn: str, item: TensorStorageMetadata, records: Any, shown: str, memory: int | None) -> int:
    """The bytes of tensor ``fqn``'s chunks, each checked against its shape and its record (``records``: by name and
    offset; ``None`` where the metadata has no records at all)."""
    try:
        itemsize = int(item.properties.dtype.itemsize)
        size = [d for d in item.size]
    except (AttributeError, TypeError, ValueError) as err:
        raise CheckpointCorruptError(f"{shown} declares tensor {fqn} malformed ({err}).") from None
    if not all(_is_count(d) for d in size):
        raise CheckpointCorruptError(
            f"{shown} declares tensor {fqn} with shape {tuple(size)}: a dimension is not a non-negative integer; "
            "the metadata is damaged or forged."
        )
    whole = math.prod(size) * itemsize
    if memory is not None and whole > memory:
        raise _too_large(shown, fqn, whole, memory)
    total = 0
    for chunk in item.chunks or ():
        offsets, sizes = list(getattr(chunk, "offsets", ())), list(getattr(chunk, "sizes", ()))
        inside = (
            len(offsets) == len(sizes) == len(size)
            and all(_is_count(v) for v in offsets + sizes)
            and all(o + s <= d for o, s, d in zip(offsets, sizes, size))
        )
        if not inside:
            raise CheckpointCorruptError(
                f"{shown} declares a chunk of {fqn} at {tuple(offsets)} of shape {tuple(sizes)}, outside the tensor's "
                f"shape {tuple(size)}; the metadata is damaged or forged."
            )
        nbytes = math.prod(sizes) * itemsize
        info = records.get((fqn, tuple(offsets))) if records is not None else None
        if records is not None and info is None:
            raise CheckpointCorruptError(f"{shown} declares a chunk of {fqn} at {tuple(offsets)} that has no record.")
        if info is not None and not getattr(info, "transform_descriptors", None) and nbytes > int(info.length):
            raise CheckpointCorruptError(
                f"{shown} declares {nbytes} bytes for {fqn} at {tuple(offsets)}, but its record in "
                f"{info.relative_path} holds {info.length}; the metadata is damaged or forged."
            )
        total += nbytes
    return total


def _too_large(shown: str, fqn: str, nbytes: int, memory: int) -> CheckpointCorruptError:
    return CheckpointCorruptError(
        f"{shown} declares {fqn!r} of {nbytes} bytes, more than this machine's memory ({memory} bytes of RAM and "
        "swap): it cannot be read here. If the checkpoint is genuine, read it on a machine with more memory."
    )


def local_first_hole(path: str, offsets: list[int]) -> int | None:
    """The first of ``offsets`` (sorted, inside the file) at which the local file ``path`` stores no data, else
    ``None``."""
    from dcp_plugin.storage.safe_io import open_local_regular

    seek_data = getattr(os, "SEEK_DATA", None)
    if seek_data is None:
        return None
    with open_local_regular(path) as handle:
        fd = handle.fileno()
        size = os.fstat(fd).st_size  # a record past the end is a truncated file: the size checks report it
        data_until = -1  # offsets below this are known to be stored
        for offset in offsets:
            if offset >= size:
                break
            if offset < data_until:
                continue
            try:
                start = os.lseek(fd, offset, seek_data)
            except OSError as err:
                if err.errno == errno.ENXIO:  # nothing but a hole from here to the end
                    return offset
                return None  # the filesystem cannot tell: as without holes
            if start != offset:
                return offset
            data_until = os.lseek(fd, offset, os.SEEK_HOLE)
    return None


__all__ = ["check_items", "check_records", "local_first_hole", "memory_bytes"]
