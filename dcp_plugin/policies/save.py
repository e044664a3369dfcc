"""When to save: small policy objects that compose (what to keep lives in :mod:`dcp_plugin.policies.retention`).

Save policies answer "should this step be checkpointed?"; combine them with ``|`` (any of them fires)::

    policy = EveryNSteps(500) | EveryNSeconds(1800) | OnPreemption()

Both kinds are applied by a :class:`~dcp_plugin.policies.schedule.Schedule` (inside ``CheckpointManager``, the
Lightning callback and the Accelerate adapter). The policies themselves do no I/O and no collectives:
each one declares how its local vote is agreed across ranks (:attr:`SavePolicy.agreement`) and
:func:`decide` gathers all votes in one collective, only when some policy needs it.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from dcp_plugin.policies.retention import check_positive_int

log = logging.getLogger(__name__)

SaveEvent = Literal["step", "epoch_end", "exception"]
"""Where in the loop ``maybe_save`` is called: after a training step, at the end of a training epoch, or
while an exception propagates."""

Agreement = Literal["local", "coordinator", "any"]

SAVE_EVENTS = ("step", "epoch_end", "exception")


@dataclass(frozen=True)
class SaveContext:
    """What a save policy sees when it is asked."""

    step: int
    event: SaveEvent = "step"
    epoch: int | None = None
    """The training epoch that just ended (``event="epoch_end"``), when the loop knows it."""
    world_size: int = 1


@dataclass(frozen=True)
class SaveDecision:
    """The agreed outcome of asking the save policies: whether to save and which policies fired."""

    save: bool
    reasons: tuple[str, ...] = ()

    @property
    def preemption(self) -> bool:
        """A preemption signal was received (on any rank): save synchronously, then stop."""
        return OnPreemption.reason in self.reasons

    def __bool__(self) -> bool:
        return self.save


# -- when to save --------------------------------------------------------------------------------
class SavePolicy(ABC):
    """Decides whether a step is checkpointed.

    Subclasses implement :meth:`wants_save` (this rank's vote) and set :attr:`agreement`:
    ``"local"`` when every rank votes the same by construction (step counts), ``"coordinator"`` when rank
    0's vote is taken (wall clocks differ between ranks), ``"any"`` when one rank's vote is enough
    (a signal delivered to one rank).
    """

    agreement: ClassVar[Agreement] = "local"
    """How the ranks' votes combine: ``local`` (all vote alike), ``coordinator`` (rank 0 decides), ``any``."""
    reason: ClassVar[str] = "policy"
    """The label of the saves this policy triggers, listed in ``SaveDecision.reasons``."""

    @abstractmethod
    def wants_save(self, ctx: SaveContext) -> bool:
        """This rank's vote for checkpointing ``ctx.step``."""

    def saved(self, ctx: SaveContext) -> None:  # noqa: B027 - optional hook
        """Called on every rank once a checkpoint of ``ctx.step`` was started (whichever policy fired)."""

    def leaves(self) -> list[SavePolicy]:
        """The elementary policies inside (itself for an elementary policy)."""
        return [self]

    def install(self) -> None:  # noqa: B027 - optional hook
        """Acquire process-wide resources (signal handlers). Called by the manager or callback."""

    def uninstall(self) -> None:  # noqa: B027 - optional hook
        """Release what :meth:`install` acquired."""

    def __or__(self, other: SavePolicy) -> AnyOf:
        if not isinstance(other, SavePolicy):
            return NotImplemented
        return AnyOf(self, other)


class AnyOf(SavePolicy):
    """Save when any of the policies fires."""

    def __init__(self, *policies: SavePolicy) -> None:
        flat: list[SavePolicy] = []
        for policy in policies:
            if not isinstance(policy, SavePolicy):
                raise TypeError(f"AnyOf combines SavePolicy objects, got {type(policy).__name__}.")
            flat.extend(policy.leaves())
        if not flat:
            raise ValueError("AnyOf needs at least one save policy.")
        self.policies = tuple(flat)

    def wants_save(self, ctx: SaveContext) -> bool:
        return any(p.wants_save(ctx) for p in self.policies)

    def saved(self, ctx: SaveContext) -> None:
        for policy in self.policies:
            policy.saved(ctx)

    def leaves(self) -> list[SavePolicy]:
        return list(self.policies)

    def install(self) -> None:
        for policy in self.policies:
            policy.install()

    def uninstall(self) -> None:
        for policy in self.policies:
            policy.uninstall()

    def __repr__(self) -> str:
        return " | ".join(repr(p) for p in self.policies)


class EveryNSteps(SavePolicy):
    """Save after steps that are a positive multiple of ``n``."""

    reason = "every_n_steps"
    """Saves it triggers are labelled ``every_n_steps``."""

    def __init__(self, n: int) -> None:
        check_positive_int("EveryNSteps(n)", n)
        self.n = n
        """The step interval: steps ``n``, ``2n``, ``3n``... are saved."""

    def wants_save(self, ctx: SaveContext) -> bool:
        """True after a training step that is a positive multiple of :attr:`n`."""
        return ctx.event == "step" and ctx.step > 0 and ctx.step % self.n == 0

    def __repr__(self) -> str:
        return f"EveryNSteps({self.n})"


class EveryNSeconds(SavePolicy):
    """Save when ``seconds`` have passed since the last checkpoint (or since the first question).

    Rank 0's clock decides, so all ranks save together. ``clock`` returns seconds (default
    :func:`time.monotonic`); pass another to drive the policy in tests.
    """

    agreement = "coordinator"
    """Rank 0's clock decides (the ranks' clocks differ), so all ranks save the same step."""
    reason = "every_n_seconds"
    """Saves it triggers are labelled ``every_n_seconds``."""

    def __init__(self, seconds: float, *, clock: Callable[[], float] = time.monotonic) -> None:
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not seconds > 0:
            raise ValueError(f"EveryNSeconds(seconds) must be a positive number, got {seconds!r}.")
        if not callable(clock):
            raise TypeError("EveryNSeconds(clock=...) must be a callable returning seconds.")
        self.seconds = float(seconds)
        """The wall-clock interval between checkpoints, in seconds."""
        self.clock = clock
        """Returns the current time in seconds (:func:`time.monotonic` unless another was passed)."""
        self._since: float | None = None

    def wants_save(self, ctx: SaveContext) -> bool:
        """True once :attr:`seconds` have passed since the last save; the first call starts the clock."""
        now = self.clock()
        if self._since is None:
            self._since = now
            return False
        return ctx.event == "step" and now - self._since >= self.seconds

    def saved(self, ctx: SaveContext) -> None:
        """Restart the interval from now."""
        self._since = self.clock()

    def __repr__(self) -> str:
        return f"EveryNSeconds({self.seconds:g})"


class OnEpochEnd(SavePolicy):
    """Save at the end of every ``every_n_epochs``-th training epoch (epochs counted from 0)."""

    reason = "epoch_end"
    """Saves it triggers are labelled ``epoch_end``."""

    def __init__(self, every_n_epochs: int = 1) -> None:
        check_positive_int("OnEpochEnd(every_n_epochs)", every_n_epochs)
        self.every_n_epochs = every_n_epochs
        """Save at the end of every this-many-th epoch (``2``: epochs 1, 3, 5..., counted from 0)."""

    def wants_save(self, ctx: SaveContext) -> bool:
        """True at the end of every :attr:`every_n_epochs`-th epoch (every epoch when none is known)."""
        if ctx.event != "epoch_end":
            return False
        return ctx.epoch is None or (ctx.epoch + 1) % self.every_n_epochs == 0

    def __repr__(self) -> str:
        return f"OnEpochEnd({self.every_n_epochs})"


class OnException(SavePolicy):
    """Save while an exception propagates out of the training loop (``event="exception"``).

    Only a single-process run can do this safely: with several ranks, the others are not there to take
    part in the collective save, so the manager skips it with a warning.
    """

    reason = "exception"
    """Saves it triggers are labelled ``exception``."""

    def wants_save(self, ctx: SaveContext) -> bool:
        """True when the question is asked while an exception ends training."""
        return ctx.event == "exception"

    def __repr__(self) -> str:
        return "OnException()"


class OnPreemption(SavePolicy):
    """Save at the next safe point after a preemption signal, on every rank, then ask the loop to stop.

    :meth:`install` adds a handler for ``signals`` (default SIGTERM and SIGUSR1) that only records the
    signal and then calls the handler that was there before (so frameworks that trap SIGTERM themselves
    keep working). The flag is reduced across ranks: a signal on any rank makes all ranks save the same
    step. The default action of the signal (terminate) is replaced, so the loop must stop when told
    (``CheckpointManager.should_stop``).
    """

    agreement = "any"
    """A signal delivered to any one rank makes every rank save."""
    reason = "preemption"
    """Saves it triggers are labelled ``preemption``; the loop is then asked to stop."""

    def __init__(self, signals: Iterable[int] = (signal.SIGTERM, signal.SIGUSR1)) -> None:
        self.signals = tuple(signal.Signals(s) for s in signals)
        """The signals taken as preemption notices."""
        if not self.signals:
            raise ValueError("OnPreemption needs at least one signal.")
        self._received: signal.Signals | None = None
        self._acted = False
        self._previous: dict[signal.Signals, Any] = {}

    def __getstate__(self) -> dict[str, Any]:
        # A copy has installed no handlers and received no signal (the handlers saved here may not pickle).
        return {**self.__dict__, "_previous": {}, "_received": None, "_acted": False}

    @property
    def received(self) -> signal.Signals | None:
        """The signal received by this process, if any."""
        return self._received

    def trigger(self, signum: int = signal.SIGTERM) -> None:
        """Record a preemption as if ``signum`` had been received (for schedulers that notify otherwise)."""
        self._received = signal.Signals(signum)
        self._acted = False

    def wants_save(self, ctx: SaveContext) -> bool:
        """True once after each preemption signal, until a save has started."""
        return self._received is not None and not self._acted

    def saved(self, ctx: SaveContext) -> None:
        # One save per signal: a loop that keeps going after it does not save at every step.
        """Mark the signal as handled, so the following steps do not save again."""
        if self._received is not None:
            self._acted = True

    def install(self) -> None:
        """Handle :attr:`signals` (main thread only; logs a warning elsewhere), chaining the previous handlers."""
        if self._previous:
            return
        if threading.current_thread() is not threading.main_thread():
            log.warning("Preemption signal handlers can only be installed from the main thread; not installed.")
            return
        for signum in self.signals:
            self._previous[signum] = signal.getsignal(signum)
            signal.signal(signum, self._handle)

    def uninstall(self) -> None:
        """Restore the signal handlers that were there before :meth:`install`."""
        if threading.current_thread() is not threading.main_thread():
            return
        for signum, previous in self._previous.items():
            if signal.getsignal(signum) == self._handle:
                signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()

    def _handle(self, signum: int, frame: Any) -> None:
        # Runs between two bytecodes of the main thread: record only, no I/O, no collectives.
        self._received = signal.Signals(signum)
        self._acted = False
        previous = self._previous.get(signal.Signals(signum))
        if callable(previous):
            previous(signum, frame)

    def __repr__(self) -> str:
        return f"OnPreemption({', '.join(s.name for s in self.signals)})"


def decide(
    policy: SavePolicy | None,
    ctx: SaveContext,
    all_gather: Callable[[Any], list[Any]] | None = None,
) -> SaveDecision:
    """Ask ``policy`` about ``ctx`` and agree on the answer across ranks.

    ``all_gather`` (e.g. :meth:`CheckpointEngine.all_gather_control`) is called once, on every rank,
    only when a policy's vote can differ between ranks; every rank must therefore call :func:`decide`
    at the same points with the same policies.
    """
    if policy is None:
        return SaveDecision(False)
    leaves = policy.leaves()
    votes = [bool(leaf.wants_save(ctx)) for leaf in leaves]
    if all_gather is not None and any(leaf.agreement != "local" for leaf in leaves):
        gathered = all_gather(votes)
        for i, leaf in enumerate(leaves):
            column = [rank_votes[i] for rank_votes in gathered]
            if leaf.agreement == "coordinator":
                votes[i] = column[0]
            elif leaf.agreement == "any":
                votes[i] = any(column)
    reasons = tuple(dict.fromkeys(leaf.reason for leaf, vote in zip(leaves, votes) if vote))
    return SaveDecision(bool(reasons), reasons)


@dataclass(frozen=True)
class SaveOptions:
    """The usual save triggers as plain options (what adapters expose); :meth:`build` makes the policy."""

    every_n_steps: int | None = None
    """Save after every ``every_n_steps``-th optimizer step."""
    every_n_seconds: float | None = None
    """Save when this much wall-clock time has passed since the last save (rank 0's clock decides)."""
    every_n_epochs: int | None = None
    """Save at the end of every ``every_n_epochs``-th training epoch."""
    on_signal: bool = True
    """Save at the next step after SIGTERM or SIGUSR1 (on any rank), synchronously, then stop training."""
    signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGUSR1)
    """Which signals mean preemption."""
    on_exception: bool = False
    """Save while an exception ends training (single-process runs only)."""
    clock: Callable[[], float] = time.monotonic
    """Clock of the time trigger (inject one in tests)."""

    def __post_init__(self) -> None:
        if self.every_n_steps is not None:
            check_positive_int("every_n_steps", self.every_n_steps)
        if self.every_n_epochs is not None:
            check_positive_int("every_n_epochs", self.every_n_epochs)
        if self.every_n_seconds is not None and (
            isinstance(self.every_n_seconds, bool)
            or not isinstance(self.every_n_seconds, (int, float))
            or not self.every_n_seconds > 0
        ):
            raise ValueError(f"every_n_seconds must be a positive number, got {self.every_n_seconds!r}.")

    def build(self) -> SavePolicy | None:
        """The policy these options describe (an ``AnyOf`` of the triggers set), or ``None`` when none is."""
        policies: list[SavePolicy] = []
        if self.every_n_steps is not None:
            policies.append(EveryNSteps(self.every_n_steps))
        if self.every_n_seconds is not None:
            policies.append(EveryNSeconds(self.every_n_seconds, clock=self.clock))
        if self.every_n_epochs is not None:
            policies.append(OnEpochEnd(self.every_n_epochs))
        if self.on_signal:
            policies.append(OnPreemption(self.signals))
        if self.on_exception:
            policies.append(OnException())
        return AnyOf(*policies) if policies else None


def as_metrics(metrics: Mapping[str, Any] | None) -> dict[str, float]:
    """Metrics as plain floats for the manifest (tensors and numpy scalars converted; others dropped)."""
    out: dict[str, float] = {}
    for key, value in (metrics or {}).items():
        if hasattr(value, "numel") and value.numel() != 1:
            continue
        try:
            out[str(key)] = float(value)
        except (TypeError, ValueError):
            continue
    return out


__all__ = [
    "AnyOf",
    "EveryNSeconds",
    "EveryNSteps",
    "OnEpochEnd",
    "OnException",
    "OnPreemption",
    "SaveContext",
    "SaveDecision",
    "SaveEvent",
    "SaveOptions",
    "SavePolicy",
    "as_metrics",
    "decide",
]
