"""Reading DCP's ``.metadata`` without executing code from the file.

DCP pickles its metadata. A checkpoint from an untrusted source can therefore run arbitrary code when
read with ``pickle.load``. We unpickle it with an allow-list of the classes DCP actually writes.
"""

from __future__ import annotations

import io
import pickle
from typing import IO, Any

import torch

from dcp_plugin.errors import UnsafeCheckpointError

_ALLOWED: dict[str, set[str]] = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata",
        "MetadataIndex",
        "StorageMeta",
        "TensorStorageMetadata",
        "TensorProperties",
        "ChunkStorageMetadata",
        "BytesStorageMetadata",
        "_MEM_FORMAT_ENCODING",
    },
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.distributed.checkpoint.planner": {"WriteItemType", "LoadItemType"},
    "torch": {"Size"},
    "torch.serialization": {"_get_layout"},
    "pathlib": {"PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath", "Path"},
    "collections": {"OrderedDict"},
    "builtins": {"set", "frozenset", "slice"},
}


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if name in _ALLOWED.get(module, ()):
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise UnsafeCheckpointError(
            f"Checkpoint metadata refers to {module}.{name}, which a DCP checkpoint never needs; refusing to "
            "load it because unpickling it could run code. If you wrote this checkpoint yourself with a custom "
            "planner and trust it, read it with torch.distributed.checkpoint directly."
        )


def load_metadata(stream: IO[bytes]) -> Any:
    """Unpickle DCP metadata, allowing only the classes DCP itself writes."""
    return _RestrictedUnpickler(stream).load()


def loads_metadata(data: bytes) -> Any:
    return load_metadata(io.BytesIO(data))
