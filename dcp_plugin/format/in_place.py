"""Whether a load already left a model (or an optimizer) as its ``load_state_dict`` would, so that call can be
skipped (or reduced to what is not a tensor).

A load reads every tensor of a model straight into the model's own parameters and buffers (the tensors
``get_model_state_dict`` hands out alias them). ``set_model_state_dict`` would then copy each onto itself, after
torch's state-dict helpers worked out every parameter's name, and ``Module.load_state_dict`` matches each child
module's keys by scanning the whole dict: for a model of many small modules (thousands of experts) that is
quadratic and took seconds. The call is skipped only where it could not change anything: every value to load is
the very tensor the load was planned into (so it aliases the live parameter or buffer), every value is a plain
tensor, and no module of the model has load hooks, its own ``load_state_dict`` / ``_load_from_state_dict`` or
extra state. Anything else goes through torch's helpers as before.

Optimizers alike: where every tensor of the optimizer state to load is the very tensor the load was planned into
and that tensor is the live optimizer's own state, what ``Optimizer.load_state_dict`` would still do is set the
plain values (hyperparameters of each parameter group, state values that are not tensors), drop the state of
parameters the checkpoint has none for, and run the optimizer's ``__setstate__``: done here directly, without
torch's helpers mapping every parameter's name to it again and casting every tensor onto itself. Only for one
plain optimizer without load hooks whose groups hold the same parameters in the same order as saved.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

_PLAIN = (torch.Tensor, torch.nn.Parameter)
_MODULE = torch.nn.Module


def loaded_in_place(model: torch.nn.Module, values: Mapping[str, Any], targets: Mapping[str, Any] | None) -> bool:
    """Whether loading ``values`` into ``model`` would only copy tensors onto themselves: each value is the tensor
    of ``targets`` (what the load was planned into) under its name, and loading runs no code of the model's own."""
    if targets is None or type(model).load_state_dict is not _MODULE.load_state_dict:
        return False
    for key, value in values.items():
        if type(value) not in _PLAIN or targets.get(key) is not value:
            return False
    return all(_plain_loading(module) for module in model.modules())


def _plain_loading(module: torch.nn.Module) -> bool:
    cls = type(module)
    return (
        not module._load_state_dict_pre_hooks
        and not module._load_state_dict_post_hooks
        and cls._load_from_state_dict is _MODULE._load_from_state_dict
        and cls.set_extra_state is _MODULE.set_extra_state
        and cls.get_extra_state is _MODULE.get_extra_state
    )


def optimizer_loaded_in_place(
    optimizer: torch.optim.Optimizer, values: Mapping[str, Any], targets: Mapping[str, Any] | None
) -> bool:
    """Finish loading ``values`` (an optimizer state dict by parameter name) into ``optimizer`` if its tensors are
    already the live state's, planned as ``targets``; returns whether it did (nothing is changed otherwise)."""
    if targets is None or not _plain_optimizer(optimizer) or set(values) != {"state", "param_groups"}:
        return False
    state, planned = values["state"], targets.get("state")
    groups, planned_groups = values["param_groups"], targets.get("param_groups")
    if not isinstance(state, Mapping) or not isinstance(planned, Mapping) or not isinstance(groups, list):
        return False
    if not isinstance(planned_groups, list) or not len(groups) == len(planned_groups) == len(optimizer.param_groups):
        return False
    owner = {id(v): p for p, s in optimizer.state.items() for v in s.values() if isinstance(v, torch.Tensor)}
    assigned: list[tuple[torch.Tensor, str, Any]] = []
    loaded: set[torch.Tensor] = set()
    for name, entry in state.items():
        target = planned.get(name)
        if not isinstance(entry, Mapping) or not isinstance(target, Mapping) or set(entry) != set(target):
            return False
        params = {owner.get(id(v)) for v in target.values() if isinstance(v, torch.Tensor)}
        param = params.pop() if len(params) == 1 else None
        if param is None:
            return False
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                live = optimizer.state[param].get(key)
                if type(value) not in _PLAIN or value is not target[key] or live is not value:
                    return False
            else:
                assigned.append((param, key, value))
        loaded.add(param)
    for group, planned_group in zip(groups, planned_groups):
        if not isinstance(group, Mapping) or list(group.get("params", ())) != list(planned_group.get("params", ())):
            return False
    for param, key, value in assigned:
        optimizer.state[param][key] = value
    for param in [p for p in optimizer.state if p not in loaded]:
        del optimizer.state[param]
    for live, group in zip(optimizer.param_groups, groups):
        new = {key: value for key, value in group.items() if key != "params"}
        new["params"] = live["params"]
        if "param_names" in live and "param_names" not in new:
            new["param_names"] = live["param_names"]
        live.clear()
        live.update(new)
    optimizer.__setstate__({"state": optimizer.state, "param_groups": optimizer.param_groups})
    return True


def _plain_optimizer(optimizer: Any) -> bool:
    return (
        isinstance(optimizer, torch.optim.Optimizer)
        and type(optimizer).load_state_dict is torch.optim.Optimizer.load_state_dict
        and not optimizer._optimizer_load_state_dict_pre_hooks
        and not optimizer._optimizer_load_state_dict_post_hooks
    )


__all__ = ["loaded_in_place", "optimizer_loaded_in_place"]
