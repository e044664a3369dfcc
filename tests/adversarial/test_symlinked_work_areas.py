"""A run directory whose work area (``.dcp-plugin/`` or one of its folders) is a symbolic link.
Nothing outside the run is ever written or deleted: every operation refuses with one clear error, or works
without going through the link. Real links, real files outside the run, the real command."""

from __future__ import annotations

import os
import shutil

import pytest
import torch

from dcp_plugin import CheckpointManager, KeepLast, ModelState
from dcp_plugin.cli.main import main as cli
from dcp_plugin.errors import UnsafeCheckpointError
from dcp_plugin.storage import CheckpointStorage
from tests.models import make_lora

AREAS = [".dcp-plugin", "trash", "staging", "replaced", "objects", "blobs"]
PRECIOUS = ["notes.txt", "blob_0123456789ab_r0_0.distcp", "step_000000001.0123456789ab/data.bin", "x.ffffffffffff"]


def _victim(tmp_path) -> str:
    """A directory outside the run whose names look like ours (what an old purge would have deleted)."""
    victim = tmp_path / "victim"
    for name in PRECIOUS:
        path = victim / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("precious")
    return str(victim)


def _untouched(victim: str) -> None:
    for name in PRECIOUS:
        with open(os.path.join(victim, name)) as handle:
            assert handle.read() == "precious", name
    found = sorted(os.path.relpath(os.path.join(d, f), victim) for d, _, files in os.walk(victim) for f in files)
    assert found == sorted(PRECIOUS)


def _run_with_link(root: str, area: str, victim: str) -> torch.nn.Module:
    """Two incremental saves (so every kind of work entry has existed), a leftover, then ``area`` made a link."""
    model = make_lora(width=128, layers=2)
    with CheckpointManager(root, async_mode="sync") as manager:
        manager.save(1, {"model": ModelState(model)})
        manager.save(2, {"model": ModelState(model)})
    work = os.path.join(root, ".dcp-plugin")
    link = work if area == ".dcp-plugin" else os.path.join(work, area)
    if os.path.isdir(link):
        shutil.rmtree(link)
    os.makedirs(os.path.dirname(link), exist_ok=True)
    os.symlink(victim, link)
    return model


@pytest.mark.parametrize("area", AREAS)
def test_purge_refuses_a_linked_work_area_and_touches_nothing_outside(ckpt_dir, tmp_path, area, capsys):
    victim = _victim(tmp_path)
    _run_with_link(ckpt_dir, area, victim)
    assert cli(["purge", ckpt_dir]) == 1
    err = capsys.readouterr().err
    assert "symbolic link" in err and "rm " in err, err
    with pytest.raises(UnsafeCheckpointError, match="never follows a link"):
        CheckpointStorage(ckpt_dir).purge()
    _untouched(victim)
    assert cli(["ls", ckpt_dir]) == 0  # committed checkpoints are still listed, with the problem as a note
    assert "step_000000002" in capsys.readouterr().out


@pytest.mark.parametrize("area", AREAS)
def test_saves_retention_replacement_and_deletion_never_go_through_the_link(ckpt_dir, tmp_path, area):
    victim = _victim(tmp_path)
    model = _run_with_link(ckpt_dir, area, victim)
    with CheckpointManager(ckpt_dir, async_mode="sync", retention=KeepLast(1)) as manager:
        with pytest.raises(UnsafeCheckpointError, match="symbolic link"):
            manager.save(3, {"model": ModelState(model)})
        with pytest.raises(UnsafeCheckpointError, match="symbolic link"):
            manager.save(2, {"model": ModelState(model)}, overwrite=True)
        _untouched(victim)
        try:
            manager.delete(1)  # needs only the trash: allowed where that is a plain directory
        except UnsafeCheckpointError as err:
            assert area in (".dcp-plugin", "trash"), err
        storage = manager.storage
        if area in (".dcp-plugin", "blobs"):
            with pytest.raises(UnsafeCheckpointError):
                storage.collect_blobs()
        _untouched(victim)
        assert manager.steps[-1] == 2
    fresh = make_lora(5, width=128, layers=2)
    CheckpointManager(ckpt_dir).load({"model": ModelState(fresh)}, step=2)  # readers need no work area
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in model.state_dict().items())
    _untouched(victim)
