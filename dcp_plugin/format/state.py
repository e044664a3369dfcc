"""``Stateful`` wrappers for what a training loop checkpoints.

Models and optimizers go through ``torch.distributed.checkpoint.state_dict`` so their keys are canonical
fully qualified parameter names: plain, DDP, FSDP2 and tensor-parallel models save and load alike, and
optimizer state is keyed by parameter name rather than by integer id.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.checkpoint.stateful import Stateful


class ModelState(Stateful):
    """A model's parameters and buffers under canonical FQN keys (sharded tensors stay sharded)."""

    defines_structure = True
    """Tensors the live model has but the checkpoint lacks (or the other way) are reported on load."""

    def __init__(self, model: torch.nn.Module, options: StateDictOptions | None = None) -> None:
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"ModelState wraps a torch.nn.Module, got {type(model).__name__}.")
        self.model = model
        """The live module (plain, DDP, FSDP2 or tensor-parallel) whose state is saved and loaded in place."""
        self.options = options
        """``StateDictOptions`` for torch's ``get/set_model_state_dict`` (``None``: torch's defaults)."""

    def state_dict(self) -> dict[str, Any]:
        """The model's parameters and buffers by FQN, as ``get_model_state_dict`` gives them (no copies)."""
        return get_model_state_dict(self.model, options=self.options)

    def load_state_dict(self, state_dict: dict[str, Any], strict: bool = True) -> None:
        """Copy ``state_dict`` into the live model; ``strict=False`` leaves tensors the checkpoint lacks as they are."""
        options = self.options
        if not strict:
            options = dataclasses.replace(options or StateDictOptions(), strict=False)
        set_model_state_dict(self.model, state_dict, options=options)


class OptimizerState(Stateful):
    """An optimizer's state and param groups keyed by parameter FQN (survives resharding and resume)."""

    defines_structure = True
    """State the live optimizer has but the checkpoint lacks (or the other way) is reported on load."""

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer | Iterable[torch.optim.Optimizer],
        options: StateDictOptions | None = None,
    ) -> None:
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"OptimizerState needs the model the optimizer trains, got {type(model).__name__}.")
        self.model = model
        """The module whose parameters the optimizer trains: its FQNs become the state's keys."""
        self.optimizer = optimizer
        """The live optimizer, or several over the same model (their states are merged under FQN keys)."""
        self.options = options
        """``StateDictOptions`` for torch's ``get/set_optimizer_state_dict`` (``None``: torch's defaults)."""

    @property
    def optimizers(self) -> list[torch.optim.Optimizer]:
        """The wrapped optimizers as a list, one or several."""
        if isinstance(self.optimizer, torch.optim.Optimizer):
            return [self.optimizer]
        return list(self.optimizer)

    def state_dict(self) -> dict[str, Any]:
        """State and param groups by parameter FQN; an optimizer that never stepped is recorded as such."""
        # torch materialises the state of an optimizer that never stepped with a zero-lr step. That must not
        # leak into training (AdamW's step count would be off by one), so undo it and remember it was empty.
        never_stepped = all(not optimizer.state for optimizer in self.optimizers)
        state_dict = get_optimizer_state_dict(self.model, self.optimizer, options=self.options)
        if never_stepped:
            for optimizer in self.optimizers:
                optimizer.state.clear()
            state_dict = {**state_dict, _NEVER_STEPPED: True}
        return state_dict

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore state and param groups into the live optimizer(s); a never-stepped save leaves them empty."""
        state_dict = dict(state_dict)
        never_stepped = state_dict.pop(_NEVER_STEPPED, False)
        set_optimizer_state_dict(self.model, self.optimizer, state_dict, options=self.options)
        if never_stepped:
            for optimizer in self.optimizers:
                optimizer.state.clear()


_NEVER_STEPPED = "dcp_plugin_never_stepped"


class RNGState(Stateful):
    """Python, NumPy and torch (CPU and CUDA) random generator states of this process.

    Saved per rank: on load each rank gets back its own generators. When a checkpoint is loaded on more
    ranks than saved it, the extra ranks take rank 0's state.
    """

    per_rank = True
    """Each rank saves and gets back its own generators."""

    def state_dict(self) -> dict[str, Any]:
        """The current generator states (``python``, ``torch``, ``numpy``, and ``cuda`` when CUDA is in use)."""
        state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
        try:
            import numpy as np

            state["numpy"] = np.random.get_state()
        except ImportError:  # pragma: no cover
            pass
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Set this process's generators to the saved states (CUDA only where it is available)."""
        random.setstate(state_dict["python"])
        torch.set_rng_state(state_dict["torch"])
        if "numpy" in state_dict:
            import numpy as np

            np.random.set_state(state_dict["numpy"])
        if "cuda" in state_dict and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state_dict["cuda"])


