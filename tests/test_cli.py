"""The dcp-plugin command on real checkpoints."""

from __future__ import annotations

import os

import torch

from dcp_plugin import CheckpointManager
from dcp_plugin.cli import main
from tests.models import assert_same, make_model


def make_checkpoints(directory: str) -> torch.nn.Module:
    model = make_model()
    with CheckpointManager(directory, async_mode="sync") as manager:
        manager.save(1, {"model": model, "epoch": 0}, metadata={"loss": 0.5})
        manager.save(2, {"model": model, "epoch": 1}, metadata={"loss": 0.25})
    return model


def test_ls_inspect_verify_export(ckpt_dir, tmp_path, capsys):
    model = make_checkpoints(ckpt_dir)
    assert main(["ls", ckpt_dir]) == 0
    out = capsys.readouterr().out
    assert "step_000000001" in out and "loss=0.25" in out
    assert main(["inspect", os.path.join(ckpt_dir, "step_000000002")]) == 0
    out = capsys.readouterr().out
    assert "model.0.weight\t(32, 16)\ttorch.float32" in out
    assert main(["verify", "--load", os.path.join(ckpt_dir, "step_000000002")]) == 0
    assert "OK" in capsys.readouterr().out
    target = tmp_path / "model.pt"
    assert main(["export", os.path.join(ckpt_dir, "step_000000002"), str(target), "--dtype", "bfloat16"]) == 0
    exported = torch.load(target, weights_only=True)
    assert_same(exported, {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()})


def test_verify_reports_truncated_files_and_purge_cleans_leftovers(ckpt_dir, capsys):
    make_checkpoints(ckpt_dir)
    data = os.path.join(ckpt_dir, "step_000000002", "__0_0.distcp")
    with open(data, "r+b") as handle:
        handle.truncate(10)
    assert main(["verify", os.path.join(ckpt_dir, "step_000000002")]) == 1
    assert "truncated" in capsys.readouterr().out
    os.makedirs(os.path.join(ckpt_dir, ".tmp-step_000000003-abc"))
    assert main(["purge", ckpt_dir, "--dry-run"]) == 0
    assert "would remove" in capsys.readouterr().out
    assert main(["purge", ckpt_dir]) == 0
    assert not os.path.exists(os.path.join(ckpt_dir, ".tmp-step_000000003-abc"))


def test_clear_error_for_a_missing_checkpoint(ckpt_dir, capsys):
    make_checkpoints(ckpt_dir)
    assert main(["inspect", os.path.join(ckpt_dir, "step_000000009")]) == 1
    assert "No checkpoint at" in capsys.readouterr().err
