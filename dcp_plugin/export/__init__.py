"""Single-file exports of one checkpoint entry: :mod:`.exporter` (safetensors streamed through the verifying
reader, ``torch.save``, or a format an adapter registers) and :mod:`.output` (a file that appears whole or not
at all)."""

from __future__ import annotations

import importlib
from typing import Any

# The names this package's module of the same name had, imported on first use (the submodules import torch).
_MOVED = {
    "export_checkpoint": "dcp_plugin.export.exporter",
    "ExportResult": "dcp_plugin.export.exporter",
}


def __getattr__(name: str) -> Any:
    module = _MOVED.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
