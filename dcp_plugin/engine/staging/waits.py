"""With asynchronous staging, the hooks that make the next change of saved tensors wait for the snapshot copy."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch


class StagingWaits:
    """Step pre-hooks on optimizers and forward pre-hooks on models that call ``wait()`` (the engine's
    ``wait_for_staging``): an optimizer step changes parameters and its state, and the forward pass of a model
    with saved buffers changes them (BatchNorm statistics), also outside any optimizer step (gradient
    accumulation, manual optimization). Each object is hooked once; :meth:`remove` takes every hook off."""

    def __init__(self, wait: Callable[[], None]) -> None:
        self._wait = wait
        self._hooks: dict[int, Any] = {}

    def hook(self, optimizers: Iterable[torch.optim.Optimizer], models: Iterable[torch.nn.Module]) -> None:
        """Hook these optimizers, and those of these models whose buffers are saved (once each)."""
        for optimizer in optimizers:
            if id(optimizer) not in self._hooks:
                self._hooks[id(optimizer)] = optimizer.register_step_pre_hook(lambda *_args, **_kw: self._wait())
        for model in models:
            if id(model) not in self._hooks and _has_persistent_buffers(model):
                self._hooks[id(model)] = model.register_forward_pre_hook(lambda *_args: self._wait())

    def remove(self) -> None:
        for handle in self._hooks.values():
            handle.remove()
        self._hooks.clear()


def _has_persistent_buffers(model: Any) -> bool:
    """Whether ``model`` has buffers that are saved (persistent buffers are exactly those in its state dict)."""
    buffers = {name for name, _ in model.named_buffers()}
    return bool(buffers) and not buffers.isdisjoint(model.state_dict(keep_vars=True))


__all__ = ["StagingWaits"]
