"""Where every tensor of a rank goes in saves that repeat one structure: the files, each record's place in them,
and the buffers the files are written from.

Each file is DCP's layout (one ``torch.save`` record per tensor, without crc32; see
:mod:`dcp_plugin.storage.records`), laid out once. The file is then a row of *segments* that tile it:

* **image** segments: page-aligned buffers that hold the records' heads and tails from the start (the framing
  of a record depends only on its dtype and shape) and into which each save copies the tensors' bytes, all at
  once (``torch._foreach_copy_`` into views of the buffers). Written with one ``pwrite`` each (``O_DIRECT``
  where the filesystem takes it) and hashed with one call each.
* **direct** segments (saves that write from the live tensors, ``sync`` mode): the block-aligned middle of a large
  contiguous tensor, written straight from its own memory; its record is placed so that file offset and memory
  address agree modulo the block size, and the few bytes before and after go through the images.

Plain values DCP stores as byte items (``optimizer.param_groups.0.lr``) vary in length from save to save; they go
after the last record of the last file, into spare room of its last image (which grows when needed).
"""

from __future__ import annotations

import mmap
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.distributed.checkpoint.filesystem import _StorageInfo

from dcp_plugin.storage.record_writer import DIRECT_FROM_MEMORY
from dcp_plugin.storage.records import frame_of

BLOCK = 4096
"""``O_DIRECT`` alignment of offsets, lengths and addresses (the largest logical block size in use)."""
RECORD_ALIGN = 64
"""Records start at multiples of this (their data then too: ``torch.save`` aligns data to 64 within a record)."""


@dataclass(frozen=True)
class Slot:
    """One tensor a rank writes: its ``Metadata`` index, its position among the save's sources, and, for a tensor
    written from its own memory, the address that memory starts at (``None``: copied into an image)."""

    index: Any
    source: int
    dtype: torch.dtype
    shape: tuple[int, ...]
    address: int | None = None

    @property
    def nbytes(self) -> int:
        count = 1
        for size in self.shape:
            count *= size
        return count * torch._utils._element_size(self.dtype)


@dataclass
class Image:
    """A page-aligned buffer that holds the bytes of ``[offset, offset + length)`` of a file."""

    offset: int
    length: int
    buffer: mmap.mmap
    tensor: torch.Tensor  # the buffer as uint8, for views

    @classmethod
    def allocate(cls, offset: int, length: int, capacity: int = 0) -> Image:
        size = _round_up(max(length, capacity, 1), BLOCK)
        buffer = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        _populate(buffer)
        return cls(offset, length, buffer, torch.frombuffer(buffer, dtype=torch.uint8))

    def view(self, start: int, nbytes: int, dtype: torch.dtype, shape: Sequence[int] | None = None) -> torch.Tensor:
        """The file's bytes ``[start, start + nbytes)`` as a tensor of ``dtype`` (and ``shape``) in this buffer."""
        at = start - self.offset
        flat = self.tensor[at : at + nbytes].view(dtype)
        return flat if shape is None else flat.view(tuple(shape))

    def put(self, start: int, data: bytes) -> None:
        at = start - self.offset
        self.buffer[at : at + len(data)] = data


@dataclass
class Direct:
    """Bytes ``[offset, offset + length)`` of a file written from source ``source``'s memory, from byte ``skip``."""

    offset: int
    length: int
    source: int
    skip: int


@dataclass
class FileLayout:
    """One file: its name, its segments in file order, where the tensor records end, and each record's entry."""

    name: str
    segments: list[Image | Direct] = field(default_factory=list)
    end: int = 0
    entries: dict[Any, _StorageInfo] = field(default_factory=dict)

    @property
    def last_image(self) -> Image:
        last = self.segments[-1]
        assert isinstance(last, Image)
        return last


@dataclass
class Copy:
    """Where a save copies a source's bytes: the whole source, or ``count`` elements of it from element ``first``
    (the edges of a tensor written from its own memory)."""

    source: int
    target: torch.Tensor
    first: int = 0
    count: int | None = None


