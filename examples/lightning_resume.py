"""Train a small LightningModule with DCPCheckpointIO, stop, and resume from the last checkpoint.

    python examples/lightning_resume.py --root /tmp/dcp-lightning-demo [--mode thread|process|sync]

The first fit runs 2 epochs and writes asynchronous DCP checkpoints (directories named like Lightning's
files); the second fit continues to 4 epochs from ``ckpt_path="last"``. The model is then loaded for
inference from the best checkpoint directory with ``load_lightning_module``.
"""

from __future__ import annotations

import argparse

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from dcp_plugin.lightning import DCPCheckpointIO, load_lightning_module


class Regressor(pl.LightningModule):
    def __init__(self, lr: float = 0.05) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x), y)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)


def data() -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(256, 8, generator=generator)
    return DataLoader(TensorDataset(x, x.sum(dim=1, keepdim=True)), batch_size=32, shuffle=True)


def fit(root: str, mode: str, epochs: int, ckpt_path: str | None) -> pl.Trainer:
    trainer = pl.Trainer(
        default_root_dir=root,
        accelerator="cpu",
        max_epochs=epochs,
        logger=False,
        plugins=[DCPCheckpointIO(async_mode=mode)],
        callbacks=[
            ModelCheckpoint(
                dirpath=f"{root}/ckpts",
                monitor="train_loss",
                save_top_k=2,
                save_last=True,
                every_n_train_steps=4,
            )
        ],
    )
    trainer.fit(Regressor(), data(), ckpt_path=ckpt_path)
    return trainer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="/tmp/dcp-lightning-demo")
    parser.add_argument("--mode", default="thread", choices=["sync", "thread", "process"])
    args = parser.parse_args()

    pl.seed_everything(0)
    fit(args.root, args.mode, epochs=2, ckpt_path=None)
    trainer = fit(args.root, args.mode, epochs=4, ckpt_path="last")
    print(f"resumed and finished at global step {trainer.global_step}")

    best = trainer.checkpoint_callback.best_model_path
    model = load_lightning_module(Regressor, best)
    print(f"loaded {best} for inference (lr={model.hparams.lr})")


if __name__ == "__main__":  # required by async_mode="process": the writer process re-imports this file
    main()
