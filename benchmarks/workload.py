"""The training state being checkpointed: an MLP of fp32 Linear layers trained with AdamW."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

BYTES_PER_PARAM = 12
"""fp32 parameter plus AdamW's exp_avg and exp_avg_sq."""

BATCH = 8


@dataclass
class Workload:
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    width: int

    @property
    def state_bytes(self) -> int:
        """Bytes of tensors in model + optimizer state (what a checkpoint must hold)."""
        total = sum(p.numel() * p.element_size() for p in self.model.parameters())
        for state in self.optimizer.state.values():
            total += sum(v.numel() * v.element_size() for v in state.values() if torch.is_tensor(v))
        return total

    def train_step(self, before_optimizer_step: Callable[[], None] | None = None) -> None:
        """One forward/backward/AdamW step; ``before_optimizer_step`` runs between backward and step."""
        data = torch.randn(BATCH, self.width)
        loss = self.model(data).pow(2).mean()
        loss.backward()
        if before_optimizer_step is not None:
            before_optimizer_step()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def fingerprint(self) -> list[float]:
        """A cheap summary of the state, to check a load brought back what was saved."""
        first = next(iter(self.model.parameters()))
        last_state = list(self.optimizer.state.values())[-1]
        return [float(first.detach().double().sum()), float(last_state["exp_avg"].double().sum())]

    def perturb(self) -> None:
        """Change every parameter and moment, so that a load has something to restore."""
        with torch.no_grad():
            for p in self.model.parameters():
                p.add_(1.0)
            for state in self.optimizer.state.values():
                state["exp_avg"].add_(1.0)


def layout(state_bytes: int) -> tuple[int, int]:
    """(width, layers) of square Linear layers whose parameters + AdamW state total about ``state_bytes``."""
    params = max(state_bytes // BYTES_PER_PARAM, 64)
    width = min(2048, max(8, int(math.sqrt(params / 4))))
    layers = max(2, round(params / (width * (width + 1))))
    return width, layers


def build(state_bytes: int, seed: int = 0) -> Workload:
    """The model and an AdamW optimizer whose state exists (one step taken)."""
    torch.manual_seed(seed)
    width, layers = layout(state_bytes)
    blocks: list[torch.nn.Module] = []
    for i in range(layers):
        blocks.append(torch.nn.Linear(width, width))
        if i < layers - 1:
            blocks.append(torch.nn.ReLU())
    model = torch.nn.Sequential(*blocks)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    work = Workload(model=model, optimizer=optimizer, width=width)
    work.train_step()
    return work


def exact_bytes(state_bytes: int) -> int:
    """Tensor bytes of the workload :func:`build` makes for ``state_bytes`` (without building it)."""
    width, layers = layout(state_bytes)
    return layers * (width * width + width) * BYTES_PER_PARAM
