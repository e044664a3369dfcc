"""Policies: when to save, what to keep, and the :class:`Schedule` that applies both.

- :mod:`dcp_plugin.policies.save`: save policies ("should this step be checkpointed?") that compose with ``|``
  and how their votes are agreed across ranks;
- :mod:`dcp_plugin.policies.retention`: retention policies ("which checkpoints stay?"), planned without I/O and
  applied by one function;
- :mod:`dcp_plugin.policies.budget`: :class:`OverheadBudget`, a save policy that keeps checkpointing under a share
  of training time;
- :mod:`dcp_plugin.policies.schedule`: :class:`Schedule`, the one save decision of a manager or adapter.

Every public name is re-exported here, so ``from dcp_plugin.policies import KeepLast`` works.
"""

from __future__ import annotations

import warnings
from typing import Any

from dcp_plugin.policies.budget import OverheadBudget
from dcp_plugin.policies.retention import (
    KeepAny,
    KeepBest,
    KeepEveryNSteps,
    KeepLast,
    RetentionOptions,
    RetentionPolicy,
    metric_value,
)
from dcp_plugin.policies.save import (
    AnyOf,
    EveryNSeconds,
    EveryNSteps,
    OnEpochEnd,
    OnException,
    OnPreemption,
    SaveContext,
    SaveDecision,
    SaveEvent,
    SaveOptions,
    SavePolicy,
    as_metrics,
    decide,
)
from dcp_plugin.policies.schedule import Schedule

# Moved to dcp_plugin.policies.retention (planning and applying retention lives in one module); kept for one release.
_MOVED_TO_RETENTION = ("RetentionPlan", "plan_retention", "apply_retention")


def __getattr__(name: str) -> Any:
    if name in _MOVED_TO_RETENTION:
        warnings.warn(
            f"dcp_plugin.policies.{name} moved to dcp_plugin.policies.retention.{name}.",
            DeprecationWarning,
            stacklevel=2,
        )
        from dcp_plugin.policies import retention

        return getattr(retention, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "AnyOf",
    "EveryNSeconds",
    "EveryNSteps",
    "KeepAny",
    "KeepBest",
    "KeepEveryNSteps",
    "KeepLast",
    "OnEpochEnd",
    "OnException",
    "OnPreemption",
    "OverheadBudget",
    "RetentionOptions",
    "RetentionPolicy",
    "SaveContext",
    "SaveDecision",
    "SaveEvent",
    "SaveOptions",
    "SavePolicy",
    "Schedule",
    "as_metrics",
    "decide",
    "metric_value",
]
