"""Stateful wrappers: canonical FQN keys, optimizer state that survives a round trip, RNG, per-rank values."""

from __future__ import annotations

import random

import pytest
import torch

from dcp_plugin.format.state import (
    ModelState,
    OptimizerState,
    PerRank,
    RNGState,
    defines_structure,
    is_per_rank,
    models_in,
    optimizers_in,
    wrap_state,
)
from tests.models import make_training, train_step


def test_model_state_uses_parameter_names():
    model, _, _ = make_training()
    keys = set(ModelState(model).state_dict())
    assert keys == set(model.state_dict()) and "0.weight" in keys


def test_optimizer_state_is_keyed_by_parameter_name_and_round_trips():
    model, optimizer, _ = make_training()
    train_step(model, optimizer)
    state = OptimizerState(model, optimizer).state_dict()
    assert "0.weight" in state["state"] and "exp_avg" in state["state"]["0.weight"]
    model2, optimizer2, _ = make_training(seed=7)
    OptimizerState(model2, optimizer2).load_state_dict(state)
    for name, param in model2.named_parameters():
        moments = optimizer2.state[param]["exp_avg"]
        assert torch.equal(moments, state["state"][name]["exp_avg"])


def test_saving_an_optimizer_that_never_stepped_leaves_it_untouched():
    model, optimizer, _ = make_training()
    state = OptimizerState(model, optimizer).state_dict()
    assert not optimizer.state  # torch's zero-lr materialising step was undone
    model2, optimizer2, _ = make_training(seed=3)
    OptimizerState(model2, optimizer2).load_state_dict(state)
    assert not optimizer2.state


def test_rng_state_restores_every_generator():
    saved = RNGState().state_dict()
    expected = (random.random(), torch.rand(3))
    RNGState().load_state_dict(saved)
    assert random.random() == expected[0] and torch.equal(torch.rand(3), expected[1])


def test_per_rank_wraps_values_and_statefuls():
    value = PerRank({"cursor": 5})
    assert value.state_dict() == {"cursor": 5} and is_per_rank(value) and is_per_rank(RNGState())
    value.load_state_dict({"cursor": 9})
    assert value.value == {"cursor": 9}
    inner = PerRank(RNGState())
    assert "torch" in inner.state_dict()


def test_wrap_state_wraps_bare_modules_and_optimizers():
    model, optimizer, scheduler = make_training()
    wrapped = wrap_state({"model": model, "optim": optimizer, "sched": scheduler, "step": 3})
    assert isinstance(wrapped["model"], ModelState) and isinstance(wrapped["optim"], OptimizerState)
    assert wrapped["sched"] is scheduler and wrapped["step"] == 3
    assert models_in(wrapped) == [model] and optimizers_in(wrapped) == [optimizer]
    assert defines_structure(wrapped["model"]) and not defines_structure(scheduler)


@pytest.mark.parametrize(
    "state, error, message",
    [
        ({"": 1}, TypeError, "non-empty strings"),
        ({"a/b": 1}, ValueError, "may not contain"),
        ({"__x": 1}, ValueError, "start with '__'"),
    ],
)
def test_wrap_state_rejects_bad_names(state, error, message):
    with pytest.raises(error, match=message):
        wrap_state(state)


def test_an_optimizer_next_to_two_models_must_be_wrapped():
    model, optimizer, _ = make_training()
    with pytest.raises(ValueError, match="OptimizerState"):
        wrap_state({"a": model, "b": make_training()[0], "optim": optimizer})
