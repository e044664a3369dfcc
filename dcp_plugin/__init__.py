"""dcp-plugin: asynchronous, sharded, resharding PyTorch Distributed Checkpoint for training loops.

The framework-agnostic core is :class:`CheckpointManager`; Lightning and Accelerate adapters live in
``dcp_plugin.lightning`` and ``dcp_plugin.accelerate`` (imported on their own, so the core does not import
Lightning or Accelerate).
"""

from dcp_plugin.config import CheckpointConfig, ConfigError
from dcp_plugin.encoding import EncodingError
from dcp_plugin.errors import CheckpointCorruptError, CheckpointError, StorageAccessError
from dcp_plugin.engine import CheckpointEngine, CheckpointLoadError, CheckpointSaveError, SaveStats
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
from dcp_plugin.safety import UnsafeCheckpointError
from dcp_plugin.state import ModelState, OptimizerState, PerRank, RNGState
from dcp_plugin.storage import (
    CheckpointExistsError,
    CheckpointInfo,
    CheckpointNotFoundError,
    CheckpointStorage,
    NotACheckpointError,
)

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
    "RetentionOptions",
    "RetentionPolicy",
    "SaveOptions",
    "SavePolicy",
    "CheckpointConfig",
    "CheckpointCorruptError",
    "CheckpointError",
    "StorageAccessError",
    "CheckpointEngine",
    "CheckpointExistsError",
    "CheckpointInfo",
    "CheckpointLoadError",
    "CheckpointManager",
    "CheckpointNotFoundError",
    "CheckpointSaveError",
    "CheckpointStorage",
    "ConfigError",
    "EncodingError",
    "ModelState",
    "NotACheckpointError",
    "OptimizerState",
    "PerRank",
    "RNGState",
    "SaveStats",
    "StateMismatchError",
    "UnsafeCheckpointError",
    "__version__",
]
