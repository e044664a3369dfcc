"""The bytes of one tensor record, as ``torch.save(tensor, stream)`` writes it, without its crc32 fields.

DCP's ``FileSystemWriter`` stores every tensor as a ``torch.save`` zip record, and its reader (``dcp.load``,
``dcp_to_torch_save``) runs ``torch.load`` on the byte range of each item. ``torch.save`` computes a crc32 over
every byte (half of the writer's CPU), and ``torch.load`` never checks it (PyTorch builds miniz with
``MINIZ_DISABLE_ZIP_READER_CRC32_CHECKS``); every byte we write is hashed with xxh3-128 anyway. The switch
PyTorch offers is process-wide (``torch.utils.serialization.config.save.compute_crc32``), and user code may call
``torch.save`` while a background save runs, so it is never touched here.

Instead, PyTorch's own zip writer (``torch._C.PyTorchFileWriter``, crc32 off) frames the record with the storage
bytes skipped (``torch.serialization.skip_data``, which is thread-local): what comes out is the record's head (zip
headers, ``data.pkl``, the padding that aligns the data) and its tail (the end records), and the tensor's memory
goes between them as it is, with no copy and no per-chunk Python work. The layout is byte for byte
``torch.save``'s with ``compute_crc32=False``.
"""

from __future__ import annotations

import ctypes
import pickle
import threading
from collections import OrderedDict
from typing import Any

import torch
from torch.serialization import DEFAULT_PROTOCOL, _get_storage_alignment, _save, skip_data

_FRAMES: OrderedDict[tuple[Any, ...], tuple[bytes, bytes]] = OrderedDict()
_FRAMES_LOCK = threading.Lock()
_FRAMES_KEPT = 4096


class _Framing:
    """Collects what the zip writer writes; the skipped storage bytes become a hole at ``hole``."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.position = 0
        self.hole: int | None = None

    def write(self, data: Any) -> int:
        chunk = bytes(data)
        self.parts.append(chunk)
        self.position += len(chunk)
        return len(chunk)

    def seek(self, offset: int, whence: int = 0) -> int:
        if whence != 1 or self.hole is not None:
            raise RuntimeError("unexpected seek while framing a tensor record")
        self.hole = len(self.parts)
        self.position += offset
        return self.position

    def tell(self) -> int:
        return self.position

    def flush(self) -> None:
        pass


def frame_record(tensor: torch.Tensor, *, crc32: bool = False) -> tuple[bytes, bytes]:
    """(head, tail) of the record ``torch.save`` writes for ``tensor``, its data left out (computed, not cached;
    with ``crc32`` the head as written with checksums on)."""
    framing = _Framing()
    writer = torch._C.PyTorchFileWriter(framing, crc32, _get_storage_alignment())  # type: ignore[call-overload]
    with skip_data():
        _save(tensor, writer, pickle, DEFAULT_PROTOCOL, False)
    writer.write_end_of_file()
    del writer
    hole = len(framing.parts) if framing.hole is None else framing.hole
    return b"".join(framing.parts[:hole]), b"".join(framing.parts[hole:])


def _key(tensor: torch.Tensor, alignment: int) -> tuple[Any, ...]:
    """Everything the record's framing depends on (its pickle describes the tensor, not its values)."""
    metadata = torch._utils.get_tensor_metadata(tensor)
    return (
        tensor.dtype,
        tensor.shape,
        tensor.stride(),
        tensor.storage_offset(),
        tensor.untyped_storage().nbytes(),
        tensor.requires_grad,
        tuple(sorted(metadata.items())) if metadata else (),
        alignment,
    )


def storage_alignment() -> int:
    """``torch.save``'s storage alignment (its config is per thread and slow to read: ask once per file)."""
    return _get_storage_alignment()


def frame_of(dtype: torch.dtype, shape: tuple[int, ...]) -> tuple[bytes, bytes]:
    """(head, tail) of the record of a contiguous CPU tensor of ``dtype`` and ``shape`` whose storage holds exactly
    its elements: what frames such a tensor's bytes whatever their values."""
    return _framed(torch.empty(shape, dtype=dtype), storage_alignment())


def tensor_record(tensor: torch.Tensor, alignment: int | None = None) -> tuple[bytes, memoryview, bytes]:
    """(head, data, tail) of ``tensor``'s record: written in this order they are the record ``torch.save`` writes
    with ``compute_crc32=False``. ``data`` is the tensor's storage memory itself (keep ``tensor`` alive while it
    is used). ``tensor`` must be a CPU tensor whose storage holds nothing but its own elements, as DCP's writer
    hands them out (it clones views of larger storages). ``alignment``: :func:`storage_alignment`, if known."""
    if tensor.device.type != "cpu":
        raise ValueError(f"tensor_record needs a CPU tensor, got one on {tensor.device}")
    if type(tensor) is not torch.Tensor or tensor.__dict__:  # subclasses and attributes pickle their own way
        head, tail = frame_record(tensor)
        return head, _storage_view(tensor), tail
    head, tail = _framed(tensor, storage_alignment() if alignment is None else alignment)
    return head, _storage_view(tensor), tail


def _framed(tensor: torch.Tensor, alignment: int) -> tuple[bytes, bytes]:
    key = _key(tensor, alignment)
    with _FRAMES_LOCK:
        frames = _FRAMES.get(key)
        if frames is not None:
            _FRAMES.move_to_end(key)
    if frames is None:
        frames = frame_record(tensor)
        with _FRAMES_LOCK:
            _FRAMES[key] = frames
            if len(_FRAMES) > _FRAMES_KEPT:
                _FRAMES.popitem(last=False)
    return frames


def _storage_view(tensor: torch.Tensor) -> memoryview:
    storage = tensor.untyped_storage()
    size = storage.nbytes()
    if size == 0:
        return memoryview(b"")
    return memoryview((ctypes.c_char * size).from_address(storage.data_ptr())).cast("B")


__all__ = ["frame_of", "frame_record", "storage_alignment", "tensor_record"]
