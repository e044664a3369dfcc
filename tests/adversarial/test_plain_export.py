"""``dcp-plugin export --entry w`` of a plain-DCP directory whose value ``w`` is one tensor
exports it (it said the entry "holds no tensors"); an entry of plain values says what to do instead."""

from __future__ import annotations

import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file

from dcp_plugin.cli.main import main as cli


def test_an_entry_that_is_one_tensor_exports_under_its_own_name(tmp_path, capsys):
    weights = torch.arange(6.0).reshape(2, 3)
    directory = str(tmp_path / "step-1")
    dcp.save({"w": weights, "model": {"a": torch.ones(2)}, "step": 3}, checkpoint_id=directory, no_dist=True)
    assert cli(["export", directory, str(tmp_path / "w.safetensors"), "--entry", "w"]) == 0
    assert torch.equal(load_file(str(tmp_path / "w.safetensors"))["w"], weights)
    assert cli(["export", directory, str(tmp_path / "w.pt"), "--entry", "w", "--format", "torch"]) == 0
    assert torch.equal(torch.load(tmp_path / "w.pt", weights_only=True), weights)
    assert cli(["export", directory, str(tmp_path / "m.safetensors"), "--entry", "model"]) == 0
    assert set(load_file(str(tmp_path / "m.safetensors"))) == {"a"}
    capsys.readouterr()
    assert cli(["export", directory, str(tmp_path / "s.safetensors"), "--entry", "step"]) == 1
    assert "--format torch" in capsys.readouterr().err
