"""Plain values under DCP's own keys, so that PyTorch's DCP tools find them.

The skeleton (:mod:`dcp_plugin.format.encoding`) holds every non-tensor value exactly, and dcp-plugin reads only
the skeleton. Code that resumes with DCP directly (``get_optimizer_state_dict`` + ``dcp.load`` +
``set_optimizer_state_dict``, as torchtitan does) instead asks DCP for each value under the key DCP's flattening
gives it, e.g. ``optimizer.param_groups.0.lr``. So each plain value of an entry is also handed to DCP, where DCP
stores it as a byte item (``torch.save`` of the value).

This is done for the entries such code loads with DCP: ``Stateful`` objects (models, optimizers, schedulers) and
entries that are one scalar (``"step": 500``). Other entries (a Lightning checkpoint's ``loops`` and
``hyper_parameters``) stay in the skeleton only: every byte item costs about 0.15 ms of CPU per save.

Only values that ``torch.load(weights_only=True)`` reads back are stored that way: ``None``, booleans, integers,
floats, strings, and lists, tuples and string- or int-keyed dicts of those, up to :data:`MAX_ELEMENTS` elements
per value. Anything else (and any value in a per-rank entry) stays in the skeleton only, so a checkpoint still
holds no pickle that can run code.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch.distributed.checkpoint._traverse import traverse_state_dict
from torch.distributed.checkpoint.stateful import Stateful

from dcp_plugin.format.encoding import is_tensor

MAX_ELEMENTS = 65536
"""Larger plain values (a sampler's index list, say) stay in the skeleton only."""

Path = tuple[str | int, ...]


def applies(obj: Any, value: Any) -> bool:
    """Whether the entry whose live object is ``obj`` (``value`` once expanded) gets its plain values stored."""
    return isinstance(obj, Stateful) or value is None or type(value) in (bool, int, float, str)


def plain_values(name: str, value: Any) -> dict[Path, Any]:
    """``{path: value}`` of every plain, non-tensor leaf DCP's flattening finds in ``{name: value}``; the DCP key
    of each is ``".".join(map(str, path))``."""
    found: dict[Path, Any] = {}

    def visit(path: Path, leaf: Any) -> None:
        if not is_tensor(leaf) and _count(leaf, MAX_ELEMENTS) is not None:
            found[path] = leaf

    plain = _without_tensors(value)
    if plain is not _NOTHING:
        traverse_state_dict({name: plain}, visit)
    return found


_NOTHING = object()


def _without_tensors(value: Any) -> Any:
    """``value`` without what holds no plain leaf, so that traversing it visits exactly the plain leaves DCP's
    flattening visits in ``value``, at the same paths: a mapping loses its tensors and the mappings that hold only
    tensors; in a list, such an element becomes an empty mapping (the indices, and whether DCP treats the list as
    one leaf, stay as they were). ``_NOTHING`` when nothing plain is left of a mapping."""
    if type(value) is dict or isinstance(value, Mapping):
        kept = {}
        for key, item in value.items():
            if type(item) is torch.Tensor or is_tensor(item):
                continue
            item = _without_tensors(item)
            if item is not _NOTHING:
                kept[key] = item
        return kept if kept or not value else _NOTHING
    if type(value) is list:
        out = []
        for item in value:
            item = {} if is_tensor(item) else _without_tensors(item)
            out.append({} if item is _NOTHING else item)
        return out
    return value


def _count(value: Any, budget: int) -> int | None:
    """How many elements ``value`` holds if it is plain and holds at most ``budget``; ``None`` otherwise."""
    if value is None or type(value) in (bool, int, float, str):
        return 1
    if type(value) in (list, tuple):
        items: Any = value
    elif type(value) is dict and all(type(k) in (str, int) for k in value):
        items = value.values()
    else:
        return None
    total = 1
    for item in items:
        used = _count(item, budget - total)
        if used is None:
            return None
        total += used
        if total > budget:
            return None
    return total


def insert(nested: dict[str, Any], path: Path, value: Any) -> bool:
    """Put ``value`` at ``path`` in ``nested`` as DCP would find it there: integer parts index lists (created as
    needed), string parts key dicts; where a tensor already made a dict, an integer part keys it as a string.
    Returns ``False`` (nothing changed) where the path runs into a value of another kind."""
    node: Any = nested
    for position, part in enumerate(path):
        last = position == len(path) - 1
        child: Any = None if last else ([] if isinstance(path[position + 1], int) else {})
        if isinstance(node, list) and isinstance(part, int):
            while len(node) < part:
                node.append({})  # an element with nothing plain in it: DCP's flattening skips empty dicts
            if last:
                if part < len(node):
                    return False
                node.append(value)
                return True
            if part == len(node):
                node.append(child)
            node = node[part]
        elif isinstance(node, Mapping):
            key = str(part)
            if last:
                if key in node:
                    return False
                node[key] = value  # type: ignore[index]
                return True
            if key not in node:
                node[key] = child  # type: ignore[index]
            node = node[key]
        else:
            return False
    return False


__all__ = ["MAX_ELEMENTS", "applies", "insert", "plain_values"]
