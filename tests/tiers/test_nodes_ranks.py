"""Two ranks on this host standing for two nodes (``GROUP_RANK`` per rank, a directory each): one directory for
both is refused, the copies to the peer follow the run's retention, and a copy that fails is raised on every rank
while the checkpoint stays."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from dcp_plugin import CheckpointManager, ConfigError, KeepLast, ReplicationError
from tests.multiproc import run_ranks

pytestmark = pytest.mark.slow


def copies_then_a_failed_copy(rank: int, world_size: int, base: str) -> dict:
    os.environ.update(GROUP_RANK=str(rank), LOCAL_WORLD_SIZE="1")
    directory = Path(base) / f"node{rank}"
    replicas = directory / ".dcp-plugin" / "replicas"
    model = torch.nn.Linear(8, 8)
    out: dict = {}
    try:  # one directory for both nodes is refused: node-local checkpoints need each node's own disk
        CheckpointManager(str(Path(base) / "shared"), local_scope="node")
        out["shared"] = None
    except ConfigError as err:
        out["shared"] = str(err)
    with CheckpointManager(str(directory), local_scope="node", async_mode="sync", retention=KeepLast(2)) as manager:
        for step in (1, 2, 3):
            manager.save(step, {"model": model})
            manager.wait()
            manager.nodes.wait()
        out["own"] = sorted(p.name for p in directory.glob("step_*"))
        out["copies"] = sorted(str(p.relative_to(replicas)) for p in replicas.glob("node*/step_*"))
    if rank == 1:  # this node can no longer keep copies
        shutil.rmtree(replicas)
        replicas.write_text("not a directory")
    dist.barrier()
    errors = []
    with CheckpointManager(str(directory), local_scope="node", async_mode="sync") as manager:
        for call in (lambda: manager.save(4, {"model": model}), manager.wait, manager.nodes.wait):
            try:
                call()  # the copies missing on node 1 (made again after a start) and step 4's fail there
            except ReplicationError as err:
                errors.append(str(err))
        out["errors"], out["steps"] = errors, manager.steps
    return out


def test_a_shared_directory_is_refused_copies_follow_retention_and_a_failed_copy_is_raised_everywhere(tmp_path):
    results = run_ranks(copies_then_a_failed_copy, str(tmp_path), world_size=2)
    for rank, result in enumerate(results):
        assert "several nodes see the same directory" in (result["shared"] or ""), result["shared"]
        assert result["own"] == ["step_000000002", "step_000000003"]
        other = 1 - rank
        assert result["copies"] == [f"node{other}/step_000000002", f"node{other}/step_000000003"]
        assert result["errors"], "a failed copy was not raised"
        assert all("(node 1: OSError: Cannot create the checkpoint directory" in e for e in result["errors"]), result
        assert result["steps"] == [2, 3, 4]  # the checkpoint itself is committed on both nodes
