"""Where a tensor's bytes lie inside its record, so that a reader can put them straight into the destination.

DCP stores every tensor as a ``torch.save`` zip record, and ``torch.load`` of that record allocates a tensor and
copies the bytes into it. For a contiguous tensor of a given dtype and shape, everything in the record but the
tensor's bytes is fixed: the record is a *head* (zip headers, ``data.pkl`` describing the tensor, alignment
padding), the bytes, and a *tail* (the end records). PyTorch's own zip writer produces both for us, with the data
skipped (:func:`torch.serialization.skip_data`), once per dtype and shape.

A stored record is read straight into its destination only where its head is byte for byte what PyTorch writes for
that dtype and shape and its tail agrees too (so ``torch.load`` of the record would give exactly that tensor, made
of exactly those bytes). Two writers' records are recognised: dcp-plugin's, written without crc32 fields, and
``torch.save``'s defaults (``dcp.save``, earlier dcp-plugin releases), where the crc32 fields and the
serialization id that depend on the data are left out of the comparison. Anything else (another torch version's
layout, strides, ``requires_grad``, a forged header) is read by ``torch.load`` as before.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch

from dcp_plugin.storage.records import frame_record, storage_alignment

_KEPT = 1024
_CACHE: OrderedDict[tuple[Any, ...], RecordLayout] = OrderedDict()
_LOCK = threading.Lock()

_DESCRIPTOR = b"PK\x07\x08"  # a zip data descriptor: crc32 at +4
_CENTRAL = b"PK\x01\x02"  # a central directory entry: crc32 at +16
_SERIALIZATION_ID = b".data/serialization_id"


@dataclass(frozen=True)
class RecordLayout:
    """The fixed parts of the record of a contiguous tensor of one dtype and shape."""

    head: bytes
    """The bytes before the tensor's data, as dcp-plugin writes them (no crc32)."""
    head_crc: bytes
    """The same as ``torch.save`` writes them by default (with crc32 of the small entries)."""
    tail: bytes
    """The bytes after the data, without crc32."""
    tail_kept: tuple[tuple[int, int], ...]
    """The ranges of the tail that do not depend on the data when crc32 fields are written."""
    nbytes: int
    """The tensor's bytes."""

    @property
    def length(self) -> int:
        """The whole record's length."""
        return len(self.head) + self.nbytes + len(self.tail)

    def matches(self, head: bytes, tail: bytes) -> bool:
        """Whether a stored record with this ``head`` and ``tail`` holds such a tensor, its bytes between them."""
        if head == self.head:
            return tail == self.tail
        if head != self.head_crc or len(tail) != len(self.tail):
            return False
        expected = self.tail
        return all(tail[start:end] == expected[start:end] for start, end in self.tail_kept)


def layout_of(dtype: torch.dtype, shape: tuple[int, ...], alignment: int | None = None) -> RecordLayout:
    """The record layout of a contiguous CPU tensor of ``dtype`` and ``shape`` (cached), for ``torch.save``'s
    ``alignment`` (default: the current one)."""
    key = (dtype, shape, storage_alignment() if alignment is None else alignment)
    with _LOCK:
        found = _CACHE.get(key)
        if found is not None:
            _CACHE.move_to_end(key)
            return found
    # empty() only reserves address space: the zip writer skips the data and never touches it
    tensor = torch.empty(shape, dtype=dtype)
    head, tail = frame_record(tensor)
    head_crc, _ = frame_record(tensor, crc32=True)
    found = RecordLayout(head, head_crc, tail, _kept(tail), tensor.numel() * tensor.element_size())
    with _LOCK:
        _CACHE[key] = found
        if len(_CACHE) > _KEPT:
            _CACHE.popitem(last=False)
    return found


def _kept(tail: bytes) -> tuple[tuple[int, int], ...]:
    """The ranges of ``tail`` outside its crc32 fields and the serialization id (which ``torch.save`` derives
    from the crc32 of the data)."""
    skipped: list[tuple[int, int]] = []
    for signature, at in ((_DESCRIPTOR, 4), (_CENTRAL, 16)):
        found = tail.find(signature)
        while found >= 0:
            skipped.append((found + at, found + at + 4))
            found = tail.find(signature, found + 1)
    name = tail.find(_SERIALIZATION_ID)
    if name >= 0:
        header = tail.rfind(b"PK\x03\x04", 0, name)
        extra = int.from_bytes(tail[header + 28 : header + 30], "little")
        start = name + len(_SERIALIZATION_ID) + extra
        end = tail.find(_DESCRIPTOR, start)
        skipped.append((start, end if end >= 0 else len(tail)))
    kept, position = [], 0
    for start, end in sorted(skipped):
        if start > position:
            kept.append((position, start))
        position = max(position, end)
    if position < len(tail):
        kept.append((position, len(tail)))
    return tuple(kept)


__all__ = ["RecordLayout", "layout_of", "storage_alignment"]
