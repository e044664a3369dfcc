"""Counting the collectives a rank makes, and what they carry, while it saves or loads.

:func:`install` wraps ``torch.distributed``'s collective functions in this process (the object collectives DCP and
dcp-plugin call, the tensor collectives those are made of, and the steps of DCP's ``_DistWrapper``), so that every
call made from any thread is recorded with:

- ``op``: the function, e.g. ``gather_object``; ``origin``: who called it (``dcp:plan`` for a step of DCP's
  pipeline, ``dcp_plugin.checkpointer._prepare`` for the plugin's own);
- ``pickled_out`` / ``pickled_in``: the bytes this rank pickled to send and unpickled on receipt (the object
  collectives' payload, as ``torch.distributed`` serializes it);
- ``wire``: the tensor collectives the call was made of, each as ``[op, bytes]`` where ``bytes`` is one rank's
  message (for an ``all_gather`` or ``gather`` of objects: the pickled size padded to the largest rank's; for a
  broadcast: the whole buffer). A network model prices a call from these (``benchmarks/scaling_cluster.py``).

Counts and byte sizes do not depend on how busy the machine is, unlike times. Nothing here changes what the
collectives do.
"""

from __future__ import annotations

import functools
import os
import sys
import threading
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d

OBJECT_OPS = ("all_gather_object", "gather_object", "broadcast_object_list", "scatter_object_list")
"""Collectives of picklable objects (each is a few tensor collectives underneath)."""
TENSOR_OPS = (
    "all_gather",
    "all_gather_into_tensor",
    "gather",
    "scatter",
    "broadcast",
    "all_reduce",
    "reduce",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "all_to_all",
    "all_to_all_single",
    "barrier",
    "monitored_barrier",
    "new_group",
    "send",
    "recv",
    "isend",
    "irecv",
)
"""Tensor collectives and point-to-point calls."""
DCP_STEPS = ("reduce_scatter", "all_reduce", "all_gather", "broadcast", "barrier")
"""Methods of DCP's ``_DistWrapper``: each is one named step of a DCP save or load (``plan``, ``write``, ``read``)."""

_OWN_FILES = (os.path.abspath(__file__), os.path.abspath(c10d.__file__))
_lock = threading.Lock()
_local = threading.local()
_records: list[dict[str, Any]] = []
_installed = False


def install() -> None:
    """Wrap the collectives of this process (idempotent). Call before any save or load is measured."""
    global _installed
    if _installed:
        return
    _installed = True
    for name in OBJECT_OPS:
        _patch(name, _object_wrapper)
    for name in TENSOR_OPS:
        if hasattr(c10d, name):
            _patch(name, _tensor_wrapper)
    c10d._object_to_tensor = _sized(c10d._object_to_tensor, "pickled_out", lambda result, args: int(result[1]))
    c10d._tensor_to_object = _sized(c10d._tensor_to_object, "pickled_in", lambda result, args: int(args[1]))
    from torch.distributed.checkpoint import utils as dcp_utils

    for step in DCP_STEPS:
        original = getattr(dcp_utils._DistWrapper, step)
        setattr(dcp_utils._DistWrapper, step, _dcp_step(original, step))


def mark() -> int:
    """A position in the record; :func:`since` returns what was recorded after it."""
    with _lock:
        return len(_records)


def since(position: int) -> list[dict[str, Any]]:
    """The calls recorded after ``position`` (top-level calls only: an object collective carries the tensor
    collectives it was made of in ``wire``)."""
    with _lock:
        return [dict(record) for record in _records[position:]]


def summary(calls: list[dict[str, Any]]) -> dict[str, Any]:
    """Totals of a list of calls: how many, how many tensor collectives underneath, bytes pickled and on the wire."""
    return {
        "calls": len(calls),
        "wire_calls": sum(len(call["wire"]) for call in calls),
        "pickled_out": sum(call["pickled_out"] for call in calls),
        "pickled_in": sum(call["pickled_in"] for call in calls),
        "wire_bytes": sum(size for call in calls for _, size in call["wire"]),
    }


# -- wrappers ----------------------------------------------------------------------------------------------------


