"""Lightning integration: the ``DCPCheckpointIO`` Trainer plugin and strategy glue for sharded training.

``Trainer(plugins=[DCPCheckpointIO(async_mode="thread")])`` saves every Lightning checkpoint as a DCP
checkpoint directory, written in the background and committed atomically. See ``docs/lightning.md``.

Needs Lightning: ``pip install 'dcp-plugin[lightning]'`` (without it, importing this package says so).
"""

from dcp_plugin.errors import import_extra

import_extra("lightning.pytorch", extra="lightning", feature="dcp_plugin.lightning")

from dcp_plugin.lightning.callback import DCPCheckpoint  # noqa: E402 - after the check above
from dcp_plugin.lightning.checkpoint_io import DCPCheckpointIO  # noqa: E402
from dcp_plugin.lightning.inference import load_lightning_module, to_lightning_file  # noqa: E402
from dcp_plugin.lightning.layout import LightningCheckpointError  # noqa: E402
from dcp_plugin.lightning.strategies import DCPFSDPStrategy, DCPModelParallelStrategy  # noqa: E402

__all__ = [
    "DCPCheckpoint",
    "DCPCheckpointIO",
    "DCPFSDPStrategy",
    "DCPModelParallelStrategy",
    "LightningCheckpointError",
    "load_lightning_module",
    "to_lightning_file",
]
