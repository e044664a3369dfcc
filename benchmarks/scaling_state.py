"""The synthetic training state the scaling benchmark saves: ``tensors`` fp32 tensors holding ``total_bytes``
together, spread over the ranks in one of two layouts.

- ``split``: each tensor lives whole on one rank (rank ``i % world``), as with expert or pipeline parallelism:
  a rank holds ``tensors / world`` tensors and DCP's metadata has one chunk per tensor.
- ``fsdp``: every tensor is a ``DTensor`` sharded along its first dimension over all ranks (``Shard(0)``, as FSDP2's
  ``fully_shard`` stores parameters and optimizer moments): a rank holds a shard of every tensor, and DCP's
  metadata has ``tensors × world`` chunks. On one rank the DTensors live on a one-rank mesh.

The three numbers the scaling model is written in (``benchmarks/scaling_model.py``) follow from the layout:
tensors per rank (plain and DTensor shards apart: DCP handles a DTensor at a higher cost), bytes per rank, tensors
and chunks in the checkpoint (:func:`shape`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

LAYOUTS = ("split", "fsdp")
ELEMENT = 4  # fp32


@dataclass(frozen=True)
class Point:
    """One measured configuration."""

    world: int
    layout: str
    tensors: int
    total_bytes: int

    @property
    def key(self) -> str:
        return f"r{self.world}-{self.layout}-t{self.tensors}-b{self.total_bytes}"


def shape(point: Point) -> dict[str, float]:
    """The model's variables for ``point`` (``benchmarks/scaling_model.py``): plain tensors and DTensor shards per
    rank, bytes per rank, tensors in the checkpoint, chunks (entries of DCP's metadata: every stored piece of every
    tensor) and ranks."""
    sharded = point.layout == "fsdp"
    per_rank = point.tensors if sharded else point.tensors / point.world
    return {
        "plain_per_rank": 0.0 if sharded else float(per_rank),
        "dtensors_per_rank": float(per_rank) if sharded else 0.0,
        "bytes_per_rank": point.total_bytes / point.world,
        "tensors": float(point.tensors),
        "chunks": float(point.tensors * point.world if sharded else point.tensors),
        "world": float(point.world),
    }


def elements_per_tensor(point: Point) -> int:
    """Elements of each (global) tensor; a multiple of ``world`` so that shards are equal."""
    per_tensor = max(1, point.total_bytes // (point.tensors * ELEMENT))
    return max(point.world, per_tensor - per_tensor % point.world)


def build(point: Point, rank: int) -> dict[str, Any]:
    """This rank's part of the state, as ``{"weights": {name: tensor}}`` (filled with distinct values)."""
    numel = elements_per_tensor(point)
    weights: dict[str, torch.Tensor] = {}
    if point.layout == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import DTensor, Shard

        mesh = init_device_mesh("cpu", (point.world,))
        local = numel // point.world
        for index in range(point.tensors):
            shard = torch.empty(local, dtype=torch.float32).fill_(float(index * point.world + rank))
            weights[f"w{index}"] = DTensor.from_local(
                shard, mesh, [Shard(0)], run_check=False, shape=torch.Size([numel]), stride=(1,)
            )
    else:
        for index in range(rank, point.tensors, point.world):
            weights[f"w{index}"] = torch.empty(numel, dtype=torch.float32).fill_(float(index))
    return {"weights": weights}


def local_tensors(state: dict[str, Any]) -> list[torch.Tensor]:
    """The plain tensors this rank holds (the local shards of DTensors)."""
    out = []
    for tensor in state["weights"].values():
        out.append(tensor.to_local() if hasattr(tensor, "to_local") else tensor)
    return out


def fingerprint(state: dict[str, Any]) -> float:
    """A sum over every local element: a load that restored the saved values gives the saved fingerprint."""
    return float(sum(float(t.sum(dtype=torch.float64)) for t in local_tensors(state)))


def perturb(state: dict[str, Any]) -> None:
    """Overwrite every local element (so that a load has to restore them)."""
    for tensor in local_tensors(state):
        tensor.fill_(-1.0)


__all__ = [
    "ELEMENT",
    "LAYOUTS",
    "Point",
    "build",
    "elements_per_tensor",
    "fingerprint",
    "local_tensors",
    "perturb",
    "shape",
]
