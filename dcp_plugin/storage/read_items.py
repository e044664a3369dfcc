"""What the verifying readers hand on, item by item: plain values checked before DCP unpickles them, tensors
of records checked against their chunk, placeholders a load may fill or replace, and a pass that reads every item
of a checkpoint (``adopt``)."""

from __future__ import annotations

import io
from typing import Any

import torch
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, ReadItem

from dcp_plugin.errors import CheckpointCorruptError, UnsafeCheckpointError
from dcp_plugin.storage.read_io import span


def check_plain_value(data: bytes, shown: str, fqn: str) -> None:
    """DCP's planners unpickle byte items with ``torch.load(weights_only=False)``: hand them only bytes that
    ``weights_only=True`` reads (plain values, no code to run); raise :class:`UnsafeCheckpointError` otherwise."""
    try:
        torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any refusal or damage: the value is not handed on
        raise UnsafeCheckpointError(
            f"Checkpoint {shown}: the value {fqn!r} is not plain data that loads without running code "
            f"({type(err).__name__}: {str(err).splitlines()[0][:200]}); refusing to read it. If you trust this "
            "checkpoint, read it with torch.distributed.checkpoint directly."
        ) from None


def read_every_item(reader: Any, metadata: Metadata) -> None:
    """Read every record ``metadata`` names through ``reader`` and let go of it: what a load would refuse (a
    value that is not plain data, a record that is no tensor or not of its chunk's shape, a checksum mismatch)
    raises here. One record is in memory at a time."""
    items = []
    for index, _info in sorted((metadata.storage_data or {}).items(), key=lambda pair: span(pair[1])):
        stored = (metadata.state_dict_metadata or {}).get(index.fqn)
        if isinstance(stored, TensorStorageMetadata):
            chunk = next((c for c in stored.chunks if tuple(c.offsets) == tuple(index.offset or ())), None)
            if chunk is None:
                raise CheckpointCorruptError(f"{index.fqn} at {tuple(index.offset or ())} is no chunk of its tensor.")
            zeros = torch.Size([0] * len(chunk.sizes))
            items.append(ReadItem(LoadItemType.TENSOR, index, zeros, index, zeros, torch.Size(chunk.sizes)))
        else:
            items.append(ReadItem(LoadItemType.BYTE_IO, index, torch.Size(()), index, torch.Size(()), torch.Size(())))
    reader.set_up_storage_reader(metadata, True)
    reader.read_data(LoadPlan(items), _Discard())


class _Discard:
    """A load planner that takes every item as read and keeps nothing (see :func:`read_every_item`)."""

    def take_tensor(self, item: Any, tensor: torch.Tensor) -> bool:
        return True

    def resolve_tensor(self, item: Any) -> torch.Tensor:
        return torch.empty(item.lengths, device="meta")  # only its size is looked at: it differs from the record's

    def load_bytes(self, item: Any, value: Any) -> None:
        pass

    def commit_tensor(self, item: Any, tensor: torch.Tensor) -> None:
        pass


_PLACEHOLDER = "_dcp_plugin_placeholder"


def placeholder(size: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An empty tensor to load into that the reader may replace by the tensor it read instead of copying into
    it (for loads without a live tensor, such as Lightning's checkpoint dict). Its memory is never touched."""
    tensor = torch.empty(size, dtype=dtype)
    setattr(tensor, _PLACEHOLDER, True)
    return tensor


def takes_over(target: torch.Tensor, loaded: torch.Tensor) -> bool:
    """Whether ``target`` is a whole placeholder and ``loaded`` owns exactly its own bytes (a view into a larger
    stored storage would keep all of it alive)."""
    return (
        getattr(target, _PLACEHOLDER, False)
        and loaded.dtype == target.dtype
        and loaded.is_contiguous()
        and loaded.storage_offset() == 0
        and loaded.untyped_storage().nbytes() == loaded.numel() * loaded.element_size()
    )


def mark_placeholder(tensor: torch.Tensor) -> torch.Tensor:
    """Mark ``tensor`` (made for a load, holding nothing yet) as a placeholder; returns it."""
    setattr(tensor, _PLACEHOLDER, True)
    return tensor


def is_placeholder(tensor: Any) -> bool:
    """Whether ``tensor`` is a placeholder made by :func:`placeholder` and not filled yet."""
    return bool(getattr(tensor, _PLACEHOLDER, False))


def filled(tensor: torch.Tensor) -> None:
    """Mark a placeholder as filled: from now on it is an ordinary tensor (its marker is not handed out)."""
    if getattr(tensor, _PLACEHOLDER, False):
        delattr(tensor, _PLACEHOLDER)


__all__ = [
    "check_plain_value",
    "filled",
    "is_placeholder",
    "mark_placeholder",
    "placeholder",
    "read_every_item",
    "takes_over",
]
