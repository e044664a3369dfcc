"""Small stand-ins for what later snippets of a page leave to the reader (``MyModule``).

Pages import them in a hidden ``<!-- test-setup ... -->`` comment (see tests/test_docs.py; never before a page's
first Python block, which shows everything it needs), so a snippet such as ``trainer.fit(MyModule())`` runs as
printed. Everything is tiny, so every page runs in seconds.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

STOP_AFTER_STEPS = 8
"""A ``MyModule`` run ends after this many optimizer steps (the snippets' Trainers set no limit)."""


class MyModule(pl.LightningModule):
    """A one-layer regression module with Adam; it ends ``fit`` after :data:`STOP_AFTER_STEPS` steps."""

    def __init__(self, lr: float = 0.05) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = torch.nn.Linear(8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = torch.nn.functional.mse_loss(self(x), y)
        self.log("val_loss", loss)
        return loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.global_step >= STOP_AFTER_STEPS:
            self.trainer.should_stop = True

    def configure_optimizers(self) -> Any:
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(torch.randn(16, 8), torch.randn(16, 1)), batch_size=4)
