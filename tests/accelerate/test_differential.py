"""The same scenarios with Accelerate's own ``save_state`` / ``load_state`` (the oracle) and with dcp-plugin
enabled: checkpoint names and resumed state must be the same.

Scenarios: automatic naming, ``total_limit``, objects registered for checkpointing, save/load state pre-hooks,
one optimizer over several prepared models, stateful data loaders, resume on 1 process (here) and on 2
processes (``slow``, with ``torchrun``).
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed

import dcp_plugin.accelerate as dpa
from tests.accelerate.test_dropin import WeightsInOwnFormat
from tests.models import assert_same

MODES = ["accelerate", "sync", "thread"]  # "accelerate": Accelerate's own save_state, the oracle


class Counter:
    def __init__(self) -> None:
        self.count = 0
        self.registered = False

    def state_dict(self) -> dict:
        return {"count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.count = state["count"]


@dataclass
class Scenario:
    total_limit: int | None = None
    custom: bool = False
    hooks: bool = False
    multi_model: bool = False
    stateful_dataloader: bool = False
    saves: int = 3


@dataclass
class Observed:
    names: list[list[str]] = field(default_factory=list)  # committed checkpoint names after each save
    at_save: dict = field(default_factory=dict)  # state when the last checkpoint was saved
    resumed: dict = field(default_factory=dict)  # state right after load_state in a fresh Accelerator
    continued: dict = field(default_factory=dict)  # state after training on from the resumed one


def _checkpoint_names(project: str) -> list[str]:
    root = os.path.join(project, "checkpoints")
    return sorted((n for n in os.listdir(root) if not n.startswith(".")), key=lambda n: int(n.split("_")[-1]))


def _build(accelerator: Accelerator, scenario: Scenario, counter: Counter):
    torch.manual_seed(0)
    if scenario.multi_model:
        models = [torch.nn.Linear(16, 12), torch.nn.Linear(12, 8)]
    else:
        models = [torch.nn.Sequential(torch.nn.Linear(16, 12), torch.nn.ReLU(), torch.nn.Linear(12, 8))]
    optimizer = torch.optim.AdamW([p for m in models for p in m.parameters()], lr=1e-2)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
    generator = torch.Generator().manual_seed(0)
    dataset = torch.utils.data.TensorDataset(
        torch.randn(96, 16, generator=generator), torch.randn(96, 8, generator=generator)
    )
    loader = torch.utils.data.DataLoader(dataset, batch_size=8, shuffle=True)
    if scenario.custom:
        accelerator.register_for_checkpointing(counter)
        counter.registered = True
    if scenario.hooks:
        hook = WeightsInOwnFormat()
        accelerator.register_save_state_pre_hook(hook.save)
        accelerator.register_load_state_pre_hook(hook.load)
    *models, optimizer, scheduler, loader = accelerator.prepare(*models, optimizer, scheduler, loader)
    return models, optimizer, scheduler, loader


def _train(accelerator, models, optimizer, scheduler, batches, counter: Counter) -> None:
    for inputs, targets in batches:
        out = inputs + 0.01 * torch.randn_like(inputs)  # the global RNG, restored by both
        for model in models:
            out = model(out)
        accelerator.backward(torch.nn.functional.mse_loss(out, targets))
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        counter.count += 1


def _state(accelerator, models, optimizer, scheduler, counter: Counter) -> dict:
    return {
        "models": [{k: v.detach().clone() for k, v in m.state_dict().items()} for m in models],
        "optimizer": copy.deepcopy(optimizer.optimizer.state_dict()),
        "scheduler": scheduler.state_dict(),
        "counter": counter.count if counter.registered else None,
        "step": accelerator.step,
        "torch_rng": torch.get_rng_state(),
    }


def _accelerator(project: str, scenario: Scenario, mode: str) -> Accelerator:
    accelerator = Accelerator(
        cpu=True,
        project_config=ProjectConfiguration(
            project_dir=project, automatic_checkpoint_naming=True, total_limit=scenario.total_limit
        ),
        dataloader_config=DataLoaderConfiguration(use_stateful_dataloader=scenario.stateful_dataloader),
    )
    if mode != "accelerate":
        assert dpa.enable(accelerator, environ={}, async_mode=mode) is not None
    return accelerator


def run(project: str, scenario: Scenario, mode: str) -> Observed:
    observed = Observed()
    set_seed(7)
    counter = Counter()
    accelerator = _accelerator(project, scenario, mode)
    models, optimizer, scheduler, loader = _build(accelerator, scenario, counter)
    batches = iter(loader)
    for _ in range(scenario.saves):
        _train(accelerator, models, optimizer, scheduler, [next(batches), next(batches)], counter)
        accelerator.step += 1
        accelerator.save_state()
        accelerator.wait_for_everyone()  # committed (and retention applied) once this returns
        observed.names.append(_checkpoint_names(project))
    observed.at_save = _state(accelerator, models, optimizer, scheduler, counter)
    accelerator.end_training()
    AcceleratorState._reset_state(True)
    PartialState._reset_state()

    torch.manual_seed(1234)  # the load must restore the RNG
    counter = Counter()
    accelerator = _accelerator(project, scenario, mode)
    models, optimizer, scheduler, loader = _build(accelerator, scenario, counter)
    accelerator.load_state()
    observed.resumed = _state(accelerator, models, optimizer, scheduler, counter)
    _train(accelerator, models, optimizer, scheduler, list(loader)[:2], counter)
    observed.continued = _state(accelerator, models, optimizer, scheduler, counter)
    accelerator.end_training()
    return observed


def compare(tmp_path, scenario: Scenario) -> None:
    oracle = run(str(tmp_path / "accelerate"), scenario, "accelerate")
    assert_same(oracle.resumed, oracle.at_save)  # the scenario itself resumes exactly with Accelerate
    for mode in MODES[1:]:
        AcceleratorState._reset_state(True)
        PartialState._reset_state()
        ours = run(str(tmp_path / mode), scenario, mode)
        assert ours.names == oracle.names, mode
        assert_same(ours.resumed, oracle.resumed, path=mode)
        assert_same(ours.continued, oracle.continued, path=mode)


SCENARIOS = {
    "automatic_naming": Scenario(),
    "total_limit": Scenario(total_limit=2, saves=4),
    "custom_objects": Scenario(custom=True),
    "state_hooks": Scenario(hooks=True),
    "multi_model_optimizer": Scenario(multi_model=True),
}


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_same_names_and_resumed_state_as_accelerate(tmp_path, name):
    compare(tmp_path, SCENARIOS[name])


def test_stateful_data_loaders_as_accelerate(tmp_path):
    pytest.importorskip("torchdata.stateful_dataloader")
    compare(tmp_path, Scenario(stateful_dataloader=True, custom=True))


class _WithTemperature:
    """CLIP-like training: one optimizer over a prepared model and a bare ``logit_scale`` outside every model."""

    def __init__(self, mode: str) -> None:
        AcceleratorState._reset_state(True)
        PartialState._reset_state()
        self.accelerator = Accelerator(cpu=True)
        if mode != "accelerate":
            dpa.enable(self.accelerator, environ={}, async_mode=mode)
        torch.manual_seed(0)
        model = torch.nn.Linear(16, 8)
        self.logit_scale = torch.nn.Parameter(torch.tensor(2.6592))
        optimizer = torch.optim.AdamW(
            [{"params": model.parameters()}, {"params": [self.logit_scale], "lr": 0.1}], lr=1e-2
        )
        self.model, self.optimizer = self.accelerator.prepare(model, optimizer)

    def train(self, steps: int) -> None:
        data = torch.Generator().manual_seed(self.accelerator.step)
        for _ in range(steps):
            logits = self.model(torch.randn(4, 16, generator=data)) * self.logit_scale.exp()
            self.accelerator.backward(logits.logsumexp(dim=1).mean())
            self.optimizer.step()
            self.optimizer.zero_grad()
            self.accelerator.step += 1

    def state(self) -> dict:
        return {
            "model": {k: v.detach().clone() for k, v in self.model.state_dict().items()},
            "logit_scale": self.logit_scale.detach().clone(),
            "optimizer": copy.deepcopy(self.optimizer.optimizer.state_dict()),
        }


@pytest.mark.parametrize("mode", ["sync", "thread"])
def test_a_parameter_outside_every_prepared_model_resumes_exactly(tmp_path, mode):
    """A resume equals the uninterrupted run, the parameter outside the models (its value and its optimizer
    state) included. Accelerate's own save_state restores its optimizer state but not its value."""
    run = _WithTemperature(mode)
    run.train(3)
    run.accelerator.save_state(str(tmp_path / mode))
    saved = run.state()
    run.train(2)
    uninterrupted = run.state()
    run.accelerator.end_training()

    resumed = _WithTemperature(mode)
    assert not torch.equal(resumed.logit_scale, saved["logit_scale"])  # the save holds a trained value
    resumed.accelerator.load_state(str(tmp_path / mode))
    assert resumed.logit_scale is resumed.optimizer.optimizer.param_groups[1]["params"][0]  # loaded in place
    assert_same(resumed.state(), saved)
    resumed.train(2)
    assert_same(resumed.state(), uninterrupted)
    resumed.accelerator.end_training()

    oracle = _WithTemperature("accelerate")
    oracle.train(3)
    oracle.accelerator.save_state(str(tmp_path / "accelerate"))
    oracle = _WithTemperature("accelerate")
    oracle.accelerator.load_state(str(tmp_path / "accelerate"))
    assert_same(oracle.state()["optimizer"], saved["optimizer"])
    assert not torch.equal(oracle.logit_scale, saved["logit_scale"])


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_two_processes_same_names_and_resumed_state_as_accelerate(tmp_path):
    """``torchrun`` on 2 processes: train and save 3 times with ``total_limit=2``, then resume from the latest."""
    from tests.accelerate.launch import launch, records

    # what both keep (Accelerate's own save_state loses the data loader's epoch and shuffling generator on
    # several processes, so the state after the resumed epochs is not compared)
    kept = ("model", "optimizer", "scheduler", "torch_rng", "python_rng", "numpy_rng", "step")
    observed = {}
    for mode, env in (("accelerate", {"DCP_PLUGIN_ENABLE": "0"}), ("dcp", {"DCP_PLUGIN_ASYNC_MODE": "thread"})):
        project, record = str(tmp_path / mode), str(tmp_path / f"{mode}_rec")
        common = ["--project", project, "--record", record, "--total-limit", "2"]
        launch(["train", "--epochs", "3", "--save-epochs", "1,2,3", *common], nproc=2, env=env)
        names = _checkpoint_names(project)
        launch(["resume", "--epochs", "3", *common], nproc=2, env=env)
        observed[mode] = (names, records(record, "save3", 2), records(record, "loaded", 2))
    oracle, ours = observed["accelerate"], observed["dcp"]
    assert ours[0] == oracle[0] == ["checkpoint_1", "checkpoint_2"]
    for rank in range(2):
        for key in kept:
            assert_same(oracle[2][rank][key], oracle[1][rank][key], f"accelerate rank {rank} {key}")
            assert_same(ours[2][rank][key], oracle[2][rank][key], f"rank {rank} {key}")


