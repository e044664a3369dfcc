"""What a single file given in place of a checkpoint directory is, told from its first bytes, and how to read it.

A user points a command at ``model.safetensors``, ``last.ckpt`` or ``weights.pt``; the message should name the
right loader, not a generic one. Only a few bytes are read, without following links on local disks.
"""

from __future__ import annotations

import json
import struct
from typing import Any

from dcp_plugin.storage.safe_io import open_local_regular

_ZIP = b"PK\x03\x04"
_PICKLE_PROTOCOLS = tuple(bytes([0x80, version]) for version in range(2, 6))
_SAFETENSORS_HEADER_LIMIT = 100 * 2**20


def kind_of(head: bytes, size: int) -> str:
    """``"safetensors"``, ``"torch"`` (a ``torch.save`` zip archive or legacy pickle) or ``"unknown"``, from a
    file's first bytes (at least 9 of them for safetensors) and its size."""
    if head.startswith(_ZIP) or head.startswith(_PICKLE_PROTOCOLS):
        return "torch"
    if len(head) >= 9:
        (header_length,) = struct.unpack("<Q", head[:8])
        if 2 <= header_length <= min(size - 8, _SAFETENSORS_HEADER_LIMIT) and head[8:9] == b"{":
            return "safetensors"
    return "unknown"


def read_head(fs: Any, path: str, *, is_local: bool, count: int = 16) -> bytes:
    """The first ``count`` bytes of ``path`` (empty if it cannot be read). A local path is opened only if it is a
    regular file itself (no link followed, no FIFO waited on)."""
    try:
        if is_local:
            with open_local_regular(path) as local:
                return bytes(local.read(count))
        with fs.open(path, "rb") as handle:
            return bytes(handle.read(count))
    except (OSError, ValueError):
        return b""


def how_to_read(kind: str, shown: str) -> str:
    """The sentence that says what to do with a file of ``kind`` (see :func:`kind_of`)."""
    if kind == "safetensors":
        return (
            f"It is a safetensors file: load it with safetensors.torch.load_file({json.dumps(shown)}) (or a "
            "library's from_pretrained)."
        )
    if kind == "torch":
        return (
            f"It was written by torch.save: load it with torch.load({json.dumps(shown)}, weights_only=True) (a "
            "Lightning .ckpt file: YourModule.load_from_checkpoint)."
        )
    return "dcp-plugin reads the checkpoint directories it wrote, or directories written by dcp.save."


def describe_file(fs: Any, path: str, shown: str, *, is_local: bool) -> str:
    """The message for a file given where a checkpoint directory belongs."""
    try:
        size = int(fs.size(path))
    except (OSError, ValueError, TypeError):
        size = 0
    kind = kind_of(read_head(fs, path, is_local=is_local), size)
    return f"{shown} is a file, not a dcp-plugin checkpoint directory. {how_to_read(kind, shown)}"


__all__ = ["describe_file", "how_to_read", "kind_of", "read_head"]
