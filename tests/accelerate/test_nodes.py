"""Accelerate on node-local disks: ``enable(accelerator, local_scope="node")`` or ``DCP_PLUGIN_LOCAL_SCOPE=node``
(one node here; the multi-node drills are in tests/tiers/test_nodes_drills.py)."""

from __future__ import annotations

import json
from pathlib import Path

from accelerate import Accelerator
from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import ProjectConfiguration

import dcp_plugin.accelerate as dpa
from tests.models import assert_same, make_training, snapshot, train_step


def _accelerator(project: str | None = None) -> Accelerator:
    AcceleratorState._reset_state(True)
    PartialState._reset_state()
    if project is None:
        return Accelerator(cpu=True)
    config = ProjectConfiguration(project_dir=project, automatic_checkpoint_naming=True, total_limit=2)
    return Accelerator(cpu=True, project_config=config)


def _part(directory: Path) -> dict:
    return json.loads((directory / "dcp_plugin.json").read_text())["part"]


def test_save_state_and_load_state_on_node_local_disks(tmp_path):
    project = str(tmp_path / "project")
    accelerator = _accelerator(project)
    dpa.enable(accelerator, environ={"DCP_PLUGIN_LOCAL_SCOPE": "node"}, async_mode="thread")
    model, optimizer, scheduler = accelerator.prepare(*make_training(0))
    for _ in range(3):
        train_step(model, optimizer, scheduler)
        accelerator.save_state()
    expected = snapshot(model, optimizer)
    accelerator.end_training()
    checkpoints = Path(project) / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["checkpoint_1", "checkpoint_2"]  # total_limit
    assert _part(checkpoints / "checkpoint_2")["nodes"] == 1

    fresh = _accelerator(project)
    checkpointer = dpa.enable(fresh, environ={}, async_mode="sync", local_scope="node", peer_replicas=0)
    model, optimizer, scheduler = fresh.prepare(*make_training(7))
    assert checkpointer.latest().name == "checkpoint_2"
    info = fresh.load_state()
    assert info.restored_from["local"] > 0
    assert_same(snapshot(model, optimizer), expected)
    assert fresh.project_configuration.iteration == 3
    fresh.end_training()

    explicit = tmp_path / "explicit" / "mine"
    plain = _accelerator()
    dpa.enable(plain, environ={}, async_mode="sync", local_scope="node")
    model, optimizer, scheduler = plain.prepare(*make_training(0))
    train_step(model, optimizer, scheduler)
    plain.save_state(str(explicit))
    expected = snapshot(model, optimizer)
    assert _part(explicit)["nodes"] == 1
    model.load_state_dict(make_training(9)[0].state_dict())
    plain.load_state(str(explicit))
    assert_same(snapshot(model, optimizer), expected)
    plain.end_training()
