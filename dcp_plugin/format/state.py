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

from dcp_plugin.format import fast_state, plain_names
from dcp_plugin.format.in_place import loaded_in_place, optimizer_loaded_in_place
from dcp_plugin.format.optim_targets import materialize


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
        self._load_targets: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        """The model's parameters and buffers by FQN, as ``get_model_state_dict`` gives them (no copies)."""
        if self.options is None:
            return fast_state.model_state_dict(self.model)
        return get_model_state_dict(self.model, options=self.options)

    def load_targets(self) -> dict[str, Any]:
        """The :meth:`state_dict` a load reads into (remembered: :meth:`load_state_dict` of exactly these tensors,
        read in place, has nothing left to copy)."""
        plain = plain_names.model_state_dict(self.model) if self.options is None else None
        targets = plain if plain is not None else self.state_dict()
        self._load_targets = targets
        return targets

    def load_state_dict(self, state_dict: dict[str, Any], strict: bool = True) -> None:
        """Copy ``state_dict`` into the live model; ``strict=False`` leaves tensors the checkpoint lacks as they are."""
        targets, self._load_targets = getattr(self, "_load_targets", None), None  # (instances unpickled from 0.3)
        if self.options is None and loaded_in_place(self.model, state_dict, targets):
            return  # every tensor was read into the model's own memory (see dcp_plugin.format.in_place)
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
        self._load_targets: dict[str, Any] | None = None
        self._made_for_load: list[torch.optim.Optimizer] = []

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
        if self.options is None and not never_stepped:
            return fast_state.optimizer_state_dict(self.model, self.optimizers)
        state_dict = get_optimizer_state_dict(self.model, self.optimizer, options=self.options)
        if never_stepped:
            for optimizer in self.optimizers:
                optimizer.state.clear()
            state_dict = {**state_dict, _NEVER_STEPPED: True}
        return state_dict

    def load_targets(self) -> dict[str, Any]:
        """The :meth:`state_dict` a load reads into. An optimizer that never stepped is given the state its first
        step would create (empty tensors, no arithmetic: :mod:`~dcp_plugin.format.optim_targets`) and keeps it for
        :meth:`load_state_dict`; :meth:`discard_load_targets` takes it away again if the load fails."""
        made = [optimizer for optimizer in self.optimizers if not optimizer.state]
        self._made_for_load = [optimizer for optimizer in made if materialize(optimizer)]
        targets: dict[str, Any] | None = None
        if self.options is None and isinstance(self.optimizer, torch.optim.Optimizer):
            targets = plain_names.optimizer_state_dict(self.model, self.optimizer)
        if targets is None:
            targets = dict(get_optimizer_state_dict(self.model, self.optimizer, options=self.options))
        self._load_targets = targets
        return targets

    def discard_load_targets(self) -> None:
        """After a failed load: optimizers :meth:`load_targets` gave state to have none again."""
        for optimizer in getattr(self, "_made_for_load", ()):
            optimizer.state.clear()
        self._made_for_load = []

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore state and param groups into the live optimizer(s); a never-stepped save leaves them empty."""
        state_dict = dict(state_dict)
        never_stepped = state_dict.pop(_NEVER_STEPPED, False)
        self._made_for_load = []
        targets, self._load_targets = getattr(self, "_load_targets", None), None
        single = self.optimizer if isinstance(self.optimizer, torch.optim.Optimizer) else None
        if not (self.options is None and single is not None and optimizer_loaded_in_place(single, state_dict, targets)):
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


def load_targets(value: Any) -> Any:
    """What a load of the state entry ``value`` reads into: ``load_targets()`` of the model and optimizer wrappers,
    ``state_dict()`` of any other ``Stateful``, the value itself otherwise."""
    if isinstance(value, (ModelState, OptimizerState)):
        return value.load_targets()
    return value.state_dict() if isinstance(value, Stateful) else value


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
