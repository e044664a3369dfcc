"""Which tensors of a load can be read straight from their records into their destinations, in bulk.

DCP's reader runs ``torch.load`` on every stored record (a zip archive, its pickle, a fresh tensor) and copies the
result into the destination: tens of microseconds of Python per tensor before a byte moves. :func:`plan` matches
every name of a load against its stored record once, and groups the records it takes by file, for
:mod:`~dcp_plugin.storage.direct_load` to read each file front to back.

Taken: plain (non-subclass) contiguous CPU destinations of the stored dtype and shape, whose tensor is stored whole
in one record without stream transforms and whose record has the length PyTorch's layout gives
(:mod:`~dcp_plugin.storage.record_layout`), in memory no other destination of the load shares (names stored once
for several and loaded into one tensor, or copied into the others, are fine). Left to DCP's reader: DTensors and
resharded chunks, dtype casts, non-contiguous, conjugate or overlapping destinations, other devices, empty
tensors, compressed records, byte items.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata

from dcp_plugin.storage.read_items import is_placeholder
from dcp_plugin.storage.record_layout import RecordLayout, layout_of, storage_alignment

_PLAIN_TYPES = (torch.Tensor, torch.nn.Parameter)


@dataclass
class Record:
    """One stored record read into ``dest`` (and then copied into ``copies``) for the names in ``keys``."""

    offset: int
    length: int
    layout: RecordLayout
    dest: torch.Tensor
    keys: list[str]
    copies: list[torch.Tensor] = field(default_factory=list)
    head: bytes = b""
    tail: bytes = b""

    @property
    def live(self) -> bool:
        """Whether it is read into a live tensor (not only into placeholders made for the load): such a tensor is
        left untouched by a load that fails on a damaged file, so it is written once its file verified."""
        return not (is_placeholder(self.dest) and all(is_placeholder(copy) for copy in self.copies))

    def set_head(self, data: bytes) -> None:
        self.head = data

    def set_tail(self, data: bytes) -> None:
        self.tail = data


@dataclass
class Planned:
    """What :func:`plan` found: records to read per file, and every name left to DCP's reader."""

    files: dict[str, list[Record]] = field(default_factory=dict)
    rest: dict[str, Any] = field(default_factory=dict)

    def give_back(self, relative: str, records: list[Record], flat: Mapping[str, Any]) -> None:
        """Leave ``records`` of file ``relative`` to DCP's reader after all."""
        for record in records:
            for key in record.keys:
                self.rest[key] = flat[key]


def plan(flat: Mapping[str, Any], metadata: Metadata) -> Planned:
    """Which names of ``flat`` (checkpoint key -> destination tensor) this module reads, grouped by file."""
    planned = Planned()
    stored_items = metadata.state_dict_metadata or {}
    storage = {index.fqn: info for index, info in (metadata.storage_data or {}).items() if not any(index.offset or ())}
    spans: dict[tuple[str, int, int], Record] = {}
    layouts: dict[tuple[Any, ...], RecordLayout] = {}
    alignment = storage_alignment()
    for key, dest in flat.items():
        info = storage.get(key)
        layout = _layout_for(dest, stored_items.get(key), info, layouts, alignment)
        if layout is None or info is None:
            planned.rest[key] = dest
            continue
        span = (str(info.relative_path), int(info.offset), layout.length)
        known = spans.get(span)
        if known is None:
            spans[span] = Record(span[1], span[2], layout, dest, [key])
        elif known.layout is not layout:
            planned.rest[key] = dest
        else:
            known.keys.append(key)
            if not _same_memory(known.dest, dest):
                known.copies.append(dest)
    records = _disjoint(list(spans.items()), planned.rest, flat)
    for (relative, _offset, _length), record in sorted(records, key=lambda pair: pair[0]):
        planned.files.setdefault(relative, []).append(record)
    return planned


def _layout_for(dest: Any, stored: Any, info: Any, layouts: dict[Any, Any], alignment: int) -> RecordLayout | None:
    """The layout of the record ``dest`` is read from, where this module can read it."""
    if type(stored) is not TensorStorageMetadata or info is None or type(dest) not in _PLAIN_TYPES:
        return None
    chunks = stored.chunks
    if len(chunks) != 1 or getattr(info, "transform_descriptors", None):
        return None
    size = stored.size
    dtype = dest.dtype
    if (
        dtype != stored.properties.dtype
        or dest.shape != size
        or chunks[0].sizes != size
        or not dest.is_cpu
        or not dest.is_contiguous()
        or dest.is_conj()
        or dest.is_neg()
        or dest.numel() == 0
    ):
        return None
    key = (dtype, tuple(size))
    layout = layouts.get(key)
    if layout is None:
        layout = layouts[key] = layout_of(dtype, key[1], alignment)
    return layout if int(info.length) == layout.length else None


def _same_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.data_ptr() == b.data_ptr() and a.numel() * a.element_size() == b.numel() * b.element_size()


def _disjoint(
    records: list[tuple[tuple[str, int, int], Record]], rest: dict[str, Any], flat: Mapping[str, Any]
) -> list[tuple[tuple[str, int, int], Record]]:
    """The records whose destinations (and copies) share memory with no other's; the others go to ``rest``."""
    ranges = []
    for position, (_span, record) in enumerate(records):
        for tensor in (record.dest, *record.copies):
            start = tensor.data_ptr()
            ranges.append((start, start + tensor.numel() * tensor.element_size(), position))
    ranges.sort()
    clashing: set[int] = set()
    reach, owner = -1, -1
    for start, end, position in ranges:
        if start < reach:
            clashing.update((position, owner))
        if end > reach:
            reach, owner = end, position
    kept = []
    for position, pair in enumerate(records):
        if position in clashing:
            for key in pair[1].keys:
                rest[key] = flat[key]
        else:
            kept.append(pair)
    return kept


__all__ = ["Planned", "Record", "plan"]
