"""A model's and an optimizer's state dicts by parameter name, for models whose names need no translation.

torch's ``get_model_state_dict`` / ``get_optimizer_state_dict`` give state dicts under canonical names: they strip
what wrappers add to a parameter's name (DDP's ``module.``, FSDP's ``_fsdp_wrapped_module.``, ``torch.compile``'s
``_orig_mod.``, activation checkpointing's ``_checkpoint_wrapped_module.``, a module's ``_fqn_modifiers``). To do
so they walk the module tree once per parameter, twice per call: about 30 microseconds per parameter each, most of
a load's own cost for a model of thousands of small tensors. In a model without any of those wrappers, every
canonical name is the name ``Module.named_parameters`` gives, so a load takes the same state dicts from
``Module.state_dict()`` and ``Optimizer.state_dict()`` directly (the same tensors, the same keys, in the same order
as torch's helpers produce them; checked against them in ``tests/format/test_in_place.py``). Any wrapper, sharded
parameter (DTensor), option or empty model goes through torch's helpers.
"""

from __future__ import annotations

from itertools import chain
from typing import Any

import torch
from torch.distributed.checkpoint.state_dict import _init_optim_state

_PLAIN = (torch.Tensor, torch.nn.Parameter)
_WRAPPED = "_checkpoint_wrapped_module"


def _wrapper_types() -> tuple[type, ...]:
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.nn.parallel import DistributedDataParallel

    return (DistributedDataParallel, FullyShardedDataParallel, torch._dynamo.eval_frame.OptimizedModule)


def names_are_canonical(model: torch.nn.Module) -> bool:
    """Whether every parameter's and buffer's name in ``model`` is its canonical name (see the module docstring)."""
    wrappers = _wrapper_types()
    for name, module in model.named_modules():
        if isinstance(module, wrappers) or hasattr(module, "_fqn_modifiers") or _WRAPPED in name:
            return False
    return all(type(param) in _PLAIN for param in model.parameters())


def model_state_dict(model: torch.nn.Module) -> dict[str, Any] | None:
    """``get_model_state_dict(model)`` of a model whose names are canonical, else ``None``."""
    if not names_are_canonical(model):
        return None
    state = model.state_dict()
    return state if state else None  # torch's helper refuses an empty model: let it say so


def optimizer_state_dict(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any] | None:
    """``get_optimizer_state_dict(model, optimizer)`` of one optimizer over a model whose names are canonical,
    else ``None``."""
    if type(optimizer).state_dict is not torch.optim.Optimizer.state_dict or not names_are_canonical(model):
        return None
    _init_optim_state(optimizer)  # as torch's helper does (nothing where the optimizer has state)
    saved = optimizer.state_dict()
    params = list(chain.from_iterable(group["params"] for group in optimizer.param_groups))
    index = {param: number for number, param in enumerate(params)}
    names: dict[int, str] = {}
    for name, param in model.named_parameters():
        if param in index:
            names[index[param]] = name
    if len(names) != len(params):
        return None  # parameters the model does not hold: torch's helper says what is wrong
    saved["state"] = {names[number]: value for number, value in saved["state"].items()}
    for group in saved["param_groups"]:
        group["params"] = [names[number] for number in group["params"]]
    return saved


__all__ = ["model_state_dict", "names_are_canonical", "optimizer_state_dict"]
