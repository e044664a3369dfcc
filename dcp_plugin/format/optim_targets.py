"""The state an optimizer that never stepped is about to be given by a load: its tensors, to read into.

A load matches the checkpoint against the live optimizer's ``state_dict()``, and an optimizer that never stepped
has no state yet. torch's ``get_optimizer_state_dict`` and ``set_optimizer_state_dict`` make it with a step at
learning rate zero over zero gradients: gradients allocated and zeroed, every moment allocated and zeroed, the
optimizer's arithmetic over every parameter, then thrown away, and done again by the second call. Restoring a
model of a few hundred MiB into a fresh optimizer spent most of its time there.

Here the first step is taken by a copy of the optimizer over stand-ins of its parameters on the ``meta`` device
(shapes and dtypes only, no memory, no arithmetic): what it creates says which state each parameter gets, and
the live optimizer is given empty tensors of those shapes (the load's destinations, allocated like
``torch.load`` allocates) and the same plain values. Only torch's own optimizers are stepped that way (their
``step`` touches nothing but their parameter groups and state); any other, or one whose step fails on ``meta``,
takes torch's zero-learning-rate step once, as before. The state made here is removed again if the load fails.
"""

from __future__ import annotations

import copy
import logging
from collections import OrderedDict, defaultdict
from typing import Any

import torch
from torch.distributed.checkpoint.state_dict import _init_optim_state

from dcp_plugin.storage.read_items import mark_placeholder

log = logging.getLogger(__name__)

_PLAIN = (torch.Tensor, torch.nn.Parameter)


def materialize(optimizer: torch.optim.Optimizer) -> bool:
    """Give ``optimizer`` (which has no state) the state its first step would create, with empty tensors where
    that is possible, else with torch's zero-learning-rate step; returns whether it now has state."""
    made = None
    if _steps_only_its_own(optimizer):
        try:
            made = _first_step_state(optimizer)
        except Exception as err:  # noqa: BLE001 - any optimizer torch's fallback handles the old way
            log.debug("The first step of %s on meta tensors failed (%s); stepping it at lr 0", optimizer, err)
    if made is None:
        _init_optim_state(optimizer)
    else:
        for param, state in made.items():
            optimizer.state[param] = state
    return bool(optimizer.state)


def _steps_only_its_own(optimizer: torch.optim.Optimizer) -> bool:
    """A torch optimizer over plain CPU parameters. Parameters on other devices take torch's step: where a first
    step puts each state tensor (``step`` stays on the CPU unless the optimizer is capturable or fused) is not
    visible on ``meta``."""
    cls = type(optimizer)
    return cls.__module__.startswith("torch.optim.") and all(
        type(param) in _PLAIN and param.device.type == "cpu"
        for group in optimizer.param_groups
        for param in group["params"]
    )


def _first_step_state(optimizer: torch.optim.Optimizer) -> dict[torch.Tensor, dict[str, Any]]:
    """The state each parameter of ``optimizer`` has after its first step, taken by a copy on ``meta`` tensors,
    with empty tensors on the parameters' devices in place of the copy's. Parameters alike (group, shape,
    strides, dtype, device, whether they train) get alike state: one stand-in steps for all of them (operations on
    ``meta`` tensors cost about a millisecond each)."""
    stand_ins: dict[tuple[Any, ...], torch.nn.Parameter] = {}
    kind_of: dict[torch.Tensor, tuple[Any, ...]] = {}
    groups = []
    for index, group in enumerate(optimizer.param_groups):
        params = []
        for param in group["params"]:
            kind = (index, tuple(param.shape), param.stride(), param.dtype, param.device, param.requires_grad)
            kind_of[param] = kind
            if kind not in stand_ins:
                stand_in = torch.nn.Parameter(torch.empty_like(param, device="meta"), param.requires_grad)
                if param.requires_grad:
                    stand_in.grad = torch.empty_like(stand_in)
                stand_ins[kind] = stand_in
                params.append(stand_in)
        groups.append({**group, "params": params})
    shadow = copy.copy(optimizer)
    shadow.state = defaultdict(dict)
    shadow.param_groups = groups
    shadow._optimizer_step_pre_hooks = OrderedDict()  # the user's hooks are for the live optimizer
    shadow._optimizer_step_post_hooks = OrderedDict()
    shadow.__dict__.pop("step", None)  # an LR scheduler wraps the live step (copy.copy leaves it out; even so)
    with torch.no_grad():
        _unhooked_step(type(shadow))(shadow)
    made: dict[torch.Tensor, dict[str, Any]] = {}
    for param, kind in kind_of.items():
        state = shadow.state.get(stand_ins[kind])
        if state:
            made[param] = {key: _real(value, param) for key, value in state.items()}
    return made


def _unhooked_step(cls: type) -> Any:
    """``cls.step`` without the wrapper torch's ``Optimizer`` puts around it, which runs the global and the
    optimizer's own step hooks (a stand-in step is no step of the user's: their hooks must not see it)."""
    step = cls.step
    return step.__wrapped__ if getattr(step, "hooked", False) and hasattr(step, "__wrapped__") else step


def _real(value: Any, param: torch.Tensor) -> Any:
    if not isinstance(value, torch.Tensor):
        return copy.deepcopy(value)
    if value.device.type == "meta":  # a placeholder: the load fills it, and a failed load takes it away again
        empty = torch.empty_strided(value.size(), value.stride(), dtype=value.dtype, device=param.device)
        return mark_placeholder(empty)
    return value.clone()


__all__ = ["materialize"]
