"""FQN-keyed state dicts of plain modules and their optimizers, without DCP's per-parameter name resolution.

torch's ``get_model_state_dict`` / ``get_optimizer_state_dict`` walk the module tree for every parameter and buffer
on every call to find its canonical name (``_get_fqns`` inside ``_verify_options``): about 30 µs per tensor here,
the largest per-tensor cost of a save. For a *plain* module tree that walk gives every name back unchanged: no
``DistributedDataParallel``, FSDP (1) or ``torch.compile`` wrapper, no module with ``_fqn_modifiers``, no
checkpoint-wrapper prefix in the keys, and ``state_dict`` not replaced by DCP's ``_patch_model_state_dict``. With
torch's default options the model's state dict is then the module's own ``state_dict()`` (taken under
``no_grad``, as torch does), and the optimizer's is ``optimizer.state_dict()`` with parameter ids mapped to the
names ``named_parameters()`` gives. Anything else, and any error, goes to torch's functions.

The first result for each model (and each optimizer) and set of keys is compared with torch's own; a difference
makes that object use torch's functions for the rest of the process, with one log line.
"""

from __future__ import annotations

import gc
import logging
import weakref
from collections.abc import Callable, Sequence
from itertools import chain
from typing import Any

import torch
from torch.distributed.checkpoint.state_dict import (
    _patched_state_dict,
    get_model_state_dict,
    get_optimizer_state_dict,
)

log = logging.getLogger(__name__)

_CHECKPOINT_PREFIX = "_checkpoint_wrapped_module."
_FQN_MODIFIERS = "_fqn_modifiers"
_plain_classes: dict[type, bool] = {}
_verified: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()  # object -> keys its result matched for
_refused: weakref.WeakSet[Any] = weakref.WeakSet()  # objects whose fast result differed from torch's


def _wrapper_classes() -> tuple[type, ...]:
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.nn.parallel import DistributedDataParallel

    classes: list[type] = [DistributedDataParallel, FullyShardedDataParallel]
    optimized = getattr(getattr(torch, "_dynamo", None), "eval_frame", None)
    if optimized is not None and hasattr(optimized, "OptimizedModule"):
        classes.append(optimized.OptimizedModule)
    return tuple(classes)


def _plain_class(cls: type) -> bool:
    known = _plain_classes.get(cls)
    if known is None:
        known = _plain_classes[cls] = not issubclass(cls, _wrapper_classes()) and not hasattr(cls, _FQN_MODIFIERS)
    return known


def is_plain(model: torch.nn.Module) -> bool:
    """Whether torch's name resolution gives every parameter and buffer of ``model`` its own name back."""
    if model in _refused or type(model).state_dict in _patched_state_dict or model.state_dict in _patched_state_dict:
        return False
    return all(_plain_class(type(module)) and _FQN_MODIFIERS not in module.__dict__ for module in model.modules())


def model_state_dict(model: torch.nn.Module) -> dict[str, Any]:
    """``get_model_state_dict(model)`` with torch's default options, faster for plain module trees."""
    if not is_plain(model):
        return get_model_state_dict(model)
    with torch.no_grad():
        state = model.state_dict()
    if not state or any(_CHECKPOINT_PREFIX in key for key in state):
        return get_model_state_dict(model)  # torch's own error for an empty model; its renaming otherwise
    return _checked(model, state, lambda: get_model_state_dict(model))


def optimizer_state_dict(model: torch.nn.Module, optimizers: Sequence[torch.optim.Optimizer]) -> dict[str, Any]:
    """``get_optimizer_state_dict(model, optimizers)`` with torch's default options, faster for plain module trees
    and optimizers that have stepped (torch materialises the state of one that has not; that path stays torch's)."""
    slow = lambda: get_optimizer_state_dict(model, optimizers if len(optimizers) > 1 else optimizers[0])  # noqa: E731
    if not is_plain(model) or any(not optimizer.state or optimizer in _refused for optimizer in optimizers):
        return slow()
    enabled = gc.isenabled()
    gc.disable()  # as torch does: no collection while the dicts are rebuilt
    try:
        state = _optimizer_state(model, optimizers)
    except Exception:  # noqa: BLE001 - torch's function gives its own error, or the right result
        return slow()
    finally:
        if enabled:
            gc.enable()
    return _checked(tuple(optimizers), state, slow)


def _optimizer_state(model: torch.nn.Module, optimizers: Sequence[torch.optim.Optimizer]) -> dict[str, Any]:
    out: dict[str, Any] = {"state": {}, "param_groups": []}
    for optimizer in optimizers:
        state_fn = optimizer.state_dict
        if state_fn in _patched_state_dict:
            raise RuntimeError("state_dict patched by DCP")
        packed = state_fn()
        params = list(chain.from_iterable(group["params"] for group in optimizer.param_groups))
        pids = dict(zip(params, range(len(params))))
        names: dict[Any, Any] = {}
        for name, parameter in model.named_parameters():
            pid = pids.get(parameter)
            if pid is not None:
                names[name] = pid
                names[pid] = name
        for key in list(packed["state"]):
            packed["state"][names[key]] = packed["state"].pop(key)
        for group in packed["param_groups"]:
            group["params"] = [names[pid] for pid in group["params"]]
        out["state"].update(packed["state"])
        out["param_groups"].extend(packed["param_groups"])
    return out


def _checked(owner: Any, fast: dict[str, Any], slow: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """``fast``, after comparing it with torch's result the first time ``owner`` gives these keys."""
    key = owner if not isinstance(owner, tuple) else owner[0]
    signature = _signature(fast)
    if _verified.get(key) == signature:
        return fast
    reference = slow()
    if not _same(fast, reference):
        _refused.add(key)
        _verified.pop(key, None)
        log.info("%s: its state dict is taken through torch's get_*_state_dict (a faster path disagreed).", type(key))
        return reference
    _verified[key] = signature
    return fast


def _signature(state: dict[str, Any]) -> Any:
    if "param_groups" in state and "state" in state:
        groups = tuple(tuple(group.get("params", ())) for group in state["param_groups"])
        return tuple(state["state"]), groups
    return tuple(state)


def _same(a: Any, b: Any) -> bool:
    """Equal values; tensors equal when they are the same view of the same memory."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (
            type(a) is type(b)
            and a.data_ptr() == b.data_ptr()
            and a.dtype == b.dtype
            and a.shape == b.shape
            and a.stride() == b.stride()
            and a.device == b.device
            and a.requires_grad == b.requires_grad
        )
    if isinstance(a, dict) and isinstance(b, dict):
        return list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if type(a) is float and type(b) is float and a != a and b != b:
        return True  # NaN
    try:
        return type(a) is type(b) and bool(a == b)
    except Exception:  # noqa: BLE001 - values that do not compare are not known to be equal
        return False


__all__ = ["is_plain", "model_state_dict", "optimizer_state_dict"]
