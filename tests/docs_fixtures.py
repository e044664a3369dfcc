"""Small stand-ins for what the docs' snippets leave to the reader (``model``, ``train_step``...).

Pages import them in a hidden ``<!-- test-setup ... -->`` comment (see tests/test_docs.py), so a snippet such as
``trainer.fit(model)`` runs as printed. Everything is tiny, so every page runs in seconds.
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


def plain_loop(seed: int = 0) -> tuple[torch.nn.Module, torch.optim.Optimizer, Any, Any]:
    """A tiny model, its optimizer and scheduler, and a ``train_step()`` that trains them one step."""
    torch.manual_seed(seed)
    model = torch.nn.Linear(16, 4)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=100)

    def train_step() -> float:
        loss = model(torch.randn(8, 16)).pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()
        return loss.item()

    return model, optimizer, scheduler, train_step
