"""What a load does around torch's state-dict helpers: state dicts of models whose names need no translation
taken directly (the same as torch's helpers give), an optimizer that never stepped given its state without a
step, and ``load_state_dict`` calls that would only copy tensors onto themselves skipped. Each is checked against
torch's own path; hooks and overrides make the load take torch's path."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.distributed.checkpoint.state_dict import _init_optim_state, get_model_state_dict, get_optimizer_state_dict
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from dcp_plugin import CheckpointConfig, Checkpointer
from dcp_plugin.format import plain_names
from dcp_plugin.format.optim_targets import materialize
from tests.models import assert_same, snapshot

pytestmark = pytest.mark.timeout(60)


class Tied(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(10, 6)
        self.blocks = torch.nn.Sequential(torch.nn.Linear(6, 6), torch.nn.LayerNorm(6), torch.nn.Linear(6, 6))
        self.head = torch.nn.Linear(6, 10, bias=False)
        self.head.weight = self.embed.weight
        self.register_buffer("scale", torch.ones(3))
        self.register_buffer("scratch", torch.zeros(2), persistent=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.embed(tokens))) * self.scale.sum()


def _trained(seed: int = 0, lr: float = 1e-2) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = Tied()
    groups = [
        {"params": [*model.embed.parameters(), *model.blocks[0].parameters()]},
        {"params": [*model.blocks[1].parameters(), *model.blocks[2].parameters()], "lr": lr / 10},
    ]
    optimizer = torch.optim.AdamW(groups, lr=lr, weight_decay=0.1)
    for _ in range(2):
        model(torch.randint(0, 10, (4,))).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    return model, optimizer


def test_state_dicts_of_a_plain_model_are_torch_helpers_own():
    model, optimizer = _trained()
    ours, theirs = plain_names.model_state_dict(model), get_model_state_dict(model)
    assert ours is not None and list(ours) == list(theirs)
    assert all(ours[k].data_ptr() == theirs[k].data_ptr() and torch.equal(ours[k], theirs[k]) for k in theirs)
    ours_optim, theirs_optim = (
        plain_names.optimizer_state_dict(model, optimizer),
        get_optimizer_state_dict(model, optimizer),
    )
    assert ours_optim is not None and list(ours_optim["state"]) == list(theirs_optim["state"])
    assert_same(ours_optim, theirs_optim)


def test_wrapped_models_are_left_to_torch_helpers():
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    class Modified(torch.nn.Linear):
        def _fqn_modifiers(self) -> dict[str, str]:
            return {}

    for wrapped in (
        torch.compile(torch.nn.Linear(2, 2)),
        torch.nn.Sequential(checkpoint_wrapper(torch.nn.Linear(2, 2))),
        torch.nn.Sequential(Modified(2, 2)),
    ):
        assert not plain_names.names_are_canonical(wrapped)
        assert plain_names.model_state_dict(wrapped) is None
    assert plain_names.model_state_dict(torch.nn.ReLU()) is None  # no state: torch's helper says so


@pytest.mark.parametrize(
    ("cls", "options"),
    [
        (torch.optim.AdamW, {}),
        (torch.optim.Adam, {"amsgrad": True}),
        (torch.optim.SGD, {"momentum": 0.9}),
        (torch.optim.RMSprop, {"centered": True}),
        (torch.optim.NAdam, {}),
        (torch.optim.Adafactor, {}),
    ],
)
def test_an_optimizer_that_never_stepped_gets_the_state_its_first_step_makes_without_a_step(cls, options):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2).to(torch.bfloat16))
    model[1].bias.requires_grad_(False)
    before = copy.deepcopy(model.state_dict())
    ours, theirs = cls(model.parameters(), **options), cls(model.parameters(), **options)
    assert materialize(ours)
    assert_same(before, model.state_dict())
    assert all(param.grad is None for param in model.parameters())
    _init_optim_state(theirs)
    assert list(ours.state) == list(theirs.state)
    for param, state in theirs.state.items():
        assert sorted(ours.state[param]) == sorted(state)
        for key, value in state.items():
            mine = ours.state[param][key]
            if torch.is_tensor(value):
                assert (mine.shape, mine.dtype, mine.device, mine.stride()) == (
                    value.shape,
                    value.dtype,
                    value.device,
                    value.stride(),
                )
            else:
                assert mine == value


def _save(tmp_path, model, optimizer) -> str:
    path = str(tmp_path / "ckpt")
    checkpointer = Checkpointer(CheckpointConfig(async_mode="sync"))
    checkpointer.save(path, {"model": model, "optim": optimizer}, step=1)
    checkpointer.close()
    return path


def _load(path: str, model, optimizer) -> None:
    checkpointer = Checkpointer(CheckpointConfig(async_mode="sync"))
    checkpointer.load(path, {"model": model, "optim": optimizer})
    checkpointer.close()


def _count_torch_helpers(monkeypatch) -> list[str]:
    from dcp_plugin.format import state

    calls: list[str] = []
    helpers = ("set_model_state_dict", "set_optimizer_state_dict", "get_model_state_dict", "get_optimizer_state_dict")
    for name in helpers:
        real = getattr(state, name)
        monkeypatch.setattr(state, name, lambda *a, _real=real, _name=name, **k: calls.append(_name) or _real(*a, **k))
    return calls


def test_a_fresh_model_and_optimizer_end_exactly_as_torch_load_state_dict_leaves_them(tmp_path, monkeypatch):
    model, optimizer = _trained()
    path = _save(tmp_path, model, optimizer)
    fresh, fresh_optimizer = _trained(seed=1, lr=0.5)  # other weights, other learning rates, state of its own
    never, never_optimizer = Tied(), None
    never_optimizer = torch.optim.AdamW(
        [
            {"params": [*never.embed.parameters(), *never.blocks[0].parameters()]},
            {"params": [*never.blocks[1].parameters(), *never.blocks[2].parameters()]},
        ],
        lr=3.0,
    )
    calls = _count_torch_helpers(monkeypatch)
    _load(path, fresh, fresh_optimizer)
    _load(path, never, never_optimizer)
    assert calls == []  # every tensor was read in place: nothing was left for torch's helpers to do
    reference, reference_optimizer = _trained(seed=1)
    reference.load_state_dict(copy.deepcopy(model.state_dict()))
    reference_optimizer.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    expected = snapshot(reference, reference_optimizer)
    assert_same(expected, snapshot(fresh, fresh_optimizer))
    assert_same(expected, snapshot(never, never_optimizer))
    assert never.head.weight is never.embed.weight


def test_hooks_and_overrides_take_torch_load_state_dict(tmp_path, monkeypatch):
    model, optimizer = _trained()
    path = _save(tmp_path, model, optimizer)
    fresh, fresh_optimizer = _trained(seed=1)
    called = []
    fresh.blocks[1].register_load_state_dict_post_hook(lambda module, keys: called.append("model"))
    fresh_optimizer.register_load_state_dict_pre_hook(lambda opt, state: called.append("optimizer"))
    calls = _count_torch_helpers(monkeypatch)
    _load(path, fresh, fresh_optimizer)
    assert sorted(called) == ["model", "optimizer"]
    assert sorted(calls) == ["set_model_state_dict", "set_optimizer_state_dict"]
    assert_same(snapshot(model, optimizer), snapshot(fresh, fresh_optimizer))


def test_a_failed_load_leaves_an_optimizer_that_never_stepped_without_state(tmp_path):
    model, optimizer = _trained()
    path = _save(tmp_path, model, optimizer)
    fresh = torch.nn.Linear(3, 3)  # not the saved model: strict matching refuses it
    fresh_optimizer = torch.optim.AdamW(fresh.parameters())
    with pytest.raises(KeyError):
        _load(path, fresh, fresh_optimizer)
    assert not fresh_optimizer.state


def test_the_stand_in_step_never_steps_the_live_optimizer_nor_runs_its_hooks(tmp_path):
    model, optimizer = _trained()
    path = _save(tmp_path, model, optimizer)
    fresh = Tied()
    fresh_optimizer = torch.optim.AdamW(
        [
            {"params": [*fresh.embed.parameters(), *fresh.blocks[0].parameters()]},
            {"params": [*fresh.blocks[1].parameters(), *fresh.blocks[2].parameters()]},
        ]
    )
    torch.optim.lr_scheduler.StepLR(fresh_optimizer, step_size=1)  # wraps the live optimizer's step
    for param in fresh.parameters():
        param.grad = torch.ones_like(param)  # a live step would move every parameter
    before = copy.deepcopy(fresh.state_dict())
    hooked: list[object] = []
    handles = [
        register_optimizer_step_pre_hook(lambda opt, *_: hooked.append(opt)),
        register_optimizer_step_post_hook(lambda opt, *_: hooked.append(opt)),
        fresh_optimizer.register_step_pre_hook(lambda opt, *_: hooked.append(opt)),
    ]
    try:
        assert materialize(fresh_optimizer)
    finally:
        for handle in handles:
            handle.remove()
    assert not getattr(fresh_optimizer, "_opt_called", False) and hooked == []  # no hook saw the stand-in step
    assert_same(before, fresh.state_dict())
    fresh_optimizer.state.clear()
    _load(path, fresh, fresh_optimizer)
    assert not getattr(fresh_optimizer, "_opt_called", False)
    assert_same(snapshot(model, optimizer), snapshot(fresh, fresh_optimizer))
