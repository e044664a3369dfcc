"""Saves written without DCP on two real gloo ranks: the ranks agree on it (a structure change on one rank sends
both through DCP), each save makes three small object collectives, and what they wrote loads on one rank, with
dcp-plugin and with PyTorch's readers."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

from dcp_plugin import CheckpointManager, PerRank
from tests.fresh import read_fresh
from tests.multiproc import run_ranks

pytestmark = pytest.mark.slow

COLLECTIVES = ("all_gather_object", "gather_object", "broadcast_object_list", "scatter_object_list")


def _counting(calls: list[str]) -> None:
    for name in COLLECTIVES:
        original = getattr(dist, name)

        def counted(*args, _original=original, _name=name, **kwargs):
            calls.append(_name)
            return _original(*args, **kwargs)

        setattr(dist, name, counted)


def save_on_ranks(rank, world_size, directory, mode):
    from torch.nn.parallel import DistributedDataParallel

    torch.manual_seed(0)
    model = DistributedDataParallel(torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Linear(16, 4)))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    own = torch.full((3,), float(rank))
    calls: list[str] = []
    _counting(calls)
    saved, counted, paths = {}, {}, {}
    with CheckpointManager(directory, async_mode=mode) as manager:
        for step in range(1, 6):
            model(torch.randn(4, 16)).sum().backward()
            optimizer.step()
            optimizer.zero_grad()
            if step == 4 and rank == 1:
                own = torch.zeros(5)  # only rank 1's structure changes: every rank takes DCP's path
            calls.clear()
            manager.save(step, {"model": model.module, "optim": optimizer, "own": PerRank(own), "step": step})
            manager.wait()
            counted[step] = list(calls)
            paths[step] = manager.engine.repeats.ready()
            saved[step] = {k: v.detach().clone() for k, v in model.module.state_dict().items()}
    return {"saved": saved, "calls": counted, "ready": paths, "own": own}


@pytest.mark.parametrize("mode", ["sync", "thread"])
def test_two_ranks_write_repeat_saves_without_dcp_and_one_rank_reads_them(tmp_path, mode):
    directory = str(tmp_path / "ckpts")
    ranks = run_ranks(save_on_ranks, directory, mode)
    for step in (2, 3, 5):  # repeats: the opening all-gather, the gather of reports, the outcome's broadcast
        for rank in ranks:
            assert sorted(rank["calls"][step]) == ["all_gather_object", "broadcast_object_list", "gather_object"]
    for rank in ranks:  # step 4 changed rank 1's structure: DCP planned it on both ranks (gathers and scatters)
        assert "scatter_object_list" in rank["calls"][4]
    paths = [os.path.join(directory, f"step_{step:09d}") for step in range(1, 6)]
    read = read_fresh(*paths)
    for step, path in enumerate(paths, start=1):
        for reader in ("plugin", "torch"):
            result = read[path][reader]
            assert not isinstance(result, str), f"{reader}, step {step}: {result}"
            for key, value in ranks[0]["saved"][step].items():
                assert torch.equal(result["model"][key], value), (reader, step, key)
        assert read[path]["plugin"]["step"] == step
    with CheckpointManager(directory, distributed=False) as manager:  # one rank loads, as rank 0 of the two
        state = {"model": torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Linear(16, 4)), "own": PerRank(None)}
        state["optim"] = torch.optim.AdamW(state["model"].parameters(), lr=1e-2)
        state["step"] = 0
        manager.load(state)
        assert state["step"] == 5 and torch.equal(state["own"].value, ranks[0]["own"])
        for key, value in ranks[0]["saved"][5].items():
            assert torch.equal(state["model"].state_dict()[key], value), key
