"""The files an export writes: an output that appears whole or not at all, and safetensors written tensor by tensor.

safetensors is a little-endian u64 header length, a JSON header (every tensor's dtype, shape and byte range;
padded with spaces to 8 bytes) and then the tensors' bytes back to back. The header needs only shapes and dtypes,
which DCP's metadata holds, so it is written first and each tensor's bytes are appended as soon as the tensor is
read: nothing but the tensor at hand (and one conversion chunk) is in memory.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import struct
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import IO, Any

import torch

from dcp_plugin.errors import ConfigError

CHUNK_BYTES = 16 * 2**20
"""Tensors are converted and written in pieces of this many bytes (the output buffer)."""

_SAFETENSORS_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
}


def is_remote(target: str) -> bool:
    return "://" in target and not target.startswith("file://")


@contextlib.contextmanager
def open_output(
    target: str | os.PathLike[str], storage_options: Mapping[str, Any] | None = None
) -> Iterator[IO[bytes]]:
    """A binary file at ``target`` (a path or fsspec URL) that only appears, complete, when the block succeeds.

    Local files are written next to the target, synced and renamed over it; remote ones are committed on
    success and discarded on failure (fsspec's ``autocommit=False``), so a failed export never leaves a torn file
    and never replaces an earlier one."""
    text = os.fspath(target)
    if is_remote(text):
        from fsspec.core import url_to_fs

        fs, path = url_to_fs(text, **dict(storage_options or {}))
        handle = fs.open(path, "wb", autocommit=False)
        try:
            yield handle
        except BaseException:
            with contextlib.suppress(Exception):
                handle.close()
            handle.discard()
            raise
        handle.close()
        handle.commit()
        return
    local = text.removeprefix("file://")
    directory = os.path.dirname(os.path.abspath(local))
    os.makedirs(directory, exist_ok=True)
    partial = os.path.join(directory, f".{os.path.basename(local)}.{uuid.uuid4().hex[:8]}.partial")
    try:
        with open(partial, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(partial, local)
    finally:
        if os.path.exists(partial):
            os.remove(partial)


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of the output: its key there, its dtype in the output, and its shape."""

    key: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


class SafetensorsStream:
    """Writes a safetensors file to ``handle``: the header at construction, then :meth:`write` per tensor, in the
    order of ``specs``. :meth:`finish` checks every tensor was written."""

    def __init__(self, handle: IO[bytes], specs: Sequence[TensorSpec], metadata: Mapping[str, str]) -> None:
        header: dict[str, Any] = {"__metadata__": dict(metadata)}
        offset = 0
        for spec in specs:
            code = _SAFETENSORS_DTYPES.get(spec.dtype)
            if code is None:
                raise ConfigError(
                    f"Tensor {spec.key!r} has dtype {spec.dtype}, which safetensors cannot store; export it with "
                    "--format torch, or pick another --entry."
                )
            if spec.key in header:
                raise ConfigError(f"Two tensors would both be called {spec.key!r} in the safetensors file.")
            header[spec.key] = {
                "dtype": code,
                "shape": list(spec.shape),
                "data_offsets": [offset, offset + spec.nbytes],
            }
            offset += spec.nbytes
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)
        handle.write(struct.pack("<Q", len(text)))
        handle.write(text)
        self._handle = handle
        self._specs = list(specs)
        self._next = 0
        self.bytes_written = 8 + len(text)

    def write(self, key: str, tensor: torch.Tensor) -> None:
        """Append ``tensor`` (converted to its spec's dtype piece by piece) as the tensor ``key``."""
        spec = self._specs[self._next]
        if key != spec.key or tuple(tensor.shape) != spec.shape:
            raise AssertionError(f"expected {spec.key} {spec.shape}, got {key} {tuple(tensor.shape)}")
        self._next += 1
        for piece in converted_pieces(tensor, spec.dtype):
            self._handle.write(piece)
            self.bytes_written += len(piece)

    def finish(self) -> None:
        if self._next != len(self._specs):
            missing = [spec.key for spec in self._specs[self._next :]]
            raise AssertionError(f"{len(missing)} tensors were not written: {missing[:5]}")


def converted_pieces(tensor: torch.Tensor, dtype: torch.dtype) -> Iterator[memoryview]:
    """The bytes of ``tensor`` as ``dtype``, at most :data:`CHUNK_BYTES` at a time (converted per piece, so a
    converted copy of the whole tensor never exists)."""
    flat = tensor.detach().contiguous().reshape(-1)
    if flat.numel() == 0:
        return
    step = max(1, CHUNK_BYTES // max(flat.element_size(), dtype.itemsize))
    for start in range(0, flat.numel(), step):
        piece = flat[start : start + step]
        if piece.dtype != dtype:
            piece = piece.to(dtype)
        yield memoryview(piece.view(torch.uint8).numpy().data).cast("B")


__all__ = ["CHUNK_BYTES", "SafetensorsStream", "TensorSpec", "converted_pieces", "is_remote", "open_output"]
