"""A tiny LightningModule, data, and run helpers shared by the Lightning tests (importable by spawned ranks)."""

from __future__ import annotations

import os
import random
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

STEPS_PER_EPOCH = 4
BATCH = 4


class TinyModule(pl.LightningModule):
    """Dropout (RNG), Adam (moments), a per-step scheduler, hyper-parameters and a hook-added key."""

    def __init__(self, lr: float = 0.05, hidden: int = 16) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(8, hidden), torch.nn.ReLU(), torch.nn.Dropout(0.2), torch.nn.Linear(hidden, 1)
        )
        self.extra_seen: Any = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = torch.nn.functional.mse_loss(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", torch.nn.functional.mse_loss(self(x), y))

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=3, gamma=0.5)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["hook_key"] = {"steps": self.global_step, 7: (1, 2), "empty": []}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.extra_seen = checkpoint.get("hook_key")


class ShardedModule(TinyModule):
    """TinyModule sharded with FSDP2 over the data-parallel mesh (ModelParallelStrategy)."""

    def configure_model(self) -> None:
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        for layer in self.net:
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(self.net, mesh=mesh)


def full(value: Any) -> Any:
    """A detached copy in which DTensors are full tensors (collective: call on every rank), recursively."""
    from torch.distributed.tensor import DTensor

    if isinstance(value, DTensor):
        return value.full_tensor().detach().clone()
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        return {k: full(v) for k, v in value.items()}
    if isinstance(value, list):
        return [full(v) for v in value]
    return value


def dataset(n: int = STEPS_PER_EPOCH * BATCH, seed: int = 1234) -> TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=generator)
    y = x.sum(dim=1, keepdim=True) + 0.1 * torch.randn(n, 1, generator=generator)
    return TensorDataset(x, y)


def loader(shuffle: bool = True) -> DataLoader:
    return DataLoader(dataset(), batch_size=BATCH, shuffle=shuffle)


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def trainer(
    root: str,
    plugin: Any,
    *,
    max_epochs: int,
    callbacks: list | None = None,
    strategy: Any = "auto",
    devices: int = 1,
    **kwargs: Any,
) -> pl.Trainer:
    return pl.Trainer(
        default_root_dir=root,
        accelerator="cpu",
        devices=devices,
        strategy=strategy,
        max_epochs=max_epochs,
        plugins=[plugin] if plugin is not None else None,
        callbacks=callbacks if callbacks is not None else [],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        **kwargs,
    )


def every_epoch_checkpoint(dirpath: str, steps: int = STEPS_PER_EPOCH, **kwargs: Any) -> ModelCheckpoint:
    options: dict[str, Any] = {"every_n_train_steps": steps, "save_top_k": -1, "save_last": True}
    options.update(kwargs)
    return ModelCheckpoint(dirpath=dirpath, **options)


def final_state(trainer: pl.Trainer, module: pl.LightningModule) -> dict[str, Any]:
    """Everything that must match bit for bit between an uninterrupted and a resumed run."""
    optimizer = trainer.optimizers[0]
    scheduler = trainer.lr_scheduler_configs[0].scheduler
    return {
        "weights": full({k: v.detach().clone() for k, v in module.state_dict().items()}),
        "optimizer": full(optimizer.state_dict()),
        "scheduler": scheduler.state_dict(),
        "global_step": trainer.global_step,
        "epoch": trainer.current_epoch,
        "torch_rng": torch.get_rng_state(),
        "python_rng": random.getstate(),
    }


def resume_run(
    root: str,
    plugin_factory: Any,
    *,
    strategy_factory: Any = lambda: "auto",
    devices: int = 1,
    module_factory: Any = TinyModule,
) -> tuple[dict, dict]:
    """Train 3 epochs straight, and 1 epoch + resume to 3 from the step-4 checkpoint; return both end states."""
    seed_all(0)
    module = module_factory()
    straight = trainer(
        os.path.join(root, "straight"),
        plugin_factory(),
        max_epochs=3,
        strategy=strategy_factory(),
        devices=devices,
    )
    straight.fit(module, loader())
    expected = final_state(straight, module)

    ckpt_dir = os.path.join(root, "ckpts")
    steps = STEPS_PER_EPOCH // devices  # the data is split between DDP ranks
    seed_all(0)
    module = module_factory()
    first = trainer(
        root,
        plugin_factory(),
        max_epochs=1,
        callbacks=[every_epoch_checkpoint(ckpt_dir, steps)],
        strategy=strategy_factory(),
        devices=devices,
    )
    first.fit(module, loader())

    seed_all(99)  # a different seed and fresh weights: everything must come from the checkpoint
    module = module_factory()
    second = trainer(
        root,
        plugin_factory(),
        max_epochs=3,
        callbacks=[every_epoch_checkpoint(ckpt_dir, steps)],
        strategy=strategy_factory(),
        devices=devices,
    )
    second.fit(module, loader(), ckpt_path=os.path.join(ckpt_dir, f"epoch=0-step={steps}.ckpt"))
    resumed = final_state(second, module)
    resumed["hook_key"] = module.extra_seen
    return expected, resumed
