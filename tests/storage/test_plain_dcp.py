"""Directories written by plain ``dcp.save`` (torchtitan's ``step-N`` folders, no manifest): read unverified and
read-only, listed as such, adopted into regular checkpoints; hostile ones still refused."""

from __future__ import annotations

import json
import os
import pickle
from dataclasses import dataclass

import pytest
import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

from dcp_plugin import OptimizerState
from dcp_plugin.checkpointer import Checkpointer
from dcp_plugin.cli.main import main
from dcp_plugin.config import CheckpointConfig
from dcp_plugin.errors import CheckpointCorruptError, UnsafeCheckpointError
from dcp_plugin.storage import MANIFEST_NAME, CheckpointStorage
from tests.models import assert_same, make_model, snapshot

RAN: list[str] = []


def _ran() -> None:
    RAN.append("code from the checkpoint ran")


class _Payload:
    def __reduce__(self) -> tuple:
        return (_ran, ())


def _trained() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    model = make_model(seed=5)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    for _ in range(2):
        model(torch.randn(4, 16)).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    return model, optimizer


def _dcp_save(directory, model, optimizer, step: int, extra: object = None) -> str:
    """What torchtitan writes: ``dcp.save`` of canonical state dicts into ``step-N``."""
    path = os.fspath(directory / f"step-{step}")
    state = {
        "model": get_model_state_dict(model),
        "optim": get_optimizer_state_dict(model, optimizer),
        "train_state": {"step": step, "tokens": [step * 10]},
    }
    if extra is not None:
        state["extra"] = extra
    dcp.save(state, checkpoint_id=path, no_dist=True)
    return path


def _files(path: str) -> dict[str, int]:
    return {name: os.stat(os.path.join(path, name)).st_mtime_ns for name in sorted(os.listdir(path))}


@dataclass
class _Result:
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture
def cli(capsys):
    """The dcp-plugin command, run in this process."""

    def run(*args: str) -> _Result:
        capsys.readouterr()
        code = main(list(args))
        out, err = capsys.readouterr()
        return _Result(code, out, err)

    return run


@pytest.fixture
def checkpointer():
    checkpointer = Checkpointer(CheckpointConfig(async_mode="sync"), distributed=False)
    yield checkpointer
    checkpointer.close()


def test_load_and_read_a_plain_dcp_directory_unverified_and_read_only(tmp_path, checkpointer):
    model, optimizer = _trained()
    path = _dcp_save(tmp_path, model, optimizer, 10)
    before = _files(path)

    fresh_model = make_model(seed=0)
    fresh_optimizer = torch.optim.AdamW(fresh_model.parameters(), lr=1.0)
    state = {"model": fresh_model, "optim": OptimizerState(fresh_model, fresh_optimizer), "train_state": None}
    info = checkpointer.load(path, state)
    assert info.unverified and info.step == 10
    assert_same(snapshot(model, optimizer), snapshot(fresh_model, fresh_optimizer))
    assert state["train_state"] == {"step": 10, "tokens": [100]}

    read = checkpointer.read(path, entries=["optim"])
    assert read["optim"]["param_groups"][0]["lr"] == 2e-3
    assert _files(path) == before  # nothing written, nothing added


def test_cli_lists_inspects_verifies_and_exports_plain_dcp(tmp_path, cli):
    model, optimizer = _trained()
    for step in (10, 20):
        _dcp_save(tmp_path, model, optimizer, step)
    listed = json.loads(cli("ls", os.fspath(tmp_path), "--json").stdout)
    assert [row["name"] for row in listed["plain_dcp"]] == ["step-10", "step-20"]
    assert all(row["unverified"] for row in listed["plain_dcp"]) and listed["checkpoints"] == []
    assert "PLAIN DCP (unverified)" in cli("ls", os.fspath(tmp_path)).stdout
    latest = cli("latest", os.fspath(tmp_path))
    assert latest.returncode == 1 and "plain DCP directories" in latest.stderr and "step-20" in latest.stderr

    step = os.fspath(tmp_path / "step-20")
    inspected = json.loads(cli("inspect", step, "--json").stdout)
    assert inspected["unverified"] and "model.0.weight" in {t["key"] for t in inspected["tensors"]}
    verified = cli("verify", step)
    assert verified.returncode == 0 and "unverified" in verified.stdout
    output = os.fspath(tmp_path / "model.safetensors")
    assert cli("export", step, output).returncode == 0
    assert_same(load_file(output), {k: v.detach() for k, v in model.state_dict().items()})


