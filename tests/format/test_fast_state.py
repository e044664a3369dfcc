"""The faster state-dict expansion of plain modules (format/fast_state.py) against torch's own functions: the same
keys and the same tensors for every module tree it accepts, torch's path for every tree it must not take, and a
disagreement seen the first time costs nothing but speed."""

from __future__ import annotations

import logging

import pytest
import torch
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.checkpoint.state_dict import (
    _patch_model_state_dict,
    get_model_state_dict,
    get_optimizer_state_dict,
)

from dcp_plugin.format import fast_state
from dcp_plugin.format.state import ModelState, OptimizerState


class Tree(torch.nn.Module):
    """Nested modules, a persistent and a non-persistent buffer, a frozen parameter, a module shared under two
    names and tied weights."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(10, 4)
        self.blocks = torch.nn.ModuleList([torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4)])
        self.shared = self.blocks[0]
        self.head = torch.nn.Linear(4, 10, bias=False)
        self.head.weight = self.embed.weight
        self.register_buffer("scale", torch.ones(4))
        self.register_buffer("cache", torch.zeros(4), persistent=False)
        self.blocks[1].requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks[1](self.shared(self.embed(x).mean(1))) * self.scale)


def _same_state(fast: dict, slow: dict) -> None:
    assert fast_state._same(fast, slow), (list(fast), list(slow))


def _stepped(model: torch.nn.Module, groups: int = 1) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    param_groups = [{"params": params[i::groups], "lr": 0.1 * (i + 1)} for i in range(groups)]
    optimizer = torch.optim.AdamW(param_groups)
    model(torch.randint(0, 10, (3, 2))).sum().backward()
    optimizer.step()
    return optimizer


def test_a_plain_tree_gives_torch_s_model_state_dict():
    model = Tree()
    assert fast_state.is_plain(model)
    _same_state(fast_state.model_state_dict(model), get_model_state_dict(model))
    _same_state(ModelState(model).state_dict(), get_model_state_dict(model))


@pytest.mark.parametrize("groups", [1, 2])
def test_a_plain_tree_gives_torch_s_optimizer_state_dict(groups):
    model = Tree()
    optimizer = _stepped(model, groups)
    _same_state(fast_state.optimizer_state_dict(model, [optimizer]), get_optimizer_state_dict(model, optimizer))


def test_two_optimizers_over_one_model_merge_as_torch_merges_them():
    model = Tree()
    first = torch.optim.SGD(model.embed.parameters(), lr=0.1, momentum=0.9)
    second = torch.optim.AdamW(model.blocks[0].parameters())
    model(torch.randint(0, 10, (3, 2))).sum().backward()
    first.step()
    second.step()
    fast = fast_state.optimizer_state_dict(model, [first, second])
    _same_state(fast, get_optimizer_state_dict(model, [first, second]))
    _same_state(OptimizerState(model, [first, second]).state_dict(), fast)


def test_wrapped_trees_take_torch_s_path():
    compiled = torch.compile(Tree())
    wrapped = torch.nn.Sequential(checkpoint_wrapper(torch.nn.Linear(3, 3)))

    class Renaming(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = torch.nn.Linear(2, 2)

        def _fqn_modifiers(self) -> dict[str, str]:
            return {}  # a module that may rename what its state dict holds: torch resolves its names

    patched = Tree()
    _patch_model_state_dict(patched)
    for model in (compiled, Renaming(), patched):
        assert not fast_state.is_plain(model)
        _same_state(fast_state.model_state_dict(model), get_model_state_dict(model))
    # the checkpoint wrapper's prefix is in the keys: renamed by torch's path
    fast = fast_state.model_state_dict(wrapped)
    assert list(fast) == list(get_model_state_dict(wrapped)) == ["0.weight", "0.bias"]


def test_a_wrapper_added_later_is_seen_at_the_next_call():
    model = Tree()
    fast_state.model_state_dict(model)
    outer = torch.nn.Module()
    outer.add_module("_orig_mod", model)  # not a wrapper: a plain child named like one
    assert fast_state.is_plain(outer)
    model.blocks.append(torch.compile(torch.nn.Linear(4, 4)))  # a compiled module inside the tree
    assert not fast_state.is_plain(model)
    _same_state(fast_state.model_state_dict(model), get_model_state_dict(model))


def test_changed_keys_are_checked_against_torch_again(monkeypatch):
    model = Tree()
    fast_state.model_state_dict(model)
    calls = []
    original = fast_state.get_model_state_dict
    monkeypatch.setattr(fast_state, "get_model_state_dict", lambda m: calls.append(1) or original(m))
    fast_state.model_state_dict(model)
    assert calls == []  # same keys: already compared once
    model.register_buffer("extra", torch.zeros(2))
    _same_state(fast_state.model_state_dict(model), original(model))
    assert calls == [1]


def test_state_dict_hooks_apply_as_in_torch():
    model = Tree()

    def drop_scale(module, state_dict, prefix, local_metadata):
        state_dict.pop(prefix + "scale", None)

    model._register_state_dict_hook(drop_scale)
    fast = fast_state.model_state_dict(model)
    assert "scale" not in fast
    _same_state(fast, get_model_state_dict(model))


def test_a_disagreement_falls_back_to_torch_for_good(monkeypatch, caplog):
    model = Tree()
    optimizer = _stepped(model)

    def wrong(model, optimizers):
        state = get_optimizer_state_dict(model, optimizers[0])
        state["param_groups"][0]["lr"] = 123.0
        return state

    monkeypatch.setattr(fast_state, "_optimizer_state", wrong)
    with caplog.at_level(logging.INFO, logger=fast_state.__name__):
        first = fast_state.optimizer_state_dict(model, [optimizer])
    assert first["param_groups"][0]["lr"] == 0.1
    assert "disagreed" in caplog.text
    calls = []
    monkeypatch.setattr(fast_state, "_optimizer_state", lambda *a: calls.append(1))
    fast_state.optimizer_state_dict(model, [optimizer])
    assert calls == []  # refused for good: torch's function from now on


def test_a_never_stepped_optimizer_is_left_to_torch():
    model = Tree()
    optimizer = torch.optim.AdamW(model.parameters())
    state = OptimizerState(model, optimizer).state_dict()
    assert state["dcp_plugin_never_stepped"] is True
    assert not optimizer.state


def test_an_optimizer_over_parameters_outside_the_model_gets_torch_s_error():
    model = Tree()
    stray = torch.nn.Parameter(torch.ones(2))
    optimizer = torch.optim.SGD([*model.parameters(), stray], lr=0.1)
    stray.grad = torch.ones(2)
    model(torch.randint(0, 10, (3, 2))).sum().backward()
    optimizer.step()
    with pytest.raises(Exception) as expected:
        get_optimizer_state_dict(model, optimizer)
    with pytest.raises(type(expected.value)):
        fast_state.optimizer_state_dict(model, [optimizer])
