"""DCP's save planner with plan caching, where torch has it: a save of the same tensors as the previous save
under the same key skips planning (and, across ranks, sending the plans to the coordinator).

A tensor every rank holds under the same key (a DDP replica, a value outside the DDP model) is written once, by
the lowest rank holding it: rank 0's copy, as Lightning and Accelerate save it. DCP's default spreads such tensors
over the ranks to balance the bytes each writes, which stores a mix of the ranks' values when they differ.

DCP keeps cached plans in class-level dicts of :class:`SavePlanner` under the planner's ``_cached_plans_key``,
by default the planner's class name, shared by every save of the process. Each engine uses a key of its own,
so plans of different process groups (a lone rank, all ranks) never mix, and forgets it when it closes.
"""

from __future__ import annotations

import inspect
import uuid

from torch.distributed.checkpoint import DefaultSavePlanner
from torch.distributed.checkpoint.planner import SavePlanner

_PARAMETERS = inspect.signature(DefaultSavePlanner.__init__).parameters
PLAN_CACHING = "enable_plan_caching" in _PARAMETERS
_LOWEST_RANK = {"dedup_save_to_lowest_rank": True} if "dedup_save_to_lowest_rank" in _PARAMETERS else {}
_CACHES = ("_cached_save_plan", "_cached_all_plans", "_cached_global_plan", "_cached_metadata")
_CACHES += ("_cached_final_save_plan",)


def new_key() -> str:
    """A cache key of its own (one per engine)."""
    return f"dcp_plugin-{uuid.uuid4().hex}"


def save_planner(key: str) -> DefaultSavePlanner:
    """The planner for one save; plans are cached under ``key`` when torch supports it."""
    if not PLAN_CACHING:
        return DefaultSavePlanner(**_LOWEST_RANK)
    planner = DefaultSavePlanner(enable_plan_caching=True, **_LOWEST_RANK)
    planner._cached_plans_key = key  # no public argument for the key
    return planner


def forget(key: str) -> None:
    """Drop what is cached under ``key`` in this process."""
    for name in _CACHES:
        getattr(SavePlanner, name, {}).pop(key, None)


__all__ = ["PLAN_CACHING", "forget", "new_key", "save_planner"]
