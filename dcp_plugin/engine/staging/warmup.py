"""Getting the first save ready while training starts: once the first optimizer step has created the optimizer's
state, the writer process (``process`` mode) is started and the staging buffers are prepared in the background
(see :meth:`CheckpointEngine.warm_up` and :meth:`CheckpointEngine.prepare`), so the first save only copies into
them. Used by the Lightning and Accelerate adapters, which see no training loop of their
own; a plain loop calls ``CheckpointManager.prepare`` (or lets ``maybe_save`` do it)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

from torch.optim.optimizer import register_optimizer_step_post_hook

log = logging.getLogger(__name__)


_spent: list[Any] = []
"""Handles of hooks that already ran: a hook cannot remove itself while torch iterates over the hooks."""


def prepare_after_first_step(checkpointer: Callable[[], Any], state: Callable[[], Mapping[str, Any]]) -> Any:
    """After the next optimizer step of this process (any optimizer), once: ``checkpointer().engine.warm_up()``
    and ``checkpointer().prepare(state())``.
    ``checkpointer`` may return ``None`` (nothing to prepare any more). Returns the hook's handle."""
    while _spent:
        _spent.pop().remove()
    pending: dict[str, Any] = {"checkpointer": checkpointer, "state": state}  # emptied once run: no references kept
    handle: Any = None

    def prepare(*_args: Any, **_kwargs: Any) -> None:
        if not pending:
            return
        target_of, state_of = pending.pop("checkpointer"), pending.pop("state")
        _spent.append(handle)
        try:
            target = target_of()
            if target is None:
                return
            # process mode: the writer process starts now, in the background (every rank takes this step), so
            # the first save does not wait seconds for a fresh interpreter; a no-op where it already runs
            target.engine.warm_up()
            if target.engine.needs_prepare:
                target.prepare(state_of())
        except Exception as err:  # noqa: BLE001 - only a head start: the first save does all this itself
            log.warning("Could not prepare the first save ahead of time: %s", err)

    handle = register_optimizer_step_post_hook(prepare)
    return handle


__all__ = ["prepare_after_first_step"]
