"""Two storage tiers: :mod:`.two_tiers` (what is replicated, what each tier keeps, which tier a load reads),
:mod:`.replication` (committed checkpoints copied to the second tier in the background) and :mod:`.rank_copy`
(each rank uploads its own files, rank 0 commits); :mod:`.run_tiers` is what ``CheckpointManager`` asks, with one
tier or two. Several nodes with their own disks (``local_scope="node"``): :mod:`.nodes` (listing and restoring across
the nodes), :mod:`.holdings` (which node holds what), :mod:`.peers` (copies to other nodes), :mod:`.restore` (each
file from the nearest copy), :mod:`.wire` (files over the process group)."""

from __future__ import annotations

from dcp_plugin._lazy import lazy_getattr

# The names this package's module of the same name had, imported on first use (the submodules import torch).
_MOVED = {
    "RemoteTier": "dcp_plugin.tiers.two_tiers",
    "TwoTiers": "dcp_plugin.tiers.two_tiers",
}

__getattr__ = lazy_getattr(__name__, _MOVED)
