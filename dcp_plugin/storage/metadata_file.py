"""The ``.metadata`` file of saves that share one structure: pickled once, and per save only what differs.

DCP pickles its whole ``Metadata`` at every save, about 20 µs per tensor here (``torch.Size`` and the dataclasses
pickle through Python code), the largest per-tensor cost of a save after planning. Saves of one structure share
everything but the storage entries that moved (plain values whose length changed, shared blobs written afresh)
and ``storage_meta``. So the parts are pickled once, each on its own (protocol 2, whose memo references carry
their slot numbers, so a part only ever refers to what it stored itself), and each save's file is those bytes
joined by a few opcodes::

    Metadata.__new__(Metadata), then BUILD with {"state_dict_metadata": <part>, "planner_data": <part>,
    "storage_data": <part> updated with the entries that moved, "storage_meta": <this save's>, "version": <part>}

which is exactly what ``pickle.dumps(metadata, protocol=2)`` describes, object for object. Any unpickler reads it:
``pickle.load`` (DCP's readers, ``dcp_to_torch_save``) and dcp-plugin's allow-listed one.
"""

from __future__ import annotations

import pickle
from collections.abc import Mapping
from typing import Any

from torch.distributed.checkpoint.metadata import Metadata

_PROTOCOL = 2
_HEADER = b"\x80\x02c" + f"{Metadata.__module__}\n{Metadata.__qualname__}\n".encode() + b")\x81}("
_MARK, _SETITEMS, _BUILD, _STOP = b"(", b"u", b"b", b"."


def part(value: Any) -> bytes:
    """The opcodes that push ``value`` on the unpickler's stack, self-contained (no reference to any other part)."""
    data = pickle.dumps(value, protocol=_PROTOCOL)
    if not (data.startswith(b"\x80\x02") and data.endswith(_STOP)):  # pragma: no cover - pickle's own framing
        raise ValueError("unexpected pickle framing")
    return data[2:-1]


class MetadataFile:
    """The bytes of the ``.metadata`` files of saves that share ``metadata``'s structure.

    ``metadata``: a save's ``Metadata`` whose ``storage_data`` holds every entry (the saves' baseline); per save,
    :meth:`render` writes the entries that differ from it and that save's ``storage_meta``."""

    def __init__(self, metadata: Metadata) -> None:
        self.metadata = metadata
        """The baseline (its ``storage_meta`` is not used)."""
        self._state = part("state_dict_metadata") + part(metadata.state_dict_metadata)
        self._planner = part("planner_data") + part(metadata.planner_data)
        self._storage = part("storage_data") + part(metadata.storage_data)
        self._version = part("version") + part(metadata.version)

    def render(self, storage_meta: Any, changed: Mapping[Any, Any]) -> bytes:
        """The file of a save whose storage entries are the baseline's updated with ``changed``."""
        pieces = [_HEADER, self._state, self._planner, self._storage]
        if changed:
            pieces.append(_MARK)
            for index, info in changed.items():
                pieces += (part(index), part(info))
            pieces.append(_SETITEMS)
        pieces += (part("storage_meta"), part(storage_meta), self._version, _SETITEMS, _BUILD, _STOP)
        return b"".join(pieces)


__all__ = ["MetadataFile", "part"]
