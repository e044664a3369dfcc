"""The framework contenders of ``benchmarks/restore.py``: a Lightning ``fit(ckpt_path=...)`` resume and an
Accelerate ``load_state`` resume, each with the framework's own checkpoint format and with dcp-plugin's, timed to
the end of the first training step after the restore; and making their checkpoints."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

QUIET = {
    "accelerator": "cpu",
    "devices": 1,
    "logger": False,
    "enable_checkpointing": False,
    "enable_progress_bar": False,
    "enable_model_summary": False,
    "num_sanity_val_steps": 0,
}
"""Trainer options shared by every Lightning run: nothing but the training loop."""


def _module(model: torch.nn.Module, data: torch.Tensor) -> Any:
    import lightning as L

    class RestoreModule(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def training_step(self, batch: torch.Tensor, _index: int) -> torch.Tensor:
            return self.model(batch).pow(2).mean()

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.AdamW(self.model.parameters(), lr=1e-4)

        def train_dataloader(self) -> Any:
            return torch.utils.data.DataLoader([data], batch_size=None)

    return RestoreModule()


def _lightning_plugins(ours: bool, **options: Any) -> list[Any]:
    if not ours:
        return []
    from dcp_plugin.lightning import DCPCheckpointIO

    return [DCPCheckpointIO(**options)]


def lightning_checkpoint(model: torch.nn.Module, data: torch.Tensor, path: str, *, ours: bool) -> None:
    """One training step with Lightning, then ``trainer.save_checkpoint(path)`` with its default plugin or ours."""
    import lightning as L

    module = _module(model, data)
    trainer = L.Trainer(max_steps=1, plugins=_lightning_plugins(ours, async_mode="sync"), **QUIET)
    trainer.fit(module)
    trainer.save_checkpoint(path)


def lightning_resume(
    spec: dict[str, Any], model: torch.nn.Module, data: torch.Tensor, prepare: Callable[..., None], digest: Any
) -> tuple[float, float, str]:
    """``trainer.fit(module, ckpt_path=...)`` for one more step: (seconds to the start of training, seconds to the
    end of the first step, the state's digest)."""
    import lightning as L

    times: dict[str, float] = {}

    class Clock(L.Callback):
        def on_train_start(self, trainer: Any, pl_module: Any) -> None:
            times.setdefault("loaded", time.perf_counter())

        def on_train_batch_end(self, trainer: Any, *args: Any) -> None:
            times.setdefault("stepped", time.perf_counter())

    module = _module(model, data)
    plugins = _lightning_plugins(spec["contender"].endswith("dcp-plugin"))
    trainer = L.Trainer(max_steps=2, plugins=plugins, callbacks=[Clock()], **QUIET)
    prepare(spec, spec["path"])
    started = time.perf_counter()
    trainer.fit(module, ckpt_path=spec["path"])
    return times["loaded"] - started, times["stepped"] - started, digest(module.model, trainer.optimizers[0])


def _accelerator(ours: bool, **options: Any) -> Any:
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    if ours:
        import dcp_plugin.accelerate

        dcp_plugin.accelerate.enable(accelerator, **options)
    return accelerator


def _accelerate_step(accelerator: Any, model: torch.nn.Module, optimizer: Any, data: torch.Tensor) -> None:
    accelerator.backward(model(data).pow(2).mean())
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def accelerate_checkpoint(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, data: torch.Tensor, path: str, *, ours: bool
) -> None:
    """One training step with an ``Accelerator``, then ``save_state(path)``: Accelerate's own, or dcp-plugin's."""
    accelerator = _accelerator(ours, async_mode="sync")
    model, optimizer = accelerator.prepare(model, optimizer)
    _accelerate_step(accelerator, model, optimizer, data)
    accelerator.save_state(path)
    accelerator.end_training()


def accelerate_resume(
    spec: dict[str, Any],
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    data: torch.Tensor,
    prepare: Callable[..., None],
    digest: Any,
    _train_step: Any,
) -> tuple[float, float, str]:
    """``accelerator.load_state(path)`` into a freshly prepared model and optimizer, then one step."""
    accelerator = _accelerator(spec["contender"].endswith("dcp-plugin"))
    model, optimizer = accelerator.prepare(model, optimizer)
    prepare(spec, spec["path"])
    started = time.perf_counter()
    accelerator.load_state(spec["path"])
    loaded = time.perf_counter()
    _accelerate_step(accelerator, model, optimizer, data)
    stepped = time.perf_counter()
    return loaded - started, stepped - started, digest(model, optimizer.optimizer)


__all__ = ["accelerate_checkpoint", "accelerate_resume", "lightning_checkpoint", "lightning_resume"]
