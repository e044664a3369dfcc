"""Saves that repeat the structure of the save before are written without DCP (engine/repeat.py). Every test here
changes something such a save trusts, saves again, and reads every checkpoint back in a fresh process with
dcp-plugin and with PyTorch's ``dcp_to_torch_save``: both must hold exactly the live values at each save."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed.checkpoint as dcp

from dcp_plugin import CheckpointManager, ModelState, OptimizerState
from dcp_plugin.format.packing import SKELETON_GRANULE
from dcp_plugin.storage import repeat_io
from tests.fresh import read_fresh
from tests.models import MixedSizes, lora_step, make_lora

MODES = ["sync", "thread"]


def _state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, **plain) -> dict:
    return {"model": ModelState(model), "optim": OptimizerState(model, optimizer), **plain}


def _step(model: MixedSizes, optimizer: torch.optim.Optimizer) -> None:
    model.loss().backward()
    optimizer.step()
    optimizer.zero_grad()
    model.count += 1


def _live(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {key: value.detach().clone() for key, value in model.state_dict().items()}


def _check(saved: dict, directory: str) -> None:
    """Every checkpoint of ``saved`` ({step: model values}) holds exactly those values for both readers."""
    paths = {step: os.path.join(directory, f"step_{step:09d}") for step in saved}
    read = read_fresh(*paths.values())
    for step, path in paths.items():
        for reader in ("plugin", "torch"):
            result = read[path][reader]
            assert not isinstance(result, str), f"{reader} refused step {step}: {result}"
            for key, value in saved[step].items():
                got = result["model"][key]
                assert got.dtype == value.dtype and torch.equal(got, value), f"{reader}, step {step}: {key}"


def _repeated(manager: CheckpointManager) -> bool:
    return manager.engine.repeats.ready() is not None


@pytest.mark.parametrize("mode", MODES)
def test_repeat_saves_are_written_without_dcp_and_read_back_by_every_reader(ckpt_dir, mode, monkeypatch):
    planned = []
    original = dcp.save

    def counting(*args, **kwargs):
        planned.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(dcp, "save", counting)
    original_async = dcp.state_dict_saver.async_save
    monkeypatch.setattr(dcp, "async_save", lambda *a, **k: planned.append(1) or original_async(*a, **k))
    model = MixedSizes()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    saved = {}
    with CheckpointManager(ckpt_dir, async_mode=mode) as manager:
        for step in range(1, 5):
            _step(model, optimizer)
            manager.save(step, _state(model, optimizer, step=step))
            saved[step] = _live(model)
        manager.wait()
        assert planned == [1], "only the first save of the structure goes through DCP"
        assert _repeated(manager)
        fresh, fresh_optimizer = MixedSizes(), None
        fresh_optimizer = torch.optim.AdamW(fresh.parameters(), lr=0.5)
        state = _state(fresh, fresh_optimizer, step=0)
        manager.load(state)
        assert state["step"] == 4 and fresh_optimizer.param_groups[0]["lr"] == 0.1
        assert all(torch.equal(fresh.state_dict()[k], v) for k, v in saved[4].items())
        # PyTorch's own loader, into a plain state dict, finds the optimizer's plain values under DCP's keys too
        plain = {"model": {k: torch.empty_like(v) for k, v in saved[4].items()}}
        dcp.load(plain, checkpoint_id=os.path.join(ckpt_dir, "step_000000004"), no_dist=True)
        assert all(torch.equal(plain["model"][k], v) for k, v in saved[4].items())
    _check(saved, ckpt_dir)


@pytest.mark.parametrize("mode", MODES)
def test_every_change_of_what_a_repeat_save_trusts_is_saved(ckpt_dir, mode):
    """dtype, shape, storage moved (same or other alignment), a transposed view, tied then untied weights, a
    skeleton that grows past its padding, replaced optimizer state: each save holds the live values."""
    model = MixedSizes()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    saved = {}
    changes = [
        lambda: None,
        lambda: setattr(model.small.weight, "data", torch.randn(8, 8)),  # new storage, same shape: small
        lambda: setattr(model.large, "data", torch.randn(1024, 1024)),  # new storage: large, another address
        lambda: setattr(model.large, "data", torch.randn(2048, 1024)[5:1029]),  # not at a block-aligned address
        lambda: setattr(model.large, "data", model.large.data.t()),  # a transposed view: not contiguous
        lambda: setattr(model.head, "weight", model.small.weight),  # tied weights: stored once
        lambda: setattr(model.head, "weight", torch.nn.Parameter(torch.randn(8, 8))),  # untied
        lambda: model.small.to(torch.float64),  # dtype
        lambda: setattr(model.small, "weight", torch.nn.Parameter(torch.randn(4, 8, dtype=torch.float64))),  # shape
        lambda: optimizer.load_state_dict(optimizer.state_dict()),  # the optimizer's state tensors replaced
        lambda: None,
    ]
    with CheckpointManager(ckpt_dir, async_mode=mode) as manager:
        for step, change in enumerate(changes, start=1):
            manager.wait_for_staging()  # edits outside an optimizer step wait for the last snapshot (documented)
            with torch.no_grad():
                for parameter in model.parameters():
                    parameter.add_(1.0)
            change()
            note = "x" * (SKELETON_GRANULE * (step == 6))  # once, a skeleton longer than its padding
            manager.save(step, {"model": ModelState(model), "note": note})
            saved[step] = _live(model)
        manager.wait()
    _check(saved, ckpt_dir)


def test_plain_values_are_the_ones_of_the_save_even_if_changed_right_after(ckpt_dir):
    model = MixedSizes()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    with CheckpointManager(ckpt_dir, async_mode="thread") as manager:
        for step, lr in enumerate([0.1, 0.2, 0.3, 1, 1.0, True], start=1):  # same text, other types too
            for group in optimizer.param_groups:
                group["lr"] = lr
            manager.save(step, _state(model, optimizer))
            optimizer.param_groups[0]["lr"] = "changed after save"  # not what that save holds
        manager.wait()
        assert _repeated(manager)
    read = read_fresh(*(os.path.join(ckpt_dir, f"step_{s:09d}") for s in range(1, 7)))
    for step, lr in enumerate([0.1, 0.2, 0.3, 1, 1.0, True], start=1):
        result = read[os.path.join(ckpt_dir, f"step_{step:09d}")]
        for reader in ("plugin", "torch"):
            value = result[reader]["optim"]["param_groups"][0]["lr"]
            assert type(value) is type(lr) and value == lr, (reader, step, value)


@pytest.mark.parametrize("mode", [pytest.param("sync", marks=pytest.mark.slow), "thread"])
def test_incremental_repeat_saves_refer_to_blobs_and_write_a_changed_frozen_tensor(ckpt_dir, mode):
    model = make_lora(0)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    saved = {}
    with CheckpointManager(ckpt_dir, async_mode=mode) as manager:
        for step in range(1, 7):
            lora_step(model, optimizer)
            manager.wait_for_staging()
            if step == 4:
                with torch.no_grad():
                    model[1].base.weight.mul_(-1.0)  # a watched frozen tensor changes
                    model[2].base.bias.add_(3.0)  # a fingerprinted one too
            if step == 5:
                model[3].base.requires_grad_(True)  # no longer frozen: kept in its blob only while unchanged
            manager.save(step, {"model": ModelState(model), "optim": OptimizerState(model, optimizer)})
            saved[step] = _live(model)
            manager.wait()
        assert _repeated(manager)
        stats = manager.history
        assert stats[2].bytes_written < stats[0].bytes_written / 4, "the unchanged base is not written again"
    _check(saved, ckpt_dir)


def test_a_failed_repeat_save_commits_nothing_and_the_next_save_works(ckpt_dir, monkeypatch):
    model = MixedSizes()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    saved = {}
    with CheckpointManager(ckpt_dir, async_mode="thread") as manager:
        for step in (1, 2):
            manager.save(step, _state(model, optimizer))
            saved[step] = _live(model)
        manager.wait()
        assert _repeated(manager)

        def broken(*args, **kwargs):
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(repeat_io, "_write_file", broken)
        manager.save(3, _state(model, optimizer))
        with pytest.raises(Exception, match="No space left"):
            manager.wait()
        monkeypatch.undo()
        assert not _repeated(manager) and manager.steps == [1, 2]
        for step in (4, 5):
            _step(model, optimizer)
            manager.save(step, _state(model, optimizer))
            saved[step] = _live(model)
        manager.wait()
        assert manager.steps == [1, 2, 4, 5] and manager.storage.incomplete() == []
    _check(saved, ckpt_dir)
