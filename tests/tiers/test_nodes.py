"""``local_scope="node"`` in one process (a job of one node): parts and their manifests, listing, restore with the
bytes counted by place, retention, deletion, the remote tier as the last copy, and the clear errors.
Real multi-node launches are in tests/tiers/test_nodes_drills.py."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import uuid
from types import SimpleNamespace

import pytest

from dcp_plugin import CheckpointInfo, CheckpointManager, CheckpointSaveError, ConfigError, KeepLast
from dcp_plugin.storage import room
from dcp_plugin.storage.room import mount_of
from dcp_plugin.tiers.holdings import Copy, JobView
from tests.models import assert_same, make_training, snapshot, train_step


def run(directory: str, steps: int, **options):
    model, optimizer, _ = make_training(seed=1)
    state = {"model": model, "optim": optimizer, "step": 0}
    with CheckpointManager(directory, local_scope="node", async_mode="thread", **options) as manager:
        for step in range(1, steps + 1):
            train_step(model, optimizer)
            state["step"] = step
            manager.save(step, state)
        manager.wait()
    return manager, snapshot(model, optimizer)


def fresh():
    model, optimizer, _ = make_training(seed=9)
    return model, optimizer, {"model": model, "optim": optimizer, "step": 0}


def test_one_node_saves_parts_lists_and_restores_from_its_own_disk(tmp_path, caplog):
    directory = tmp_path / "node"
    with caplog.at_level(logging.WARNING, logger="dcp_plugin"):
        _, expected = run(str(directory), steps=3, retention=KeepLast(2))
    assert "1 node(s): 0 other node(s) keep a copy" in caplog.text  # peer_replicas=1 needs another node
    assert sorted(p.name for p in directory.iterdir()) == ["step_000000002", "step_000000003"]
    manifest = json.loads((directory / "step_000000003" / "dcp_plugin.json").read_text())
    assert manifest["part"] == {"node": 0, "nodes": 1, "holders": {"__0_0.distcp": 0}}
    assert "blobs" not in manifest  # no incremental saves: a part holds its own files

    model, optimizer, state = fresh()
    with CheckpointManager(str(directory), local_scope="node") as manager:
        assert [info.step for info in manager.list()] == [2, 3]
        assert manager.locations() == {"step_000000002": ("local",), "step_000000003": ("local",)}
        assert manager.storage.verify("step_000000003") == []
        info = manager.load(state)
        assert info.step == 3 and state["step"] == 3
        assert info.restored_from["local"] > 0 and info.restored_from["peer"] == info.restored_from["remote"] == 0
        assert info.url == manager.storage.url("step_000000003")
        assert manager.read(step=2)["step"] == 2
        manager.delete(step=2)
        assert manager.steps == [3]
    assert_same(snapshot(model, optimizer), expected)
    assert not (directory / ".dcp-plugin").exists()  # no restore or staging leftovers


def test_the_remote_tier_is_the_copy_of_last_resort(tmp_path):
    remote = str(tmp_path / "remote")
    directory = tmp_path / "node"
    _, expected = run(str(directory), steps=2, remote=remote)
    remote_manifest = json.loads((tmp_path / "remote" / "step_000000002" / "dcp_plugin.json").read_text())
    assert "part" not in remote_manifest  # copied whole: any layout restores from it
    shutil.rmtree(directory)
    model, optimizer, state = fresh()
    with CheckpointManager(str(directory), local_scope="node", remote=remote) as manager:
        assert manager.locations()["step_000000002"] == ("remote",)
        info = manager.load(state)
    assert info.step == 2 and info.restored_from["remote"] > 0 and info.restored_from["local"] == 0
    assert_same(snapshot(model, optimizer), expected)


def _copy(node: int, part: int, step: int, own: bool = True, save_id: str | None = None) -> Copy:
    files = {".metadata": {"size": 1, "xxh3_128": "m"}, "__0_0.distcp": {"size": 2, "xxh3_128": "a"}}
    files["__1_0.distcp"] = {"size": 3, "xxh3_128": "b"}
    holders = {"__0_0.distcp": 0, "__1_0.distcp": 1}
    manifest = {"step": step, "save_id": save_id or f"s{step}", "files": files, "created": float(step)}
    manifest["part"] = {"node": part, "nodes": 2, "holders": holders}
    return Copy(node, part, own, f"step_{step:09d}", manifest["save_id"], manifest)


def test_the_job_view_counts_a_checkpoint_complete_when_every_part_is_somewhere():
    copies = {
        0: [_copy(0, 0, 1), _copy(0, 1, 1, own=False), _copy(0, 0, 2)],  # node 0: step 1 whole, part 0 of step 2
        1: [],  # node 1 lost its disk: part 1 of step 2 had no copy
    }
    view = JobView.gather([copies[0], copies[1]], None)
    assert [c.name for c in view.complete] == ["step_000000001"]
    assert view.complete[0].holders(1) == [0]  # part 1 of step 1 survives as node 0's copy
    newer = view.newer_incomplete()
    assert [c.name for c in newer] == ["step_000000002"] and newer[0].missing == [1]
    assert newer[0].lacks() == (
        "step_000000002 lacks part 1 (written on node 1: __1_0.distcp): no node holds it, nor a copy of it"
    )
    remote = {"step_000000002": CheckpointInfo("step_000000002", "s3://b/r/step_000000002", copies[0][2].manifest)}
    assert [c.name for c in JobView.gather([copies[0]], remote).complete] == ["step_000000001", "step_000000002"]


def test_host_memory_is_the_in_memory_tier_and_a_too_small_one_says_the_size_needed(monkeypatch):
    if (mount_of("/dev/shm") or ("", ""))[1] != "tmpfs":
        pytest.skip("/dev/shm is not a tmpfs here")
    directory = f"/dev/shm/dcp-plugin-test-{uuid.uuid4().hex[:8]}"
    try:
        _, expected = run(directory, steps=1)
        model, optimizer, state = fresh()
        with CheckpointManager(directory, local_scope="node") as manager:
            manager.load(state)
            assert_same(snapshot(model, optimizer), expected)
            full = os.statvfs(directory)
            tiny = SimpleNamespace(f_bavail=1, f_frsize=full.f_frsize)  # as if /dev/shm had one block left
            monkeypatch.setattr(room.os, "statvfs", lambda _path: tiny)
            with pytest.raises(CheckpointSaveError, match=r"in host memory \(tmpfs mounted at /dev/shm\)") as info:
                manager.save(2, state)
            assert re.search(r"needs about [\d.]+ KiB there .* nothing was written.*--shm-size=1g", str(info.value))
            monkeypatch.undo()
            assert manager.steps == [1]  # the earlier checkpoint is untouched
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def test_node_scope_needs_a_local_directory(memory_url):
    with pytest.raises(ConfigError, match="local_scope='node'.*not a local directory"):
        CheckpointManager(memory_url, local_scope="node")
