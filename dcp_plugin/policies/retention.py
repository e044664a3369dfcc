"""What to keep: retention policies, and the one place retention is planned and applied.

Retention policies answer "which committed checkpoints stay?"; combine them with ``|`` (a checkpoint is
kept if any of them keeps it)::

    retention = KeepLast(3) | KeepEveryNSteps(10_000) | KeepBest("val_loss", k=2, mode="min")

The policies and :func:`plan_retention` are pure (a listing in, names out). :func:`apply_retention` is the
only function here that touches storage: it lists and deletes through the ``CheckpointStorage`` it is given
(called by :class:`~dcp_plugin.policies.schedule.Schedule` after a save committed).
"""

from __future__ import annotations

import logging
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from dcp_plugin.storage import CheckpointInfo, CheckpointStorage

log = logging.getLogger(__name__)


class RetentionPolicy(ABC):
    """Chooses which committed checkpoints of a run to keep; the others may be deleted."""

    @abstractmethod
    def keep(self, checkpoints: Sequence[CheckpointInfo]) -> set[str]:
        """Names to keep among ``checkpoints`` (committed, written by this run, oldest first)."""

    def leaves(self) -> list[RetentionPolicy]:
        """The elementary policies inside (itself for an elementary policy)."""
        return [self]

    def __or__(self, other: RetentionPolicy) -> KeepAny:
        if not isinstance(other, RetentionPolicy):
            return NotImplemented
        return KeepAny(self, other)


class KeepAny(RetentionPolicy):
    """Keep a checkpoint when any of the policies keeps it."""

    def __init__(self, *policies: RetentionPolicy) -> None:
        flat: list[RetentionPolicy] = []
        for policy in policies:
            if not isinstance(policy, RetentionPolicy):
                raise TypeError(f"KeepAny combines RetentionPolicy objects, got {type(policy).__name__}.")
            flat.extend(policy.leaves())
        if not flat:
            raise ValueError("KeepAny needs at least one retention policy.")
        self.policies = tuple(flat)

    def keep(self, checkpoints: Sequence[CheckpointInfo]) -> set[str]:
        kept: set[str] = set()
        for policy in self.policies:
            kept |= policy.keep(checkpoints)
        return kept

    def leaves(self) -> list[RetentionPolicy]:
        return list(self.policies)

    def __repr__(self) -> str:
        return " | ".join(repr(p) for p in self.policies)


class KeepLast(RetentionPolicy):
    """Keep the ``k`` most recent checkpoints."""

    def __init__(self, k: int) -> None:
        check_positive_int("KeepLast(k)", k)
        self.k = k
        """How many of the newest checkpoints are kept."""

    def keep(self, checkpoints: Sequence[CheckpointInfo]) -> set[str]:
        """The names of the :attr:`k` newest checkpoints."""
        return {info.name for info in checkpoints[-self.k :]}

    def __repr__(self) -> str:
        return f"KeepLast({self.k})"


class KeepEveryNSteps(RetentionPolicy):
    """Keep checkpoints whose step is a multiple of ``n`` (long-term snapshots)."""

    def __init__(self, n: int) -> None:
        check_positive_int("KeepEveryNSteps(n)", n)
        self.n = n
        """Checkpoints of steps ``0``, ``n``, ``2n``... are kept."""

    def keep(self, checkpoints: Sequence[CheckpointInfo]) -> set[str]:
        """The names of the checkpoints whose step is a multiple of :attr:`n`."""
        return {info.name for info in checkpoints if info.step is not None and info.step % self.n == 0}

    def __repr__(self) -> str:
        return f"KeepEveryNSteps({self.n})"


class KeepBest(RetentionPolicy):
    """Keep the ``k`` checkpoints with the best value of a logged metric.

    The metric is read from the checkpoint's metadata (``metadata["metrics"][metric]``, as written by
    ``maybe_save(..., metrics=...)``, or ``metadata[metric]``). Checkpoints without it, or with NaN,
    are not kept by this policy. Ties go to the newer checkpoint.
    """

    def __init__(self, metric: str, k: int = 1, mode: Literal["min", "max"] = "min") -> None:
        if not isinstance(metric, str) or not metric:
            raise ValueError("KeepBest(metric) must name a logged metric, e.g. 'val_loss'.")
        check_positive_int("KeepBest(k)", k)
        if mode not in ("min", "max"):
            raise ValueError(f"KeepBest(mode) must be 'min' or 'max', got {mode!r}.")
        self.metric = metric
        """The name of the logged metric checkpoints are ranked by."""
        self.k = k
        """How many of the best-ranked checkpoints are kept."""
        self.mode = mode
        """``min``: lower :attr:`metric` values are better; ``max``: higher ones."""

    def keep(self, checkpoints: Sequence[CheckpointInfo]) -> set[str]:
        """The names of the :attr:`k` checkpoints with the best :attr:`metric` (ties go to the newer one)."""
        return {info.name for info in best_first(checkpoints, self.metric, self.mode)[: self.k]}

    def __repr__(self) -> str:
        return f"KeepBest({self.metric!r}, k={self.k}, mode={self.mode!r})"


def metric_value(info: CheckpointInfo, metric: str) -> float | None:
    """The metric recorded with a checkpoint, or ``None`` when it has none (or NaN)."""
    metadata = info.metadata
    metrics = metadata.get("metrics")
    value = metrics.get(metric) if isinstance(metrics, Mapping) else None
    if value is None:
        value = metadata.get(metric)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        return None
    return float(value)