class RankLayout:
    """The files one rank writes in saves of one structure (see the module docstring)."""

    def __init__(self, files: list[FileLayout], copies: list[Copy], sources: int) -> None:
        self.files = files
        self.copies = copies
        self.sources = sources
        """How many sources a save hands over (positions in :class:`Slot`)."""
        self.entries: dict[Any, _StorageInfo] = {}
        for file in files:
            self.entries.update(file.entries)

    @classmethod
    def build(cls, slots: Sequence[Slot], file_count: int, prefix: str, sources: int) -> RankLayout:
        """Lay ``slots`` out in ``file_count`` files named ``<prefix><n>.distcp`` (largest tensors spread first, as
        DCP spreads them), heads and tails written into the images."""
        buckets: list[list[Slot]] = [[] for _ in range(max(1, min(file_count, len(slots))))]
        sizes = [0] * len(buckets)
        for slot in sorted(slots, key=lambda s: s.nbytes, reverse=True) if len(buckets) > 1 else slots:
            smallest = sizes.index(min(sizes))
            buckets[smallest].append(slot)
            sizes[smallest] += slot.nbytes
        files, copies = [], []
        for number, bucket in enumerate(buckets):
            file, file_copies = _lay_out(f"{prefix}{number}.distcp", bucket)
            files.append(file)
            copies += file_copies
        return cls(files, copies, sources)

    def targets(self, sources: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """For one save: the image views to copy into and what to copy there (views of ``sources``)."""
        whole = [copy for copy in self.copies if copy.count is None]
        edges = [copy for copy in self.copies if copy.count is not None]
        targets = [copy.target for copy in whole] + [copy.target for copy in edges]
        values = [sources[copy.source] for copy in whole]
        values += [sources[c.source].reshape(-1)[c.first : c.first + c.count] for c in edges]  # type: ignore[operator]
        return targets, values

    def direct_sources(self) -> list[int]:
        """The sources written from their own memory (their addresses must not move between saves)."""
        return sorted(
            {segment.source for file in self.files for segment in file.segments if isinstance(segment, Direct)}
        )

    def place_bytes(self, values: Sequence[tuple[Any, bytes]]) -> dict[Any, _StorageInfo]:
        """Put this save's byte items after the last record of the last file; returns their entries."""
        file = self.files[-1]
        image = file.last_image
        start = _round_up(file.end, 8)
        needed = start + sum(len(data) for _, data in values) - image.offset
        if needed > len(image.buffer):
            self._grow(file, needed)
            image = file.last_image
        entries, at = {}, start
        for index, data in values:
            image.put(at, data)
            entries[index] = _StorageInfo(file.name, at, len(data))
            at += len(data)
        image.length = at - image.offset
        return entries

    def _grow(self, file: FileLayout, needed: int) -> None:
        old = file.last_image
        new = Image.allocate(old.offset, old.length, capacity=2 * needed)
        new.buffer[: len(old.buffer)] = old.buffer[:]
        file.segments[-1] = new
        for copy in self.copies:  # views into the old buffer move to the new one
            storage = copy.target.untyped_storage().data_ptr()
            if storage == old.tensor.untyped_storage().data_ptr():
                offset = copy.target.data_ptr() - storage
                nbytes = copy.target.numel() * copy.target.element_size()
                copy.target = new.view(old.offset + offset, nbytes, copy.target.dtype, tuple(copy.target.shape))


def _lay_out(name: str, slots: Sequence[Slot]) -> tuple[FileLayout, list[Copy]]:
    file = FileLayout(name)
    pieces: list[tuple[int, bytes]] = []  # (file offset, head or tail bytes)
    staged: list[tuple[Slot, int]] = []  # (slot, data offset) copied whole into an image
    edges: list[tuple[Slot, int, int, int]] = []  # (slot, data offset, lead bytes, body bytes) of direct ones
    image_start, position = 0, 0
    for slot in slots:
        head, tail = frame_of(slot.dtype, slot.shape)
        nbytes = slot.nbytes
        if slot.address is not None and nbytes >= DIRECT_FROM_MEMORY:
            data = position + len(head)
            data += (slot.address - data) % BLOCK
            lead = (-slot.address) % BLOCK
            body = (nbytes - lead) // BLOCK * BLOCK
            file.segments.append(Image(image_start, data + lead - image_start, None, None))  # type: ignore[arg-type]
            file.segments.append(Direct(data + lead, body, slot.source, lead))
            image_start = data + lead + body
            edges.append((slot, data, lead, body))
        else:
            data = _round_up(position, RECORD_ALIGN) + len(head)
            staged.append((slot, data))
        start = data - len(head)
        pieces += [(start, head), (data + nbytes, tail)]
        position = data + nbytes + len(tail)
        file.entries[slot.index] = _StorageInfo(name, start, position - start)
    file.end = position
    file.segments.append(Image(image_start, position - image_start, None, None))  # type: ignore[arg-type]
    file.segments = [
        Image.allocate(s.offset, s.length) if isinstance(s, Image) else s
        for s in file.segments
        if not (isinstance(s, Image) and s.length == 0 and s is not file.segments[-1])
    ]
    images = [s for s in file.segments if isinstance(s, Image)]

    def image_at(offset: int) -> Image:
        return next(i for i in images if i.offset <= offset <= i.offset + i.length)

    for offset, data in pieces:
        if data:
            image_at(offset).put(offset, data)
    copies = [
        Copy(slot.source, image_at(data).view(data, slot.nbytes, slot.dtype, slot.shape))
        for slot, data in staged
        if slot.nbytes  # an empty tensor has nothing to copy (and its record does not align data)
    ]
    for slot, data, lead, body in edges:
        size = torch._utils._element_size(slot.dtype)
        if lead:
            copies.append(Copy(slot.source, image_at(data).view(data, lead, slot.dtype), 0, lead // size))
        trail = slot.nbytes - lead - body
        if trail:
            at = data + lead + body
            copies.append(
                Copy(slot.source, image_at(at).view(at, trail, slot.dtype), (lead + body) // size, trail // size)
            )
    return file, copies


_MADV_POPULATE_WRITE = 23  # Linux 5.14+; Python 3.11's mmap module has no name for it


def _populate(buffer: mmap.mmap) -> None:
    """Fault the buffer's pages in now (when it is laid out, off the save that first copies into it)."""
    try:
        buffer.madvise(_MADV_POPULATE_WRITE)
    except (OSError, ValueError, AttributeError):
        for start in range(0, len(buffer), mmap.PAGESIZE):
            buffer[start] = 0


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


__all__ = ["BLOCK", "Copy", "Direct", "FileLayout", "Image", "RankLayout", "Slot"]
