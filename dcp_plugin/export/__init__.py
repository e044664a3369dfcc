"""Single-file exports of one checkpoint entry: :mod:`.exporter` (safetensors streamed through the verifying
reader, ``torch.save``, or a format an adapter registers) and :mod:`.output` (a file that appears whole or not
at all)."""

from __future__ import annotations

from dcp_plugin._lazy import lazy_getattr

# The names this package's module of the same name had, imported on first use (the submodules import torch).
_MOVED = {
    "export_checkpoint": "dcp_plugin.export.exporter",
    "ExportResult": "dcp_plugin.export.exporter",
}

__getattr__ = lazy_getattr(__name__, _MOVED)
