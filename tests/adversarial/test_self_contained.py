"""What dcp-plugin verifies is what PyTorch's readers read, and a local checkpoint
directory holds everything it needs (the shared blob area is a writer's accelerator, not a reader's dependency)."""

from __future__ import annotations

import os
import shutil

import pytest
import torch
import torch.distributed.checkpoint as dcp

from dcp_plugin import Checkpointer, CheckpointManager, ModelState
from dcp_plugin.cli.main import main as cli
from dcp_plugin.errors import CheckpointCorruptError
from dcp_plugin.storage import CheckpointStorage, copy_checkpoint
from tests.adversarial.helpers import INCREMENTAL, blob_links, flip_a_tensor_byte, torch_oracle, two_incremental_saves
from tests.models import make_lora


def test_an_edited_blob_link_fails_verify_and_load_as_it_changes_what_pytorch_reads(ckpt_dir, tmp_path):
    model = two_incremental_saves(ckpt_dir)
    directory = os.path.join(ckpt_dir, INCREMENTAL)
    before = torch_oracle(directory, str(tmp_path))
    flip_a_tensor_byte(os.path.join(directory, blob_links(directory)[0]))
    after = torch_oracle(directory, str(tmp_path))
    assert any(not torch.equal(before["model"][k], after["model"][k]) for k in before["model"])  # PyTorch sees it

    problems = CheckpointStorage(ckpt_dir).verify(INCREMENTAL)
    assert any("does not match its checksum" in p for p in problems), problems
    assert cli(["verify", directory]) == 1
    with pytest.raises(CheckpointCorruptError, match="blob_"):
        CheckpointManager(ckpt_dir).read(2)
    with pytest.raises(CheckpointCorruptError, match="blob_"):
        CheckpointManager(ckpt_dir).load({"model": ModelState(make_lora(1, width=128, layers=2))}, step=2)
    # the first checkpoint's own link still holds the original bytes: it is named as the fallback and loads
    fresh = make_lora(1, width=128, layers=2)
    CheckpointManager(ckpt_dir).load({"model": ModelState(fresh)}, step=1)
    for key, value in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value)


def _loads_exactly(root: str, name: str, model: torch.nn.Module) -> None:
    fresh = make_lora(7, width=128, layers=2)
    Checkpointer().load(os.path.join(root, name), {"model": ModelState(fresh)})
    for key, value in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key


def test_a_checkpoint_loads_and_verifies_after_the_work_area_is_removed(ckpt_dir, tmp_path):
    model = two_incremental_saves(ckpt_dir)
    shutil.rmtree(os.path.join(ckpt_dir, ".dcp-plugin"))
    directory = os.path.join(ckpt_dir, INCREMENTAL)
    assert CheckpointStorage(ckpt_dir).verify(INCREMENTAL) == []
    assert cli(["verify", "--load", directory]) == 0
    _loads_exactly(ckpt_dir, INCREMENTAL, model)
    read = CheckpointManager(ckpt_dir).read(2)["model"]
    oracle = torch_oracle(directory, str(tmp_path))["model"]
    assert set(read) == set(oracle) and all(torch.equal(read[k], oracle[k]) for k in oracle)
    # copies of it are self-contained too
    copied = copy_checkpoint(CheckpointStorage(ckpt_dir), INCREMENTAL, CheckpointStorage(str(tmp_path / "copy")))
    assert copied.manifest.get("blobs") is None
    _loads_exactly(str(tmp_path / "copy"), INCREMENTAL, model)


def test_a_checkpoint_copied_elsewhere_with_cp_loads_and_verifies_there(ckpt_dir, tmp_path):
    model = two_incremental_saves(ckpt_dir)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.copytree(os.path.join(ckpt_dir, INCREMENTAL), elsewhere / INCREMENTAL, symlinks=True)  # cp -a
    shutil.rmtree(ckpt_dir)
    assert CheckpointStorage(str(elsewhere)).verify(INCREMENTAL) == []
    _loads_exactly(str(elsewhere), INCREMENTAL, model)
    state = {"model": {k: torch.empty_like(v) for k, v in model.state_dict().items()}}
    dcp.load(state, checkpoint_id=str(elsewhere / INCREMENTAL))  # PyTorch agrees
    assert all(torch.equal(state["model"][k], v) for k, v in model.state_dict().items())
    # and a manager saving into the new place starts afresh from it
    with CheckpointManager(str(elsewhere)) as manager:
        manager.load({"model": ModelState(make_lora(3, width=128, layers=2))})
        manager.save(3, {"model": ModelState(model)})
    _loads_exactly(str(elsewhere), "step_000000003", model)
