"""DCP's save planner with plan caching, where torch has it: a save of the same structure as the previous save
under the same key skips planning (and, across ranks, sending the plans to the coordinator).

A tensor every rank holds under the same key (a DDP replica, a value outside the DDP model) is written once, by
the lowest rank holding it: rank 0's copy, as Lightning and Accelerate save it. DCP's default spreads such tensors
over the ranks to balance the bytes each writes, which stores a mix of the ranks' values when they differ.

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


def structure(state_dict: Mapping[str, Any]) -> tuple[Any, ...]:
    """Everything a save's ``.metadata`` records about ``state_dict`` besides the bytes: the nesting, and for each
    tensor its type, dtype, shape, layout, gradient flag, pinning and sharding (a non-tensor counts by its path
    and type only: it is written afresh at every save). Compared exactly, save to save."""
    out: list[Any] = []
    _describe(state_dict, out)
    return tuple(out)


def _describe(node: Mapping[str, Any], out: list[Any]) -> None:
    pinning = torch.cuda.is_initialized()
    for name, value in node.items():
        if isinstance(value, Mapping):
            out.append((name, "{"))
            _describe(value, out)
            out.append("}")
        elif isinstance(value, torch.Tensor):
            kind = type(value)
            description = (name, kind, value.dtype, value.shape, value.layout, value.requires_grad)
            if kind is not torch.Tensor:
                description += (_sharding(value),)
            if pinning and value.device.type == "cpu":
                description += (value.is_pinned(),)
            out.append(description)
        else:
            out.append((name, type(value)))


def _sharding(tensor: torch.Tensor) -> Any:
    placements = getattr(tensor, "placements", None)
    if placements is None:
        return None
    mesh = tensor.device_mesh  # a DTensor: its chunk comes from the mesh and the placements
    return (tuple(placements), tuple(mesh.mesh.shape), tuple(mesh.get_coordinate() or ()), tensor.to_local().shape)


class PlanKeys:
    """One engine's plan cache keys: its own prefix, a number per save structure that changes whenever this
    rank's structure does, and the key in use (plans of an earlier structure are forgotten)."""

    def __init__(self) -> None:
        self._prefix = new_key()
        self._last: tuple[Any, ...] | None = None
        self._generation = 0
        self.current = self._prefix
        """The key the next save plans under."""

    def number(self, described: tuple[Any, ...]) -> int:
        """This rank's number for a save described by ``described`` (:func:`structure`)."""
        if described != self._last:
            self._last = described
            self._generation += 1
        return self._generation

    def use(self, structure: str) -> str:
        """The key for a save whose structure all ranks agreed on (:func:`agreed`)."""
        key = f"{self._prefix}-{structure}"
        if key != self.current:
            forget(self.current)
            self.current = key
        return key

    def forget(self) -> None:
        """Drop every plan cached under this engine's keys."""
        forget(self.current)


def agreed(numbers: Sequence[int]) -> str:
    """One key suffix from every rank's structure number: a change on any rank changes it on all."""
    return "-".join(str(number) for number in numbers)


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


__all__ = ["PLAN_CACHING", "PlanKeys", "agreed", "forget", "new_key", "save_planner", "structure"]
