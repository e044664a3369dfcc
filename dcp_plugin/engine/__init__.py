"""The DCP pipeline: :class:`~dcp_plugin.engine.checkpoint_engine.CheckpointEngine` (``dcp.save`` / ``async_save``
/ ``load``, one save in flight, background errors) and its parts: the save in flight (:mod:`.pending`), background
errors and finished stats (:mod:`.outcomes`, :mod:`.failures`), the writer daemon, process groups, plan caching,
writer priority, saves in flight per URL, the exit-time flush, save statistics, and staging (:mod:`.staging`)."""

from __future__ import annotations

from dcp_plugin._lazy import lazy_getattr

# The names this package's module of the same name had, imported on first use (the submodules import torch).
_MOVED = {
    "CheckpointEngine": "dcp_plugin.engine.checkpoint_engine",
    "SaveStats": "dcp_plugin.engine.stats",
}

__getattr__ = lazy_getattr(__name__, _MOVED)
