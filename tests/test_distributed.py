"""Two real ranks in a gloo group: exact round trips in every mode, and FSDP2 resharding across world sizes."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
import torch.distributed as dist

from dcp_plugin import CheckpointManager, ModelState, OptimizerState, RNGState
from tests.models import assert_same, make_training, snapshot, train_step
from tests.multiproc import run_ranks

pytestmark = pytest.mark.slow


def _ddp_training(seed: int):
    from torch.nn.parallel import DistributedDataParallel

    model, optimizer, scheduler = make_training(seed)
    ddp = DistributedDataParallel(model)
    optimizer = torch.optim.AdamW(ddp.parameters(), lr=1e-2, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=3, gamma=0.5)
    return ddp, optimizer, scheduler


def _seed_rank(rank: int, base: int) -> None:
    random.seed(base + rank), np.random.seed(base + rank), torch.manual_seed(base + rank)


def save_then_continue(rank, world_size, directory, mode):
    model, optimizer, scheduler = _ddp_training(seed=0)
    _seed_rank(rank, 100)
    for _ in range(3):
        train_step(model, optimizer, scheduler)
    with CheckpointManager(directory, async_mode=mode) as manager:
        state = {"model": model, "optim": optimizer, "sched": scheduler, "rng": RNGState(), "step": 3}
        manager.save(3, state)
        saved = snapshot(model.module, optimizer)
        losses = [train_step(model, optimizer, scheduler) for _ in range(3)]
    return {"saved": saved, "losses": losses, "final": snapshot(model.module, optimizer)}


def resume(rank, world_size, directory, mode):
    model, optimizer, scheduler = _ddp_training(seed=77)
    _seed_rank(rank, 5000)
    state = {"model": model, "optim": optimizer, "sched": scheduler, "rng": RNGState(), "step": 0}
    with CheckpointManager(directory, async_mode=mode) as manager:
        info = manager.load(state)
        loaded = snapshot(model.module, optimizer)
        losses = [train_step(model, optimizer, scheduler) for _ in range(3)]
    return {
        "step": state["step"],
        "name": info.name,
        "loaded": loaded,
        "losses": losses,
        "final": snapshot(model.module, optimizer),
    }


@pytest.mark.parametrize("mode", ["sync", "thread", "process"])
def test_two_rank_resume_is_bit_exact(tmp_path, mode):
    directory = str(tmp_path / "ckpts")
    before = run_ranks(save_then_continue, directory, mode)
    after = run_ranks(resume, directory, mode)
    for rank in range(2):
        assert after[rank]["step"] == 3 and after[rank]["name"] == "step_000000003"
        assert_same(after[rank]["loaded"], before[rank]["saved"])
        # per-rank RNG restored: each rank draws the same batches as the uninterrupted run
        assert after[rank]["losses"] == before[rank]["losses"]
        assert_same(after[rank]["final"], before[rank]["final"])
    assert before[0]["losses"] != before[1]["losses"]  # ranks really had different RNG streams


# -- FSDP2 resharding ------------------------------------------------------------------------------


def _fsdp_training(seed: int):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model, _, _ = make_training(seed)
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for layer in (model[0], model[2]):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    return model, optimizer


def _full_state(model, optimizer):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True) if dist.get_world_size() > 1 else None
    model_sd, optim_sd = get_state_dict(model, optimizer, options=options)
    clone = lambda tree: {
        k: clone(v) if isinstance(v, dict) else (v.detach().clone() if torch.is_tensor(v) else v)
        for k, v in tree.items()
    }  # noqa: E731
    return {"model": clone(model_sd), "optim": clone(optim_sd)}


def fsdp_save(rank, world_size, directory, mode):
    model, optimizer = _fsdp_training(0) if world_size > 1 else _plain_training(0)
    torch.manual_seed(11)  # same data on every rank keeps the test simple
    for _ in range(2):
        train_step(model, optimizer)
    with CheckpointManager(directory, async_mode=mode) as manager:
        manager.save(2, {"model": ModelState(model), "optim": OptimizerState(model, optimizer)})
    files = sorted(p.name for p in (__import__("pathlib").Path(directory) / "step_000000002").glob("*.distcp"))
    return {"full": _full_state(model, optimizer), "files": files}


def _plain_training(seed: int):
    model, _, _ = make_training(seed)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)


def fsdp_load(rank, world_size, directory, mode):
    model, optimizer = _fsdp_training(9) if world_size > 1 else _plain_training(9)
    with CheckpointManager(directory, async_mode=mode) as manager:
        manager.load({"model": ModelState(model), "optim": OptimizerState(model, optimizer)})
    return {"full": _full_state(model, optimizer)}


@pytest.mark.parametrize(("save_ranks", "load_ranks"), [(2, 1), (1, 2)])
def test_fsdp2_checkpoint_reshards_across_world_sizes(tmp_path, save_ranks, load_ranks):
    directory = str(tmp_path / "ckpts")
    saved = run_ranks(fsdp_save, directory, "thread", world_size=save_ranks)
    if save_ranks == 2:
        assert saved[0]["files"] == ["__0_0.distcp", "__1_0.distcp"]  # every rank wrote (one file each: a small save)
    loaded = run_ranks(fsdp_load, directory, "thread", world_size=load_ranks)
    for result in loaded[:1]:  # full (gathered) state dicts live on rank 0 only
        assert_same(result["full"]["model"], saved[0]["full"]["model"])
        assert_same(result["full"]["optim"], saved[0]["full"]["optim"])


# -- values saved once that differ between ranks ---------------------------------------------------------------------


def _diverged(rank: int, seed: int):
    """A DDP model plus parameters outside it, trained without gradient sync: their values and their optimizer's
    state differ between ranks (rank-dependent data)."""
    from dcp_plugin import PerRank

    model, optimizer, scheduler = _ddp_training(seed=seed)
    outside = torch.nn.Module()
    outside.scale = torch.nn.Parameter(torch.ones(3))
    outside.temp = torch.nn.Parameter(torch.zeros(2))
    outside_optimizer = torch.optim.Adam(outside.parameters(), lr=0.1)
    state = {
        "model": model,
        "optim": optimizer,
        "outside": ModelState(outside),
        "outside_optim": OptimizerState(outside, outside_optimizer),
        "counter": {"count": 0, "lr": 0.0},
        "mine": PerRank({"rank": -1}),
    }
    return state, outside, outside_optimizer


def _observe(state, outside, outside_optimizer) -> dict:
    return {
        "outside": snapshot(outside, outside_optimizer),
        "model": snapshot(state["model"].module, state["optim"]),
        "counter": dict(state["counter"]),
        "mine": dict(state["mine"].value),
    }


def diverged_save(rank, world_size, directory):
    state, outside, outside_optimizer = _diverged(rank, seed=0)
    torch.manual_seed(1000 + rank)
    for _ in range(3):
        train_step(state["model"], state["optim"])
        loss = (outside.scale * torch.randn(3)).sum() + (outside.temp * torch.randn(2)).sum()
        loss.backward()
        outside_optimizer.step()
        outside_optimizer.zero_grad()
    state["counter"] = {"count": 10 + rank, "lr": 0.5 * (rank + 1)}
    state["mine"].value = {"rank": rank}
    with CheckpointManager(directory, async_mode="thread") as manager:
        manager.save(1, state)
    return _observe(state, outside, outside_optimizer)


def diverged_load(rank, world_size, directory):
    state, outside, outside_optimizer = _diverged(rank, seed=5)
    with CheckpointManager(directory, async_mode="thread") as manager:
        manager.load(state)
    return _observe(state, outside, outside_optimizer)


def test_values_saved_once_that_differ_between_ranks_load_as_rank_0s(tmp_path):
    """Parameters outside the DDP model and a plain value differ between the 2 ranks at save time: after a load every
    rank holds rank 0's, for the values, their optimizer state and the plain value alike; per-rank entries stay each
    rank's own."""
    directory = str(tmp_path / "ckpts")
    saved = run_ranks(diverged_save, directory)
    assert not torch.equal(saved[0]["outside"]["model"]["scale"], saved[1]["outside"]["model"]["scale"])
    assert saved[0]["counter"] != saved[1]["counter"]
    loaded = run_ranks(diverged_load, directory)
    for rank in range(2):
        assert_same(loaded[rank]["outside"], saved[0]["outside"], f"rank {rank} outside")
        assert_same(loaded[rank]["model"], saved[0]["model"], f"rank {rank} model")
        assert loaded[rank]["counter"] == saved[0]["counter"]
        assert loaded[rank]["mine"] == {"rank": rank}