class PerRank(Stateful):
    """Marks a value (or Stateful) whose content differs between ranks, so each rank keeps its own copy.

    Values that are not marked are taken to be the same on every rank and stored once; where they differ anyway,
    every rank loads rank 0's copy.
    """

    per_rank = True
    """Each rank saves and gets back its own copy."""

    def __init__(self, value: Any) -> None:
        self.value = value
        """The wrapped value; after a load, this rank's saved copy (a ``Stateful`` is loaded in place instead)."""

    def state_dict(self) -> Any:
        """The value to save: a ``Stateful``'s ``state_dict()``, otherwise the value itself."""
        return self.value.state_dict() if isinstance(self.value, Stateful) else self.value

    def load_state_dict(self, state_dict: Any) -> None:
        """Load this rank's copy: into the wrapped ``Stateful``, or as the new :attr:`value`."""
        if isinstance(self.value, Stateful):
            self.value.load_state_dict(state_dict)
        else:
            self.value = state_dict


def is_per_rank(value: Any) -> bool:
    return bool(getattr(value, "per_rank", False))


def defines_structure(value: Any) -> bool:
    return bool(getattr(value, "defines_structure", False))


def wrap_state(state: Mapping[str, Any]) -> dict[str, Any]:
    """Wrap bare modules and optimizers in the canonical-key wrappers.

    An optimizer can only be keyed by parameter name when we know its model, so a bare optimizer needs
    exactly one bare module next to it; otherwise wrap it yourself with :class:`OptimizerState`.
    """
    if not isinstance(state, Mapping):
        raise TypeError(f"state must be a mapping of names to objects, got {type(state).__name__}.")
    for key in state:
        if not isinstance(key, str) or not key:
            raise TypeError(f"State entry names must be non-empty strings, got {key!r}.")
        if "/" in key or key.startswith("__"):
            raise ValueError(f"State entry name {key!r} may not contain '/' or start with '__'.")
    modules = [v for v in state.values() if isinstance(v, torch.nn.Module)]
    wrapped: dict[str, Any] = {}
    for key, value in state.items():
        if isinstance(value, torch.nn.Module):
            wrapped[key] = ModelState(value)
        elif isinstance(value, torch.optim.Optimizer):
            if len(modules) != 1:
                raise ValueError(
                    f"Cannot tell which model the optimizer {key!r} trains ({len(modules)} modules in the state). "
                    f"Pass OptimizerState(model, optimizer) for {key!r}."
                )
            wrapped[key] = OptimizerState(modules[0], value)
        else:
            wrapped[key] = value
    return wrapped


def models_in(state: Mapping[str, Any]) -> list[torch.nn.Module]:
    return [value.model for value in state.values() if isinstance(value, ModelState)]


def optimizers_in(state: Mapping[str, Any]) -> list[torch.optim.Optimizer]:
    found: list[torch.optim.Optimizer] = []
    for value in state.values():
        if isinstance(value, OptimizerState):
            found.extend(value.optimizers)
    return found
