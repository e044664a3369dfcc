"""``Schedule``: when to save and what to keep, for one run, in one place.

A schedule holds a save policy, a retention policy and the run's id, remembers the last saved step, and
does the work due after a save committed (retention). :class:`~dcp_plugin.manager.CheckpointManager`, the
Lightning callback and the Accelerate adapter each hold one; none of them re-implements a decision.

The save decision (:meth:`Schedule.decide`) is made here and only here:

* the policies vote and the votes are agreed across ranks (:func:`dcp_plugin.policies.decide`), through the
  ``all_gather`` the caller passes in, except while an exception propagates (the other ranks are not there);
* a step that was already saved is not saved again (a checkpoint of it exists);
* on an exception, only a single-process run saves (a collective save needs every rank);
* after a preemption signal or on an exception the save must be committed before the caller goes on
  (:attr:`Verdict.flush`), and after a preemption training should stop (:attr:`Verdict.stop`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from dcp_plugin.policies.retention import Owned, RetentionPlan, RetentionPolicy, apply_retention
from dcp_plugin.policies.save import SAVE_EVENTS, SaveContext, SaveDecision, SavePolicy, decide

if TYPE_CHECKING:
    from dcp_plugin.storage import CheckpointStorage

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Verdict:
    """What the caller does at this point of the loop."""

    decision: SaveDecision
    """The agreed vote of the policies (``reasons`` say which fired)."""
    save: bool = False
    """Write a checkpoint of this step now."""
    flush: bool = False
    """Wait until it is committed before going on (preemption, exception)."""
    stop: bool = False
    """A preemption signal arrived: stop training once flushed."""

    def __bool__(self) -> bool:
        return self.save


class Schedule:
    """Save policy + retention + the last saved step + after-commit work, for one run.

    Args:
        save_policy: when to save, e.g. ``EveryNSteps(500) | OnPreemption()`` (``None``: never by itself).
        retention: which committed checkpoints of this run to keep, e.g. ``KeepLast(3)`` (``None``: all).
        run_id: the run whose checkpoints retention may delete.
        owned: instead of ``run_id``, which listed checkpoints retention may delete (e.g. every
            automatically named one, as Accelerate's ``total_limit`` counts them).
    """

    def __init__(
        self,
        save_policy: SavePolicy | None = None,
        retention: RetentionPolicy | None = None,
        run_id: str | None = None,
        *,
        owned: Owned | None = None,
    ) -> None:
        if save_policy is not None and not isinstance(save_policy, SavePolicy):
            raise TypeError(
                f"save_policy must be a SavePolicy (e.g. EveryNSteps(100)), got {type(save_policy).__name__}."
            )
        if retention is not None and not isinstance(retention, RetentionPolicy):
            raise TypeError(f"retention must be a RetentionPolicy (e.g. KeepLast(3)), got {type(retention).__name__}.")
        self.save_policy = save_policy
        """When to save (``None``: never by itself, only on explicit saves)."""
        self.retention = retention
        """Which committed checkpoints of this run to keep (``None``: all)."""
        self.run_id = run_id
        """The run whose checkpoints retention may delete (matched against each manifest)."""
        self.owned = owned
        """Instead of :attr:`run_id`: picks the listed checkpoints retention may delete."""
        self.last_saved_step: int | None = None
        """The step of the last save started (``None`` before the first); a step is not saved twice."""
        self.last_decision: SaveDecision | None = None
        """The save policy's last decision, with the policies that fired (``None`` before the first)."""
        self._retention_due = False

    # -- process-wide resources of the policies (signal handlers) -------------------------------
    def install(self) -> None:
        """Install the save policy's process-wide resources (the signal handlers of ``OnPreemption``)."""
        if self.save_policy is not None:
            self.save_policy.install()

    def uninstall(self) -> None:
        """Remove what :meth:`install` installed (restores the previous signal handlers)."""
        if self.save_policy is not None:
            self.save_policy.uninstall()

    # -- the save decision ------------------------------------------------------------------------
    def decide(self, ctx: SaveContext, all_gather: Callable[[Any], list[Any]] | None = None) -> Verdict:
        """Whether to save ``ctx.step`` now. Call on every rank at the same points of the loop."""
        if ctx.event not in SAVE_EVENTS:
            raise ValueError(f"event must be one of {', '.join(SAVE_EVENTS)}; got {ctx.event!r}.")
        exception = ctx.event == "exception"
        # While an exception propagates the other ranks may not be here: no collectives then.
        decision = decide(self.save_policy, ctx, None if exception else all_gather)
        self.last_decision = decision
        if not decision:
            return Verdict(decision)
        if exception and ctx.world_size > 1:
            log.warning("Not saving step %s on exception: the other ranks cannot join a save now.", ctx.step)
            return Verdict(decision)
        return Verdict(
            decision,
            save=ctx.step != self.last_saved_step,
            flush=decision.preemption or exception,
            stop=decision.preemption,
        )

    def acknowledge(self, ctx: SaveContext, verdict: Verdict) -> None:
        """After acting on ``verdict``: the policies learn that a checkpoint of ``ctx.step`` exists."""
        if verdict.decision and (verdict.save or ctx.step == self.last_saved_step) and self.save_policy is not None:
            self.save_policy.saved(ctx)

    def saved(self, step: int) -> None:
        """A save of ``step`` was started (by a decision or a direct ``save`` call)."""
        self.last_saved_step = step
        self._retention_due = True

    def request_retention(self) -> None:
        """Apply retention at the next :meth:`after_commit` even without a new save (e.g. a checkpoint that
        retention had to keep is no longer protected)."""
        self._retention_due = True

    # -- after-commit work ------------------------------------------------------------------------
    def after_commit(
        self,
        storage: CheckpointStorage,
        *,
        coordinator: bool = True,
        writing: bool = False,
        protected: Iterable[str] = (),
    ) -> RetentionPlan | None:
        """Apply retention once a save committed: on the coordinator only, never while a write is in flight,
        never to the names in ``protected`` (e.g. checkpoints still being replicated)."""
        if self.retention is None or not self._retention_due or not coordinator or writing:
            return None
        self._retention_due = False
        return apply_retention(self.retention, storage, run_id=self.run_id, owned=self.owned, protected=protected)


__all__ = ["Schedule", "Verdict"]
