"""Lightning integration: the ``DCPCheckpointIO`` Trainer plugin and strategy glue for sharded training.

``Trainer(plugins=[DCPCheckpointIO(async_mode="thread")])`` saves every Lightning checkpoint as a DCP
checkpoint directory, written in the background and committed atomically. See ``docs/lightning.md``.
"""

from dcp_plugin.lightning.callback import DCPCheckpoint
from dcp_plugin.lightning.checkpoint_io import DCPCheckpointIO
from dcp_plugin.lightning.inference import load_lightning_module, to_lightning_file
from dcp_plugin.lightning.layout import LightningCheckpointError
from dcp_plugin.lightning.strategies import DCPFSDPStrategy, DCPModelParallelStrategy

__all__ = [
    "DCPCheckpoint",
    "DCPCheckpointIO",
    "DCPFSDPStrategy",
    "DCPModelParallelStrategy",
    "LightningCheckpointError",
    "load_lightning_module",
    "to_lightning_file",
]
