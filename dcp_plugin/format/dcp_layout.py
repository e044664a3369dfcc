"""Loading a checkpoint stored under DCP's own keys, without a dcp-plugin skeleton (written by plain ``dcp.save``).

Each entry of the live state is matched as ``dcp.load`` matches it: its state dict (``get_model_state_dict`` /
``get_optimizer_state_dict`` for models and optimizers) is flattened by DCP's rules under the entry's name, and
every key must be in the checkpoint. An entry without a live object (a plain value, or ``None`` for ``read``) is
rebuilt from the checkpoint's metadata: tensors at their full size, plain values as stored. A model whose weights
are stored at the top level, as torchtitan stores them, is found there.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.distributed.checkpoint._nested_dict import flatten_state_dict, unflatten_state_dict
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata, TensorStorageMetadata
from torch.distributed.checkpoint.stateful import Stateful

from dcp_plugin.format.state import _NEVER_STEPPED, ModelState, defines_structure, load_targets
from dcp_plugin.storage.reader import placeholder


@dataclass
class DcpLoadPlan:
    """What to hand to DCP (``flat``), how to rebuild each entry afterwards (``mappings``), and what is wrong."""

    flat: dict[str, Any] = field(default_factory=dict)
    mappings: dict[str, Any] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    entries: list[str] = field(default_factory=list)


def plan_dcp_load(state: Mapping[str, Any], metadata: Metadata, *, strict: bool) -> DcpLoadPlan:
    """Match the live (wrapped) state against a plain-DCP checkpoint; collect every problem."""
    plan = DcpLoadPlan()
    stored = metadata.state_dict_metadata or {}
    for name, obj in state.items():
        prefix = f"{name}."
        saved = [key for key in stored if key == name or key.startswith(prefix)]
        if not saved and isinstance(obj, ModelState) and _plan_top_level_model(plan, name, obj, stored):
            continue
        if not saved:
            message = f"entry {name!r} is not in the checkpoint (it has: {', '.join(_entries(stored)) or 'nothing'})"
            (plan.problems if strict else plan.warnings).append(message)
            continue
        plan.entries.append(name)
        if not isinstance(obj, Stateful):
            _from_metadata(plan, metadata, saved)
            continue
        value = load_targets(obj)
        if isinstance(value, dict) and _NEVER_STEPPED in value:  # dcp-plugin's own marker; DCP never stores it
            value = {k: v for k, v in value.items() if k != _NEVER_STEPPED}
        flat, mapping = flatten_state_dict({name: value})
        missing = sorted(key for key in flat if key not in stored)
        for key, live in flat.items():
            if key in missing:
                continue
            item = stored[key]
            if isinstance(live, torch.Tensor) != isinstance(item, TensorStorageMetadata):
                plan.problems.append(f"{key!r} is a {'tensor' if torch.is_tensor(live) else 'value'} here, not there")
            elif isinstance(item, TensorStorageMetadata) and tuple(live.size()) != tuple(item.size):
                plan.problems.append(
                    f"shape mismatch for {key!r}: checkpoint {tuple(item.size)}, live {tuple(live.size())}"
                )
            else:
                plan.flat[key], plan.mappings[key] = live, mapping[key]
        unexpected = sorted(set(saved) - set(flat)) if defines_structure(obj) else []
        for keys, what in (
            (missing, "missing keys (live state has them, checkpoint does not)"),
            (unexpected, "unexpected keys in checkpoint"),
        ):
            if keys:
                message = f"{name!r}: {what} {_short(keys, prefix)}"
                (plan.problems if strict else plan.warnings).append(message)
    return plan


def _plan_top_level_model(plan: DcpLoadPlan, name: str, model: ModelState, stored: Mapping[str, Any]) -> bool:
    """torchtitan stores the model's weights at the top level (``tok_embeddings.weight``, not
    ``model.tok_embeddings.weight``): take them from there when every one of them is there, with its shape."""
    flat, mapping = flatten_state_dict(model.state_dict())
    for key, live in flat.items():
        item = stored.get(key)
        if not isinstance(item, TensorStorageMetadata) or not torch.is_tensor(live):
            return False
        if tuple(live.size()) != tuple(item.size):
            return False
    if not flat:
        return False
    plan.entries.append(name)
    for key, live in flat.items():
        plan.flat[key], plan.mappings[key] = live, (name, *mapping[key])
    return True


def _from_metadata(plan: DcpLoadPlan, metadata: Metadata, keys: list[str]) -> None:
    paths = metadata.planner_data if isinstance(metadata.planner_data, dict) else {}
    for key in keys:
        item = metadata.state_dict_metadata[key]
        path = paths.get(key)
        plan.mappings[key] = tuple(path) if isinstance(path, (tuple, list)) and path else tuple(key.split("."))
        if isinstance(item, TensorStorageMetadata):
            plan.flat[key] = placeholder(tuple(int(d) for d in item.size), item.properties.dtype)
        elif isinstance(item, BytesStorageMetadata):
            plan.flat[key] = None  # replaced by the stored value


def finish_dcp_load(plan: DcpLoadPlan, state: Mapping[str, Any], *, strict: bool) -> dict[str, Any]:
    """After DCP filled ``plan.flat``: hand each entry to its owner; returns the plain entries' values."""
    nested = unflatten_state_dict(plan.flat, plan.mappings) if plan.flat else {}
    plain: dict[str, Any] = {}
    for name in plan.entries:
        obj, value = state[name], nested.get(name)
        if isinstance(obj, ModelState):
            obj.load_state_dict(value or {}, strict=strict)
        elif isinstance(obj, Stateful):
            obj.load_state_dict(value if value is not None else {})
        else:
            plain[name] = value
    return plain


def _entries(stored: Mapping[str, Any]) -> list[str]:
    return sorted({key.split(".", 1)[0] for key in stored})


def _short(keys: list[str], prefix: str, limit: int = 8) -> str:
    names = [k[len(prefix) :] if k.startswith(prefix) else k for k in keys]
    return f"[{', '.join(names[:limit])}{', ...' if len(names) > limit else ''}] ({len(names)} in all)"


__all__ = ["DcpLoadPlan", "finish_dcp_load", "plan_dcp_load"]
