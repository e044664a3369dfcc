"""What Accelerate's own tests and users' code expect of an Accelerator, with dcp-plugin enabled."""

from __future__ import annotations

import copy
import pickle

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import ProjectConfiguration

import dcp_plugin.accelerate as dpa
from tests.models import assert_same, make_training, snapshot, train_step


def auto_accelerator(project: str, total_limit: int | None = None) -> Accelerator:
    config = ProjectConfiguration(project_dir=project, automatic_checkpoint_naming=True, total_limit=total_limit)
    return Accelerator(cpu=True, project_config=config)


# -- item: copyable after use ------------------------------------------------------------------------
def test_an_accelerator_that_saved_can_be_pickled_and_the_copy_starts_fresh(tmp_path):
    accelerator = auto_accelerator(str(tmp_path))
    dpa.enable(accelerator, environ={}, async_mode="thread")
    model, optimizer, scheduler = accelerator.prepare(*make_training())
    train_step(model, optimizer, scheduler)
    accelerator.save_state()  # a save in flight: a writer thread, locks, a staging buffer
    clone = pickle.loads(pickle.dumps(accelerator))
    accelerator.wait_for_everyone()

    copied = dpa.checkpointer_of(clone)
    assert copied is not None and copied is not dpa.checkpointer_of(accelerator)
    assert copied.accelerator is clone and copied._checkpointer is None  # starts fresh
    assert copied.config == dpa.checkpointer_of(accelerator).config
    # the copy's methods are bound to the copy and go through dcp-plugin
    assert clone.save_state.accelerator is clone
    assert clone.load_state().name == "checkpoint_0"
    assert_same(snapshot(clone._models[0]), snapshot(model))
    clone.end_training()
    accelerator.end_training()


def test_deep_copies_after_a_save(tmp_path):
    accelerator = auto_accelerator(str(tmp_path))
    checkpointer = dpa.enable(accelerator, environ={}, async_mode="thread")
    model, optimizer, scheduler = accelerator.prepare(*make_training())
    accelerator.save_state()
    assert copy.deepcopy(accelerator) is accelerator  # Accelerate's own rule: the copy is the object itself
    # what holds the checkpointer (Lightning-style callback lists, configs) deep-copies it: a fresh one
    holder = copy.deepcopy({"checkpointer": checkpointer})
    fresh = holder["checkpointer"]
    assert fresh is not checkpointer and fresh._checkpointer is None and fresh.config == checkpointer.config
    accelerator.end_training()


# -- item: standard DCP tools read our checkpoints right -----------------------------------------------
def _saved_checkpoint(tmp_path):
    accelerator = auto_accelerator(str(tmp_path))
    dpa.enable(accelerator, environ={}, async_mode="sync")
    model, optimizer, scheduler = accelerator.prepare(*make_training())
    train_step(model, optimizer, scheduler)
    path = accelerator.save_state()
    accelerator.end_training()
    return path, model, optimizer


def test_dcp_to_torch_save_rebuilds_the_nested_state(tmp_path):
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    path, model, optimizer = _saved_checkpoint(tmp_path)
    dcp_to_torch_save(path, tmp_path / "full.pt")
    full = torch.load(tmp_path / "full.pt", weights_only=True)
    assert {"model", "optimizer"} <= set(full)  # entries holding tensors (the rest is in the skeleton)
    assert_same(full["model"], model.state_dict())
    state = full["optimizer"]["state"]
    assert set(state) == {name for name, _ in model.named_parameters()}
    assert all(set(moments) >= {"exp_avg", "exp_avg_sq"} for moments in state.values())
    assert not any(key.startswith("model.") for key in full)


def test_accelerate_merge_weights_refuses_a_full_training_checkpoint(tmp_path):
    import subprocess
    import sys

    path, model, _ = _saved_checkpoint(tmp_path)
    out = tmp_path / "merged"
    run = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.accelerate_cli", "merge-weights", path, str(out)],
        capture_output=True,
        text=True,
        timeout=240,
    )
    # before: exit 0 and optimizer moments written under "model." keys; now: refused, nothing written
    assert run.returncode != 0
    assert "expected torch.Tensor" in run.stderr
    assert not (out / "model.safetensors").exists()
    # the documented way: only the model's weights
    from safetensors.torch import load_file

    dpa.export_weights(path, str(tmp_path / "exported"))
    weights = load_file(tmp_path / "exported" / "model.safetensors")
    assert_same(weights, model.state_dict())


