"""Small models and helpers shared by the tests."""

from __future__ import annotations

from typing import Any

import torch


def make_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))


def make_training(seed: int = 0) -> tuple[torch.nn.Module, torch.optim.Optimizer, Any]:
    model = make_model(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=3, gamma=0.5)
    return model, optimizer, scheduler


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any = None) -> float:
    data = torch.randn(8, 16)
    loss = model(data).pow(2).mean()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    if scheduler is not None:
        scheduler.step()
    return float(loss.detach())


def snapshot(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict[str, Any]:
    """A deep copy of everything that must survive a round trip."""
    out: dict[str, Any] = {"model": {k: v.detach().clone() for k, v in model.state_dict().items()}}
    if optimizer is not None:
        sd = optimizer.state_dict()
        out["optim_state"] = {
            k: {kk: vv.clone() if torch.is_tensor(vv) else vv for kk, vv in v.items()} for k, v in sd["state"].items()
        }
        out["optim_groups"] = [dict(g) for g in sd["param_groups"]]
    return out


def assert_same(a: Any, b: Any, path: str = "") -> None:
    """Bit-exact comparison of nested tensors and values."""
    if torch.is_tensor(a) or torch.is_tensor(b):
        assert torch.is_tensor(a) and torch.is_tensor(b), f"{path}: {type(a)} vs {type(b)}"
        assert a.dtype == b.dtype and a.shape == b.shape, (
            f"{path}: {a.dtype}{tuple(a.shape)} vs {b.dtype}{tuple(b.shape)}"
        )
        assert torch.equal(a, b), f"{path}: tensors differ"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{path}: keys {sorted(map(str, a))} vs {sorted(map(str, b))}"
        for key in a:
            assert_same(a[key], b[key], f"{path}.{key}")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), f"{path}: {a!r} vs {b!r}"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}[{i}]")
    else:
        assert a == b or (a != a and b != b), f"{path}: {a!r} vs {b!r}"


class MixedSizes(torch.nn.Module):
    """Small tensors, one large enough (4 MiB) to be written from its own memory in sync mode, a buffer."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.small = torch.nn.Linear(8, 8)
        self.head = torch.nn.Linear(8, 8, bias=False)
        self.large = torch.nn.Parameter(torch.randn(1024, 1024))
        self.register_buffer("count", torch.zeros((), dtype=torch.int64))

    def loss(self) -> torch.Tensor:
        """A loss that gives every parameter a gradient."""
        return self.head(self.small(torch.randn(2, 8))).sum() + self.large.sum()


class LoRALinear(torch.nn.Module):
    """A frozen base layer plus a small trainable low-rank adapter (as in LoRA fine-tuning)."""

    def __init__(self, width: int, rank: int) -> None:
        super().__init__()
        self.base = torch.nn.Linear(width, width)
        self.base.requires_grad_(False)
        self.a = torch.nn.Parameter(torch.randn(rank, width) * 0.01)
        self.b = torch.nn.Parameter(torch.randn(width, rank) * 0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + x @ self.a.t() @ self.b.t()


def make_lora(seed: int = 0, width: int = 384, layers: int = 4, rank: int = 4) -> torch.nn.Module:
    """A LoRA-style model: the frozen base holds ~95 % of the bytes of model and optimizer state together."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(*[LoRALinear(width, rank) for _ in range(layers)])


def lora_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    width = model[0].base.in_features
    loss = model(torch.randn(4, width)).pow(2).mean()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