def test_adopt_commits_checksums_and_the_checkpoint_is_then_regular(tmp_path, checkpointer, cli):
    model, optimizer = _trained()
    path = _dcp_save(tmp_path, model, optimizer, 30)
    adopted = cli("adopt", path)
    assert adopted.returncode == 0, adopted.stderr
    storage = CheckpointStorage(tmp_path)
    [info] = storage.list()
    assert info.name == "step-30" and info.has_checksums and not info.unverified and storage.verify(info) == []
    assert storage.plain_dcp() == []

    fresh_model = make_model(seed=0)
    fresh_optimizer = torch.optim.AdamW(fresh_model.parameters(), lr=1.0)
    checkpointer.load(path, {"model": fresh_model, "optim": OptimizerState(fresh_model, fresh_optimizer)})
    assert_same(snapshot(model, optimizer), snapshot(fresh_model, fresh_optimizer))

    data = os.path.join(path, "__0_0.distcp")
    with open(data, "r+b") as handle:  # a bit flip after adoption is caught
        handle.seek(100)
        byte = handle.read(1)
        handle.seek(100)
        handle.write(bytes([byte[0] ^ 1]))
    assert any("__0_0.distcp" in problem for problem in storage.verify(info))
    with pytest.raises(CheckpointCorruptError, match="__0_0.distcp"):
        checkpointer.load(path, {"model": make_model(seed=0)}, strict=False)
    assert cli("adopt", path).returncode == 1  # already a checkpoint: nothing is adopted twice


def test_pickle_payloads_in_plain_dcp_are_refused(tmp_path, checkpointer, cli):
    model, optimizer = _trained()
    evil_metadata = _dcp_save(tmp_path, model, optimizer, 1)
    with open(os.path.join(evil_metadata, ".metadata"), "wb") as handle:
        pickle.dump(_Payload(), handle)
    evil_value = _dcp_save(tmp_path, model, optimizer, 2, extra={"note": _Payload()})
    storage = CheckpointStorage(tmp_path)

    with pytest.raises(UnsafeCheckpointError):
        storage.info("step-1")
    adopted = cli("adopt", evil_metadata)
    assert adopted.returncode == 1 and "refusing" in adopted.stderr
    assert not os.path.exists(os.path.join(evil_metadata, MANIFEST_NAME))
    listed = json.loads(cli("ls", os.fspath(tmp_path), "--json").stdout)
    assert [row["name"] for row in listed["plain_dcp"] if "refused" in row] == ["step-1"]

    with pytest.raises(UnsafeCheckpointError, match="extra.note"):
        checkpointer.load(evil_value, {"extra": None})
    assert RAN == []


def test_torchtitans_own_layout_loads_model_weights_from_the_top_level(tmp_path, checkpointer):
    model, optimizer = _trained()
    flat = StateDictOptions(flatten_optimizer_state_dict=True)  # what torchtitan's OptimizersContainer saves
    path = os.fspath(tmp_path / "step-7")
    state = {
        **get_model_state_dict(model),  # torchtitan puts the model's weights at the top level
        "optimizer": get_optimizer_state_dict(model, optimizer, options=flat),
        "train_state": {"step": 7},
    }
    dcp.save(state, checkpoint_id=path, no_dist=True)

    fresh_model = make_model(seed=0)
    fresh_optimizer = torch.optim.AdamW(fresh_model.parameters(), lr=1.0)
    live = {"model": fresh_model, "optimizer": OptimizerState(fresh_model, fresh_optimizer, flat), "train_state": 0}
    checkpointer.load(path, live)
    assert_same(snapshot(model, optimizer), snapshot(fresh_model, fresh_optimizer))
    assert live["train_state"] == {"step": 7}


def plain_fsdp_save(rank, world_size, path):
    """torchtitan's way on 2 ranks: FSDP2-sharded model and optimizer saved with plain ``dcp.save``."""
    from tests.test_distributed import _fsdp_training, _full_state

    model, optimizer = _fsdp_training(0)
    torch.manual_seed(11)
    model(torch.randn(8, 16)).pow(2).mean().backward()
    optimizer.step()
    dcp.save(
        {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optimizer)}, checkpoint_id=path
    )
    return _full_state(model, optimizer)


@pytest.mark.slow
def test_a_sharded_plain_dcp_save_loads_resharded_on_one_process(tmp_path, checkpointer):
    from tests.multiproc import run_ranks

    path = os.fspath(tmp_path / "step-1")
    saved = run_ranks(plain_fsdp_save, path)[0]
    model = make_model(seed=9)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1.0)
    checkpointer.load(path, {"model": model, "optim": OptimizerState(model, optimizer)})
    assert_same(saved["model"], {k: v.detach() for k, v in get_model_state_dict(model).items()})
    assert_same(saved["optim"]["state"], get_optimizer_state_dict(model, optimizer)["state"])
    assert optimizer.param_groups[0]["lr"] == 1e-2