def _resumed_tail(full: dict, resumed: dict, epoch: int, batch: int) -> None:
    """The resumed run saw the uninterrupted run's batches after (epoch, batch), with the same losses, and
    ended with the same weights."""
    tail = [seen for seen in full["seen"] if seen[:2] > (epoch, batch)]
    assert [seen[:2] for seen in resumed["seen"]] == [seen[:2] for seen in tail]
    for ours, expected in zip(resumed["seen"], tail):
        assert torch.equal(ours[2], expected[2]), f"batch {ours[:2]} differs"
    assert [seen[3] for seen in resumed["seen"]] == [seen[3] for seen in tail]
    assert_same(resumed["model"], full["model"], "model")


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_mid_epoch_resume_with_skip_first_batches_sees_the_uninterrupted_batches(tmp_path):
    """``accelerate launch`` on 2 processes, shuffled data: ``save_state()`` after batch 3 of an epoch, then a new
    launch runs ``load_state()`` and ``skip_first_batches(dataloader, 3)``. With Accelerate's own save_state (the
    oracle) and with dcp-plugin, the batches, losses and final weights are the uninterrupted run's; dcp-plugin
    also in a later epoch (Accelerate's own save_state does not keep the shuffling generator), and for a save on an
    epoch's last batch resumed as Accelerate's checkpointing example does (``starting_epoch = step //
    len(dataloader)``, then ``skip_first_batches(dataloader, 0)``), where Accelerate's own save_state replays the
    previous epoch's order."""
    from tests.accelerate.launch import SCRIPT, launch

    script = SCRIPT.with_name("mid_epoch_script.py")

    def run(name: str, args: list[str], **env: str) -> list[dict]:
        out = str(tmp_path / name)
        launch([*args, "--out", out], nproc=2, env=env, script=script, launcher="accelerate")
        return [torch.load(f"{out}_rank{rank}.pt", weights_only=False) for rank in range(2)]

    def resume(name: str, checkpoint: Path, epoch: int, **env: str) -> tuple[list[dict], int, int]:
        return run(name, ["resume", "--load", str(checkpoint), "--epoch", str(epoch), "--skip", "3"], **env), epoch, 3

    ours, oracle = tmp_path / "dcp", tmp_path / "accelerate"
    save_at = "0:3,1:3,0:8"  # 8 batches per epoch and process: 0:8 is epoch 0's last batch
    full = run("full", ["train", "--save-dir", str(ours), "--oracle-dir", str(oracle), "--save-at", save_at])
    resumes = [
        resume("oracle_e0", oracle / "e0_b3", 0, DCP_PLUGIN_ENABLE="0"),
        resume("ours_e0", ours / "e0_b3", 0),
        resume("ours_e1", ours / "e1_b3", 1),
        (run("ours_last", ["resume", "--load", str(ours / "e0_b8"), "--step", "8"]), 0, 8),
    ]
    for resumed, epoch, batch in resumes:
        for rank in range(2):
            _resumed_tail(full[rank], resumed[rank], epoch, batch)
