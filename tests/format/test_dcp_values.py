"""A resume through PyTorch's DCP alone (torchtitan's recipe) reads what dcp-plugin wrote, optimizer included."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
from torch.distributed.checkpoint.metadata import BytesStorageMetadata
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from dcp_plugin import CheckpointManager
from dcp_plugin.format import dcp_values
from tests.models import assert_same, make_model, snapshot


def _step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, seed: int) -> None:
    torch.manual_seed(seed)  # the same batch in both runs
    model(torch.randn(8, 16)).pow(2).mean().backward()
    optimizer.step()
    optimizer.zero_grad()


def _training() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    model = make_model(seed=3)
    return model, torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.8, 0.95), weight_decay=0.05)


def _dcp_resume(checkpoint: str, entry: str) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """torchtitan's resume: canonical state dicts of fresh objects, ``dcp.load``, ``set_*_state_dict``."""
    model = make_model(seed=99)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1.0)  # other hyper-parameters: they must come back
    state = {"model": get_model_state_dict(model), entry: get_optimizer_state_dict(model, optimizer)}
    dcp.load(state, checkpoint_id=checkpoint, no_dist=True)
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, optimizer, state[entry])
    return model, optimizer


@pytest.mark.parametrize(("entry", "async_mode"), [("optim", "thread"), ("optimizer", "sync")])
def test_dcp_resume_of_the_optimizer_continues_bit_exactly(tmp_path, entry, async_mode):
    model, optimizer = _training()
    for seed in range(3):
        _step(model, optimizer, seed)
    with CheckpointManager(tmp_path, async_mode=async_mode) as manager:
        info = manager.save(3, {"model": model, entry: optimizer})
        manager.wait()
    _step(model, optimizer, 3)  # the uninterrupted run's next step

    resumed_model, resumed_optimizer = _dcp_resume(info.url, entry)
    assert resumed_optimizer.param_groups[0]["lr"] == 3e-3
    assert resumed_optimizer.param_groups[0]["betas"] == (0.8, 0.95)
    _step(resumed_model, resumed_optimizer, 3)
    assert_same(snapshot(model, optimizer), snapshot(resumed_model, resumed_optimizer))


def test_byte_items_load_without_running_code_and_keep_their_structure(tmp_path):
    model, optimizer = _training()
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    _step(model, optimizer, 0)
    scheduler.step()
    with CheckpointManager(tmp_path, async_mode="sync") as manager:
        info = manager.save(
            1, {"model": model, "optimizer": optimizer, "scheduler": scheduler, "epoch": 2, "log": {"a": 1}}
        )
    metadata = dcp.FileSystemReader(info.url).read_metadata()
    byte_keys = {k for k, v in metadata.state_dict_metadata.items() if isinstance(v, BytesStorageMetadata)}
    assert {"optimizer.param_groups.0.lr", "scheduler.last_epoch", "epoch"} <= byte_keys
    assert "log.a" not in byte_keys  # plain dict entries stay in the skeleton only

    out = os.fspath(tmp_path / "whole.pt")
    dcp_to_torch_save(info.url, out)
    whole = torch.load(out, weights_only=True)  # every stored value is plain data
    groups = whole["optimizer"]["param_groups"]
    assert isinstance(groups, list) and groups[0]["lr"] == 3e-3 / 2
    assert groups[0]["params"] == list(get_model_state_dict(model))
    assert whole["scheduler"]["last_epoch"] == 1 and whole["epoch"] == 2


def test_own_loads_are_unchanged_with_and_without_byte_items(tmp_path, monkeypatch):
    model, optimizer = _training()
    _step(model, optimizer, 0)
    expected = snapshot(model, optimizer)
    with CheckpointManager(tmp_path / "new", async_mode="sync") as manager:
        manager.save(1, {"model": model, "optimizer": optimizer})
    with monkeypatch.context() as patch:  # what dcp-plugin wrote before plain values went to DCP too
        patch.setattr(dcp_values, "plain_values", lambda name, value: {})
        with CheckpointManager(tmp_path / "old", async_mode="sync") as manager:
            info = manager.save(1, {"model": model, "optimizer": optimizer})
    metadata = dcp.FileSystemReader(info.url).read_metadata()
    assert not any(isinstance(v, BytesStorageMetadata) for v in metadata.state_dict_metadata.values())

    for directory in ("new", "old"):
        fresh_model = make_model(seed=7)
        fresh_optimizer = torch.optim.AdamW(fresh_model.parameters(), lr=1.0)
        with CheckpointManager(tmp_path / directory, async_mode="sync") as manager:
            manager.load({"model": fresh_model, "optimizer": fresh_optimizer})
        assert_same(expected, snapshot(fresh_model, fresh_optimizer))


def test_only_plain_values_become_byte_items():
    found = dcp_values.plain_values(
        "e", {"n": 1, "t": torch.ones(1), "dtype": torch.float32, "big": list(range(dcp_values.MAX_ELEMENTS + 1))}
    )
    assert found == {("e", "n"): 1}
