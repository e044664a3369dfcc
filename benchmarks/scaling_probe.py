"""DCP's work that grows with the chunks of a checkpoint, measured directly at up to hundreds of thousands of chunks
in one process: what the coordinator and every rank would do in a job far larger than this host can start.

For an FSDP-style checkpoint of ``tensors`` tensors sharded over ``world`` ranks (one chunk per tensor per rank), the
probe builds every rank's save plan as DCP would (``WriteItem`` per shard) and times, on CPU time of this process:

- ``global_plan``: the coordinator's ``DefaultSavePlanner.create_global_plan`` over all ranks' plans (deduplication,
  metadata, validation), with dcp-plugin's planner options (written by the lowest rank holding a chunk);
- ``results``: the coordinator turning every rank's write results into the metadata's storage index;
- ``pickle`` / ``unpickle``: serializing the finished ``Metadata`` (what DCP broadcasts to every rank at the end of
  a save and what every rank reads from ``.metadata`` to restore) and reading it back;
- ``load_plan``: one rank matching its shards against the metadata (``create_read_items_for_chunk_list``, DCP's
  resharding search over every saved chunk of each tensor), as every rank does at the start of a restore.

No process group is needed, so the chunk count can go far beyond the ranks the host runs. The scaling model uses it
to check its per-chunk term where the projections need it (``benchmarks/scaling_model.py``).
"""

from __future__ import annotations

import gc
import pickle
import time
from typing import Any

import torch
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties
from torch.distributed.checkpoint.planner import SavePlan, TensorWriteData, WriteItem, WriteItemType
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from dcp_plugin.engine import plans as plugin_plans

GRIDS = {
    "full": [(64, world) for world in (16, 256, 2048)],
    "quick": [(16, 4), (16, 32)],
}
"""``(tensors, world)`` points of a full run and of ``--quick``."""
SHARD = 1024
"""Elements of each rank's shard (the bytes do not matter to any step timed here)."""


def local_plans(tensors: int, world: int) -> list[SavePlan]:
    """Every rank's local save plan for ``tensors`` fp32 tensors sharded in equal parts over ``world`` ranks."""
    properties = TensorProperties.create_from_tensor(torch.empty(0, dtype=torch.float32))
    size = torch.Size([SHARD * world])
    out = []
    for rank in range(world):
        offsets, sizes = torch.Size([rank * SHARD]), torch.Size([SHARD])
        items = [
            WriteItem(
                index=MetadataIndex(f"weights.w{index}", offsets),
                type=WriteItemType.SHARD,
                tensor_data=TensorWriteData(
                    chunk=ChunkStorageMetadata(offsets=offsets, sizes=sizes), properties=properties, size=size
                ),
            )
            for index in range(tensors)
        ]
        paths = {f"weights.w{index}": ("weights", f"w{index}") for index in range(tensors)}
        out.append(SavePlan(items, planner_data=paths))
    return out


def measure(tensors: int, world: int) -> dict[str, Any]:
    """Time each step once for one configuration (CPU seconds of this process) and size what is sent."""
    local = local_plans(tensors, world)
    local_plan_bytes = len(pickle.dumps(local[world // 2]))
    key = plugin_plans.new_key()
    planner = plugin_plans.save_planner(key)  # dcp-plugin's planner (plan caching, lowest-rank writes)
    gc.collect()
    timings: dict[str, float] = {}

    began = time.process_time()
    global_plan, metadata = planner.create_global_plan(local)
    timings["global_plan"] = time.process_time() - began
    plugin_plans.forget(key)

    began = time.process_time()
    storage = {}
    for rank, plan in enumerate(global_plan):
        for offset, item in enumerate(plan.items):
            storage[item.index] = _StorageInfo(f"__{rank}_0.distcp", offset * SHARD * 4, SHARD * 4)
    metadata.storage_data = storage
    timings["results"] = time.process_time() - began

    began = time.process_time()
    blob = pickle.dumps(metadata)
    timings["pickle"] = time.process_time() - began
    began = time.process_time()
    restored = pickle.loads(blob)
    timings["unpickle"] = time.process_time() - began

    rank = world // 2
    mine = [ChunkStorageMetadata(offsets=torch.Size([rank * SHARD]), sizes=torch.Size([SHARD]))]
    began = time.process_time()
    for fqn, stored in restored.state_dict_metadata.items():
        create_read_items_for_chunk_list(fqn, stored, mine)
    timings["load_plan"] = time.process_time() - began
    return {
        "tensors": tensors,
        "world": world,
        "chunks": tensors * world,
        "seconds": timings,
        "metadata_bytes": len(blob),
        "local_plan_bytes": local_plan_bytes,
    }


def run(grid: str) -> list[dict[str, Any]]:
    """Every configuration of ``grid``."""
    return [measure(tensors, world) for tensors, world in GRIDS[grid]]


STEPS = {
    "save": ("global_plan", "results", "pickle"),
    "save_cached": ("results", "pickle"),
    "restore": ("unpickle", "load_plan"),
}
"""The probed steps on the busiest rank's path: a save's coordinator plans (unless its plan is cached), indexes the
write results and pickles the metadata; every restoring rank unpickles the metadata and matches its shards."""
AFTER_SAVE = ("unpickle",)
"""What every other rank does after the coordinator at the end of a save (it unpickles the broadcast metadata)."""


__all__ = ["AFTER_SAVE", "GRIDS", "STEPS", "local_plans", "measure", "run"]
