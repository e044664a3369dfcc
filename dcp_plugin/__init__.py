"""dcp-plugin: asynchronous, sharded, resharding PyTorch Distributed Checkpoint for training loops.

The framework-agnostic core is :class:`CheckpointManager` (a directory of checkpoints: a :class:`Checkpointer`
for single checkpoints plus a :class:`Schedule` for when to save and what to keep); Lightning and Accelerate
adapters live in
``dcp_plugin.lightning`` and ``dcp_plugin.accelerate`` (imported on their own, so the core does not import
Lightning or Accelerate).
"""

from dcp_plugin.budget import OverheadBudget
from dcp_plugin.checkpointer import Checkpointer
from dcp_plugin.config import CheckpointConfig
from dcp_plugin.encoding import EncodingError
from dcp_plugin.engine import CheckpointEngine
from dcp_plugin.errors import (
    CheckpointCorruptError,
    CheckpointError,
    CheckpointExistsError,
    CheckpointLoadError,
    CheckpointNotFoundError,
    CheckpointSaveError,
    ConfigError,
    NotACheckpointError,
    StorageAccessError,
    UnsafeCheckpointError,
)
from dcp_plugin.manager import CheckpointManager
from dcp_plugin.packing import StateMismatchError
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
from dcp_plugin.replication import ReplicationError
from dcp_plugin.schedule import Schedule
from dcp_plugin.state import ModelState, OptimizerState, PerRank, RNGState
from dcp_plugin.stats import SaveStats
from dcp_plugin.storage import CheckpointInfo, CheckpointStorage
from dcp_plugin.tiers import RemoteTier

__version__ = "0.1.0"

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
    "CheckpointInfo",
    "CheckpointLoadError",
    "CheckpointManager",
    "CheckpointNotFoundError",
    "CheckpointSaveError",
    "CheckpointStorage",
    "Checkpointer",
    "ConfigError",
    "EncodingError",
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
]
