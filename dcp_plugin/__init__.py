"""dcp-plugin: asynchronous, sharded, resharding PyTorch Distributed Checkpoint for training loops.

The framework-agnostic core is :class:`CheckpointManager` (a directory of checkpoints: a :class:`Checkpointer`
for single checkpoints plus a :class:`Schedule` for when to save and what to keep); Lightning and Accelerate
adapters live in
``dcp_plugin.lightning`` and ``dcp_plugin.accelerate`` (imported on their own, so the core does not import
Lightning or Accelerate).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from dcp_plugin import logs
from dcp_plugin._lazy import lazy_getattr

__version__ = "0.4.0.dev0"
"""The version these sources are: 0.4.0 in development (the last release is 0.3.0; see CHANGELOG.md)."""

if TYPE_CHECKING:
    from dcp_plugin.checkpointer import Checkpointer
    from dcp_plugin.config import CheckpointConfig
    from dcp_plugin.engine.checkpoint_engine import CheckpointEngine
    from dcp_plugin.engine.stats import SaveStats
    from dcp_plugin.errors import (
        CheckpointCorruptError,
        CheckpointError,
        CheckpointExistsError,
        CheckpointIncompleteError,
        CheckpointLoadError,
        CheckpointNotFoundError,
        CheckpointSaveError,
        ConfigError,
        NotACheckpointError,
        StorageAccessError,
        UnsafeCheckpointError,
    )
    from dcp_plugin.export.exporter import ExportResult, export_checkpoint
    from dcp_plugin.format.encoding import EncodingError
    from dcp_plugin.format.packing import StateMismatchError
    from dcp_plugin.format.state import ModelState, OptimizerState, PerRank, RNGState
    from dcp_plugin.manager import CheckpointManager
    from dcp_plugin.policies import (
        EveryNSeconds,
        EveryNSteps,
        KeepBest,
        KeepEveryNSteps,
        KeepLast,
        OnEpochEnd,
        OnException,
        OnPreemption,
        RetentionOptions,
        RetentionPolicy,
        SaveOptions,
        SavePolicy,
    )
    from dcp_plugin.policies.budget import OverheadBudget
    from dcp_plugin.policies.schedule import Schedule
    from dcp_plugin.storage import CheckpointInfo, CheckpointStorage
    from dcp_plugin.tiers.replication import ReplicationError
    from dcp_plugin.tiers.two_tiers import RemoteTier

# Public names are imported on first use (PEP 562), so ``import dcp_plugin`` and the ``dcp-plugin`` command start
# without importing torch; ``from dcp_plugin import CheckpointManager`` works as before.
_LAZY = {
    "OverheadBudget": "dcp_plugin.policies.budget",
    "Checkpointer": "dcp_plugin.checkpointer",
    "CheckpointConfig": "dcp_plugin.config",
    "EncodingError": "dcp_plugin.format.encoding",
    "CheckpointEngine": "dcp_plugin.engine.checkpoint_engine",
    "ExportResult": "dcp_plugin.export.exporter",
    "export_checkpoint": "dcp_plugin.export.exporter",
    "CheckpointCorruptError": "dcp_plugin.errors",
    "CheckpointError": "dcp_plugin.errors",
    "CheckpointExistsError": "dcp_plugin.errors",
    "CheckpointIncompleteError": "dcp_plugin.errors",
    "CheckpointLoadError": "dcp_plugin.errors",
    "CheckpointNotFoundError": "dcp_plugin.errors",
    "CheckpointSaveError": "dcp_plugin.errors",
    "ConfigError": "dcp_plugin.errors",
    "NotACheckpointError": "dcp_plugin.errors",
    "StorageAccessError": "dcp_plugin.errors",
    "UnsafeCheckpointError": "dcp_plugin.errors",
    "CheckpointManager": "dcp_plugin.manager",
    "StateMismatchError": "dcp_plugin.format.packing",
    "EveryNSeconds": "dcp_plugin.policies",
    "EveryNSteps": "dcp_plugin.policies",
    "KeepBest": "dcp_plugin.policies",
    "KeepEveryNSteps": "dcp_plugin.policies",
    "KeepLast": "dcp_plugin.policies",
    "OnEpochEnd": "dcp_plugin.policies",
    "OnException": "dcp_plugin.policies",
    "OnPreemption": "dcp_plugin.policies",
    "RetentionOptions": "dcp_plugin.policies",
    "RetentionPolicy": "dcp_plugin.policies",
    "SaveOptions": "dcp_plugin.policies",
    "SavePolicy": "dcp_plugin.policies",
    "ReplicationError": "dcp_plugin.tiers.replication",
    "RemoteTier": "dcp_plugin.tiers.two_tiers",
    "Schedule": "dcp_plugin.policies.schedule",
    "ModelState": "dcp_plugin.format.state",
    "OptimizerState": "dcp_plugin.format.state",
    "PerRank": "dcp_plugin.format.state",
    "RNGState": "dcp_plugin.format.state",
    "SaveStats": "dcp_plugin.engine.stats",
    "CheckpointInfo": "dcp_plugin.storage",
    "CheckpointStorage": "dcp_plugin.storage",
}


__getattr__ = lazy_getattr(__name__, _LAZY)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


logs.apply_environment_level()

__all__ = [
    "EveryNSeconds",
    "EveryNSteps",
    "KeepBest",
    "KeepEveryNSteps",
    "KeepLast",
    "OnEpochEnd",
    "OnException",
    "OnPreemption",
    "OverheadBudget",
    "RetentionOptions",
    "RetentionPolicy",
    "SaveOptions",
    "SavePolicy",
    "CheckpointConfig",
    "CheckpointCorruptError",
    "CheckpointEngine",
    "CheckpointError",
    "CheckpointExistsError",
    "CheckpointIncompleteError",
    "CheckpointInfo",
    "CheckpointLoadError",
    "CheckpointManager",
    "CheckpointNotFoundError",
    "CheckpointSaveError",
    "CheckpointStorage",
    "Checkpointer",
    "ConfigError",
    "EncodingError",
    "ExportResult",
    "ModelState",
    "NotACheckpointError",
    "OptimizerState",
    "PerRank",
    "RNGState",
    "RemoteTier",
    "ReplicationError",
    "SaveStats",
    "Schedule",
    "StateMismatchError",
    "StorageAccessError",
    "UnsafeCheckpointError",
    "__version__",
    "export_checkpoint",
]
