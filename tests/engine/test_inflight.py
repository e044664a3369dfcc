"""Writes in flight are visible to every checkpointer in the process, whichever engine started them."""

from __future__ import annotations

import os

import torch

from dcp_plugin import CheckpointConfig, Checkpointer, CheckpointManager
from dcp_plugin.engine import inflight
from tests.holds import hold_commits


def test_another_checkpointer_loads_a_checkpoint_still_being_written(tmp_path, monkeypatch):
    hold_commits(monkeypatch, 0.5)
    writer = Checkpointer(CheckpointConfig(async_mode="thread"), distributed=False)
    reader = Checkpointer(CheckpointConfig(async_mode="sync"), distributed=False)
    path = str(tmp_path / "step_000000001")
    writer.save(path, {"w": torch.ones(16)}, step=1)
    assert inflight.is_writing(path) and inflight.is_writing_under(str(tmp_path))
    state = {"w": torch.zeros(16)}
    reader.load(path, state)  # waits for the other engine's write instead of "not found"
    assert torch.equal(state["w"], torch.ones(16))
    assert not inflight.is_writing(path)
    writer.close()
    reader.close()


def test_a_manager_loading_its_latest_waits_for_writes_into_its_directory(tmp_path, monkeypatch):
    hold_commits(monkeypatch, 0.5)
    root = str(tmp_path / "ckpts")
    writer = CheckpointManager(root, async_mode="thread")
    writer.save(3, {"w": torch.full((4,), 3.0)})
    reader = CheckpointManager(root, async_mode="sync")
    state = {"w": torch.zeros(4)}
    reader.load(state)
    assert torch.equal(state["w"], torch.full((4,), 3.0))
    writer.close()
    reader.close()


def test_keys_follow_symbolic_links(tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    os.symlink(real, tmp_path / "alias")
    key = inflight.begin(str(tmp_path / "alias" / "a"))
    try:
        assert inflight.is_writing(str(real / "a"))
        os.symlink("a", real / "last")
        assert inflight.is_writing(str(real / "last"))  # a link names the write of its target
        assert not inflight.wait_for(str(real / "a"), timeout=0.05)
    finally:
        inflight.finish(key)
    assert inflight.wait_for(str(real / "a"), timeout=0.05)
