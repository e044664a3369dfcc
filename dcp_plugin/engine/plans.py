"""DCP's save planner with plan caching, where torch has it: a save of the same structure as the previous save
under the same key skips planning (and, across ranks, sending the plans to the coordinator).

DCP keeps cached plans in class-level dicts of :class:`SavePlanner` under the planner's ``_cached_plans_key``,
by default the planner's class name, shared by every save of the process. DCP decides whether a cached plan
still fits by comparing keys, shapes and chunks only: after ``model.half()`` it would write fp16 bytes under the
float32 ``.metadata`` of the cached plan. So the key covers everything ``.metadata`` records (:func:`structure`:
the nesting, and per tensor its dtype, shape, layout, gradient flag, pinning and sharding) agreed over
every rank; any change gives a new key and a fresh plan. Each engine uses keys of its own, so plans of
different process groups (a lone rank, all ranks) never mix, and forgets them when the structure changes and
when it closes.
"""

from __future__ import annotations

import inspect
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import xxhash
from torch.distributed.checkpoint import DefaultSavePlanner
from torch.distributed.checkpoint.planner import SavePlanner

PLAN_CACHING = "enable_plan_caching" in inspect.signature(DefaultSavePlanner.__init__).parameters
_CACHES = ("_cached_save_plan", "_cached_all_plans", "_cached_global_plan", "_cached_metadata")
_CACHES += ("_cached_final_save_plan",)


def new_key() -> str:
    """A cache key of its own (one per engine)."""
    return f"dcp_plugin-{uuid.uuid4().hex}"


def structure(state_dict: Mapping[str, Any]) -> str:
    """A digest of everything a save's ``.metadata`` records about ``state_dict`` besides the bytes: the nesting,
    and for each tensor its type, dtype, shape, layout, gradient flag, pinning and sharding (a
    non-tensor counts by its path only: it is written afresh at every save)."""
    hasher = xxhash.xxh3_128()
    _describe(state_dict, hasher)
    return hasher.hexdigest()


def _describe(node: Mapping[str, Any], hasher: Any) -> None:
    parts: list[str] = []
    for name, value in node.items():
        if isinstance(value, Mapping):
            hasher.update(f"{{{name!r}".encode())
            _describe(value, hasher)
            hasher.update(b"}")
        elif isinstance(value, torch.Tensor):
            parts.append(f"{name!r}{_tensor(value)};")
        else:
            parts.append(f"{name!r}:{type(value).__name__};")
    hasher.update("".join(parts).encode())


def _tensor(tensor: torch.Tensor) -> str:
    sharding = ""
    placements = getattr(tensor, "placements", None)
    if placements is not None:  # a DTensor: its chunk comes from the mesh and the placements
        mesh = tensor.device_mesh
        sharding = f"{placements}{tuple(mesh.mesh.shape)}{mesh.get_coordinate()}{tuple(tensor.to_local().shape)}"
    pinned = tensor.device.type == "cpu" and torch.cuda.is_initialized() and tensor.is_pinned()
    kind = type(tensor).__name__
    return f"{kind}{tensor.dtype}{tuple(tensor.shape)}{tensor.layout}{tensor.requires_grad}{pinned}{sharding}"


def agreed(digests: Sequence[str]) -> str:
    """One key suffix from every rank's :func:`structure` (a change on any rank changes it on all)."""
    return xxhash.xxh3_64_hexdigest("|".join(digests).encode())


def save_planner(key: str) -> DefaultSavePlanner:
    """The planner for one save; plans are cached under ``key`` when torch supports it."""
    if not PLAN_CACHING:
        return DefaultSavePlanner()
    planner = DefaultSavePlanner(enable_plan_caching=True)
    planner._cached_plans_key = key  # no public argument for the key
    return planner


def forget(key: str) -> None:
    """Drop what is cached under ``key`` in this process."""
    for name in _CACHES:
        getattr(SavePlanner, name, {}).pop(key, None)


__all__ = ["PLAN_CACHING", "agreed", "forget", "new_key", "save_planner", "structure"]