def best_first(
    checkpoints: Sequence[CheckpointInfo], metric: str, mode: Literal["min", "max"] = "min"
) -> list[CheckpointInfo]:
    """``checkpoints`` that recorded ``metric``, best first (``mode`` "min": lowest); ties go to the newer one."""
    scored = []
    for order, info in enumerate(checkpoints):
        value = metric_value(info, metric)
        if value is not None:
            scored.append((value if mode == "max" else -value, order, info))
    scored.sort(key=lambda item: (item[0], item[1]), reverse=True)
    return [info for _, _, info in scored]


Owned = Callable[["CheckpointInfo"], bool]
"""Which checkpoints of a listing retention may delete (default: those whose manifest has the run's id)."""


@dataclass
class RetentionPlan:
    """What retention decided for one directory."""

    keep: list[str] = field(default_factory=list)
    delete: list[str] = field(default_factory=list)


def plan_retention(
    policy: RetentionPolicy,
    checkpoints: Sequence[CheckpointInfo],
    *,
    run_id: str | None = None,
    owned: Owned | None = None,
    protected: Iterable[str] = (),
) -> RetentionPlan:
    """Which of ``checkpoints`` (a directory listing, oldest first) to delete.

    Only checkpoints written by ``run_id`` are candidates (or, with ``owned``, those it accepts); the newest
    committed checkpoint of the directory and the names in ``protected`` (a write in flight) are always kept.
    """
    if owned is None:
        if run_id is None:
            raise ValueError("plan_retention needs run_id= or owned= to know which checkpoints it may delete.")
        owned = _written_by(run_id)
    ours = [info for info in checkpoints if owned(info)]
    kept = set(policy.keep(ours)) | set(protected)
    if checkpoints:
        kept.add(checkpoints[-1].name)
    if ours:
        kept.add(ours[-1].name)
    plan = RetentionPlan()
    for info in ours:
        (plan.keep if info.name in kept else plan.delete).append(info.name)
    return plan


def apply_retention(
    policy: RetentionPolicy,
    storage: CheckpointStorage,
    *,
    run_id: str | None = None,
    owned: Owned | None = None,
    protected: Iterable[str] = (),
) -> RetentionPlan:
    """Delete what :func:`plan_retention` says in ``storage`` (call on one rank, with no write in flight).

    Never raises for storage problems: a failed listing skips retention, a failed delete is logged and
    tried again the next time.
    """
    try:
        plan = plan_retention(policy, storage.list(), run_id=run_id, owned=owned, protected=protected)
    except Exception as err:  # noqa: BLE001 - retention must never stop training
        log.warning("Retention skipped: listing %s failed: %s", storage.root_url, err)
        return RetentionPlan()
    for name in plan.delete:
        try:
            storage.delete(name)
            log.info("Retention deleted %s.", storage.url(name))
        except Exception as err:  # noqa: BLE001 - a failed delete is retried after the next save
            log.warning("Retention could not delete %s: %s", storage.url(name), err)
    if plan.delete:
        try:
            storage.collect_blobs()  # shared data of incremental checkpoints that no kept checkpoint uses
        except Exception as err:  # noqa: BLE001 - collected again after the next deletion, or by purge
            log.warning("Retention could not remove unused shared data in %s: %s", storage.root_url, err)
    return plan


def _written_by(run_id: str) -> Owned:
    return lambda info: info.manifest.get("run_id") == run_id


@dataclass(frozen=True)
class RetentionOptions:
    """The usual retention rules as plain options; :meth:`build` makes the policy (``None``: keep all)."""

    keep_last: int | None = None
    """Keep the ``keep_last`` most recent checkpoints."""
    keep_every_n_steps: int | None = None
    """Also keep checkpoints whose step is a multiple of this."""
    keep_best: int | None = None
    """Also keep the ``keep_best`` checkpoints with the best ``monitor`` value."""
    monitor: str | None = None
    """The logged metric ``keep_best`` ranks by."""
    mode: Literal["min", "max"] = "min"
    """Whether lower (``min``) or higher (``max``) ``monitor`` values are better."""

    def __post_init__(self) -> None:
        for name in ("keep_last", "keep_every_n_steps", "keep_best"):
            value = getattr(self, name)
            if value is not None:
                check_positive_int(name, value)
        if self.keep_best is not None and not self.monitor:
            raise ValueError("keep_best needs monitor=<metric name> (e.g. monitor='val_loss').")
        if self.monitor is not None and self.keep_best is None:
            raise ValueError(f"monitor={self.monitor!r} is only used with keep_best=<k>; pass keep_best too.")
        if self.mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {self.mode!r}.")

    def build(self) -> RetentionPolicy | None:
        """The policy these options describe (a ``KeepAny`` of the rules set), or ``None``: keep all."""
        policies: list[RetentionPolicy] = []
        if self.keep_last is not None:
            policies.append(KeepLast(self.keep_last))
        if self.keep_every_n_steps is not None:
            policies.append(KeepEveryNSteps(self.keep_every_n_steps))
        if self.keep_best is not None:
            assert self.monitor is not None
            policies.append(KeepBest(self.monitor, self.keep_best, self.mode))
        return KeepAny(*policies) if policies else None


def check_positive_int(what: str, value: Any) -> None:
    """Raise ``ValueError`` naming ``what`` unless ``value`` is an integer >= 1 (shared by all policies)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{what} must be a positive integer, got {value!r}.")


__all__ = [
    "KeepAny",
    "KeepBest",
    "KeepEveryNSteps",
    "KeepLast",
    "RetentionOptions",
    "RetentionPlan",
    "RetentionPolicy",
    "apply_retention",
    "best_first",
    "metric_value",
    "plan_retention",
]