def test_checkpoints_written_before_the_nesting_still_load(tmp_path, monkeypatch):
    """Checkpoints of earlier versions were handed to DCP flat; they must keep loading."""
    from dcp_plugin.format import packing

    original = packing.Packed.flat
    monkeypatch.setattr(packing.Packed, "flat", property(lambda self: self.tensors))  # the old format
    path, model, optimizer = _saved_checkpoint(tmp_path)
    monkeypatch.setattr(packing.Packed, "flat", original)
    expected = snapshot(model, optimizer)
    AcceleratorState._reset_state(True)
    again = auto_accelerator(str(tmp_path))
    dpa.enable(again, environ={})
    model2, optimizer2, _ = again.prepare(*make_training(seed=3))
    again.load_state(path)
    assert_same(snapshot(model2, optimizer2), expected)
    again.end_training()


# -- item: setups Accelerate allows --------------------------------------------------------------------
def two_models_one_optimizer(seed: int = 0):
    torch.manual_seed(seed)
    encoder, head = torch.nn.Linear(16, 8), torch.nn.Linear(8, 4)
    optimizer = torch.optim.AdamW([*encoder.parameters(), *head.parameters()], lr=1e-2)
    return encoder, head, optimizer


def step_two(encoder, head, optimizer) -> None:
    loss = head(encoder(torch.randn(4, 16))).pow(2).mean()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()


def test_one_optimizer_over_several_prepared_models_saves_and_resumes(tmp_path):
    accelerator = auto_accelerator(str(tmp_path))
    dpa.enable(accelerator, environ={}, async_mode="thread")
    encoder, head, optimizer = accelerator.prepare(*two_models_one_optimizer())
    step_two(encoder, head, optimizer)
    expected = (snapshot(encoder), snapshot(head), optimizer.state_dict())
    accelerator.save_state()
    accelerator.end_training()

    AcceleratorState._reset_state(True)
    again = auto_accelerator(str(tmp_path))
    dpa.enable(again, environ={})
    encoder2, head2, optimizer2 = again.prepare(*two_models_one_optimizer(seed=4))
    again.load_state()
    assert_same((snapshot(encoder2), snapshot(head2), optimizer2.state_dict()), expected)
    again.end_training()


class WeightsInOwnFormat:
    """A save hook that writes each model itself and keeps Accelerate from writing it (as PEFT/diffusers do),
    and the load hook that reads it back."""

    def __init__(self) -> None:
        self.saved_to: list[str] = []
        self.loaded_from: list[str] = []

    def save(self, models, weights, output_dir):
        self.saved_to.append(output_dir)
        for i, model in enumerate(models):
            torch.save(model.state_dict(), f"{output_dir}/own_{i}.pt")
        while weights:
            weights.pop()

    def load(self, models, input_dir):
        import os

        self.loaded_from.append(sorted(os.listdir(input_dir)))
        for i in range(len(models)):
            models[0].load_state_dict(torch.load(f"{input_dir}/own_{i}.pt", weights_only=True))
            models.pop(0)


def test_save_and_load_state_pre_hooks_run_as_in_accelerate(tmp_path):
    accelerator = auto_accelerator(str(tmp_path))
    dpa.enable(accelerator, environ={}, async_mode="thread")
    hook = WeightsInOwnFormat()
    accelerator.register_save_state_pre_hook(hook.save)
    accelerator.register_load_state_pre_hook(hook.load)
    model, optimizer, scheduler = accelerator.prepare(*make_training())
    train_step(model, optimizer, scheduler)
    expected = snapshot(model, optimizer)
    path = accelerator.save_state()
    accelerator.wait_for_everyone()  # the documented way to wait until the checkpoint is committed
    info = dpa.checkpointer_of(accelerator).latest()
    assert info is not None and info.url == path
    assert "model" not in info.manifest["entries"]  # the hook took the model over
    assert "optimizer" in info.manifest["entries"]  # the optimizer is always saved, as in Accelerate
    train_step(model, optimizer, scheduler)
    accelerator.load_state()
    assert hook.loaded_from == [["own_0.pt"]]
    assert_same(snapshot(model, optimizer), expected)
    accelerator.end_training()
