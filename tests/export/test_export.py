"""Exports read by their own libraries: safetensors load_file, LightningModule.load_from_checkpoint, torch.load."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import fsspec
import pytest
import torch
from safetensors.torch import load, load_file

from dcp_plugin import (
    CheckpointCorruptError,
    CheckpointManager,
    CheckpointNotFoundError,
    ConfigError,
    export_checkpoint,
)
from tests.models import assert_same, make_model
from tests.paths import REPO


def saved(directory: str, state: dict) -> str:
    with CheckpointManager(directory, async_mode="sync") as manager:
        manager.save(1, state)
    return os.path.join(directory, "step_000000001")


def test_safetensors_match_the_model_state_dict_with_hugging_face_names(ckpt_dir, tmp_path):
    model = make_model()
    path = saved(ckpt_dir, {"model": model, "optimizer": torch.optim.Adam(model.parameters()), "step": 3})
    result = export_checkpoint(path, tmp_path / "model.safetensors")
    exported = load_file(tmp_path / "model.safetensors")
    assert_same(exported, model.state_dict())  # keys as model.state_dict() names them: no "model." prefix
    assert result.entry == "model" and result.tensors == len(exported)
    assert result.bytes == os.path.getsize(tmp_path / "model.safetensors")
    export_checkpoint(path, tmp_path / "half.safetensors", dtype="float16")
    assert_same(load_file(tmp_path / "half.safetensors"), {k: v.half() for k, v in model.state_dict().items()})


def test_tensors_of_every_dtype_and_shape_round_trip(ckpt_dir, tmp_path, monkeypatch):
    monkeypatch.setattr("dcp_plugin.export.exporter.BATCH_BYTES", 1024)  # many reads, each tensor converted in pieces
    monkeypatch.setattr("dcp_plugin.export.output.CHUNK_BYTES", 4096)
    weights = {
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 4),
        "ints": torch.arange(10, dtype=torch.int64),
        "mask": torch.tensor([True, False, True]),
        "bf16": torch.randn(5, 3).to(torch.bfloat16),
        "bytes": torch.arange(7, dtype=torch.uint8),
        "big": torch.randn(256, 64),
    }
    path = saved(ckpt_dir, {"model": weights})
    export_checkpoint(path, tmp_path / "all.safetensors")
    assert_same(load_file(tmp_path / "all.safetensors"), weights)
    export_checkpoint(path, tmp_path / "bf16.safetensors", dtype="bfloat16")
    converted = load_file(tmp_path / "bf16.safetensors")
    assert converted["ints"].dtype == torch.int64 and converted["mask"].dtype == torch.bool
    assert torch.equal(converted["big"], weights["big"].to(torch.bfloat16))


def test_safetensors_to_an_fsspec_url(ckpt_dir, memory_url):
    model = make_model()
    path = saved(ckpt_dir, {"model": model})
    target = f"{memory_url}/export/model.safetensors"
    export_checkpoint(path, target)
    with fsspec.open(target, "rb") as handle:
        assert_same(load(handle.read()), model.state_dict())


def test_torch_format_keeps_the_entry_as_it_was(ckpt_dir, tmp_path):
    model = make_model()
    path = saved(ckpt_dir, {"model": model, "extra": {"scale": torch.ones(2), "names": ["a", "b"]}})
    export_checkpoint(path, tmp_path / "extra.pt", format="torch", entry="extra", dtype="bfloat16")
    extra = torch.load(tmp_path / "extra.pt", weights_only=True)
    assert extra["names"] == ["a", "b"] and extra["scale"].dtype == torch.bfloat16


def test_a_damaged_checkpoint_never_replaces_an_earlier_export(ckpt_dir, tmp_path):
    path = saved(ckpt_dir, {"model": make_model()})
    target = tmp_path / "out" / "model.safetensors"
    export_checkpoint(path, target)
    before = target.read_bytes()
    data = os.path.join(path, "__0_0.distcp")
    with open(data, "r+b") as handle:
        handle.seek(200)
        handle.write(b"\x00" * 16)
    with pytest.raises(CheckpointCorruptError, match="does not match its checksum"):
        export_checkpoint(path, target)
    assert target.read_bytes() == before and os.listdir(target.parent) == ["model.safetensors"]


def test_bad_options_fail_before_anything_is_read(tmp_path, ckpt_dir):
    with pytest.raises(ConfigError, match="dtype='bfloat' is not supported"):
        export_checkpoint(tmp_path / "nothing-here", tmp_path / "x.safetensors", dtype="bfloat")
    with pytest.raises(ConfigError, match="not an export format"):
        export_checkpoint(tmp_path / "nothing-here", tmp_path / "x", format="onnx")
    path = saved(ckpt_dir, {"weights": make_model()})
    with pytest.raises(CheckpointNotFoundError, match=r"no model weights to export; pick --entry from \['weights'\]"):
        export_checkpoint(path, tmp_path / "x.safetensors")
    with pytest.raises(CheckpointNotFoundError, match="has no entry 'model_1'"):
        export_checkpoint(path, tmp_path / "x.safetensors", entry="model_1")


def test_lightning_format_loads_with_load_from_checkpoint(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    from dcp_plugin.cli import main
    from dcp_plugin.lightning import DCPCheckpointIO
    from tests.lightning.helpers import TinyModule, loader, seed_all, trainer

    seed_all(0)
    module = TinyModule(lr=0.01, hidden=12)
    run = trainer(
        str(tmp_path), DCPCheckpointIO(), max_epochs=1, callbacks=[ModelCheckpoint(dirpath=str(tmp_path / "c"))]
    )
    run.fit(module, loader())
    checkpoint = run.checkpoint_callback.best_model_path
    out = str(tmp_path / "model.ckpt")
    assert main(["export", checkpoint, out, "--format", "lightning"]) == 0
    loaded = TinyModule.load_from_checkpoint(out)
    assert loaded.hparams.hidden == 12
    assert_same(loaded.state_dict(), module.state_dict())
    # Lightning's weights are its "state_dict" entry: the default for safetensors, named as the module names them
    export_checkpoint(checkpoint, tmp_path / "lightning.safetensors")
    assert_same(load_file(tmp_path / "lightning.safetensors"), module.state_dict())
    with pytest.raises(ConfigError, match="dtype and entry apply to"):
        export_checkpoint(checkpoint, out, format="lightning", dtype="float16")


def test_accelerate_exporter_runs_as_a_module_without_warnings(ckpt_dir, tmp_path):
    model = make_model()
    path = saved(ckpt_dir, {"model": model})
    done = subprocess.run(
        [sys.executable, "-m", "dcp_plugin.accelerate.export", path, str(tmp_path / "merged")],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": REPO},
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "Warning" not in done.stderr, done.stderr
    assert done.stdout.strip() == str(tmp_path / "merged" / "model.safetensors")
    assert_same(load_file(tmp_path / "merged" / "model.safetensors"), model.state_dict())


@pytest.mark.slow
def test_a_checkpoint_sharded_over_two_ranks_exports_full_tensors(tmp_path):
    from tests.multiproc import run_ranks
    from tests.test_distributed import fsdp_save

    directory = str(tmp_path / "ckpts")
    saved = run_ranks(fsdp_save, directory, "sync", world_size=2)
    path = os.path.join(directory, "step_000000002")
    export_checkpoint(path, tmp_path / "model.safetensors", dtype="bfloat16")
    expected = {k: v.to(torch.bfloat16) for k, v in saved[0]["full"]["model"].items()}
    assert_same(load_file(tmp_path / "model.safetensors"), expected)


def test_safetensors_to_s3_appear_whole_or_not_at_all(ckpt_dir, tmp_path, s3_url):
    import s3fs

    from dcp_plugin.cli import main

    url, options = s3_url
    model = make_model()
    path = saved(ckpt_dir, {"model": model})
    target = f"{url}/model.safetensors"
    assert main(["export", path, target, "--output-options", json.dumps(options)]) == 0
    fs = s3fs.S3FileSystem(**options, skip_instance_cache=True)
    assert_same(load(fs.cat(target)), model.state_dict())
    with open(os.path.join(path, "__0_0.distcp"), "r+b") as handle:
        handle.seek(200)
        handle.write(b"\x00" * 16)
    broken = f"{url}/broken.safetensors"
    with pytest.raises(CheckpointCorruptError):
        export_checkpoint(path, broken, output_options=options)
    assert not fs.exists(broken)