def _patch(name: str, make: Callable[[str, Callable[..., Any]], Callable[..., Any]]) -> None:
    original = getattr(c10d, name)
    wrapped = make(name, original)
    setattr(c10d, name, wrapped)
    if getattr(dist, name, None) is original:
        setattr(dist, name, wrapped)


def _current() -> dict[str, Any] | None:
    stack = getattr(_local, "stack", None)
    return stack[-1] if stack else None


def _push(record: dict[str, Any]) -> None:
    if not hasattr(_local, "stack"):
        _local.stack = []
    _local.stack.append(record)


def _object_wrapper(name: str, original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        parent = _current()
        if parent is not None and parent["level"] == "object":
            return original(*args, **kwargs)
        record = _new(name, "object")
        _push(record)
        try:
            return original(*args, **kwargs)
        finally:
            _local.stack.pop()
            _append(record, parent)

    return wrapper


def _tensor_wrapper(name: str, original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        parent = _current()
        size = _message_bytes(name, args, kwargs)
        if parent is not None and parent["level"] == "object":
            parent["wire"].append([name, size])
            return original(*args, **kwargs)
        if parent is not None and parent["level"] == "tensor":  # a tensor collective built on another
            return original(*args, **kwargs)
        record = _new(name, "tensor")
        record["wire"].append([name, size])
        _push(record)
        try:
            return original(*args, **kwargs)
        finally:
            _local.stack.pop()
            _append(record, parent)

    return wrapper


def _sized(original: Callable[..., Any], field: str, size: Callable[[Any, tuple], int]) -> Callable[..., Any]:
    @functools.wraps(original)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        result = original(*args, **kwargs)
        record = _current()
        if record is not None:
            record[field] += size(result, args)
        return result

    return wrapper


def _dcp_step(original: Callable[..., Any], method: str) -> Callable[..., Any]:
    @functools.wraps(original)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        step = args[0] if args and isinstance(args[0], str) else method
        previous = getattr(_local, "dcp_step", None)
        _local.dcp_step = f"dcp:{step}"
        try:
            return original(self, *args, **kwargs)
        finally:
            _local.dcp_step = previous

    return wrapper


def _new(op: str, level: str) -> dict[str, Any]:
    return {
        "op": op,
        "level": level,
        "origin": getattr(_local, "dcp_step", None) or _origin(),
        "pickled_out": 0,
        "pickled_in": 0,
        "wire": [],
    }


def _append(record: dict[str, Any], parent: dict[str, Any] | None) -> None:
    del parent  # a call inside a DCP step is still a top-level call; the step is its origin
    with _lock:
        _records.append(record)


def _origin() -> str:
    """``module.function`` of the first caller outside ``torch.distributed``'s collective code and this module."""
    frame = sys._getframe(2)
    while frame is not None:
        filename = os.path.abspath(frame.f_code.co_filename)
        if filename not in _OWN_FILES and "c10d_logger" not in filename:
            module = frame.f_globals.get("__name__", "?")
            return f"{module}.{frame.f_code.co_name}"
        frame = frame.f_back
    return "?"


def _message_bytes(name: str, args: tuple, kwargs: dict[str, Any]) -> int:
    """One rank's message in a tensor collective: its input (gathers), its share (scatters), or the buffer."""
    tensors = [value for value in (*args, *kwargs.values()) if isinstance(value, torch.Tensor)]
    lists = [value for value in (*args, *kwargs.values()) if isinstance(value, (list, tuple))]
    if name in ("all_gather", "gather", "scatter") and tensors:
        return _nbytes(tensors[0])
    if name == "all_gather_into_tensor" and len(tensors) >= 2:
        return _nbytes(tensors[1])
    if tensors:
        return _nbytes(tensors[0])
    flat = [t for items in lists for t in items if isinstance(t, torch.Tensor)]
    return _nbytes(flat[0]) if flat else 0


def _nbytes(tensor: torch.Tensor) -> int:
    return int(tensor.numel() * tensor.element_size())


__all__ = ["DCP_STEPS", "OBJECT_OPS", "TENSOR_OPS", "install", "mark", "since", "summary"]
