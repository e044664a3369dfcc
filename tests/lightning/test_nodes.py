"""DCPCheckpoint on node-local disks (``local_scope="node"``) with a real Trainer: one node here; the option reaches
the plugin, parts carry their node record, retention runs on the node, auto-resume restores across the nodes."""

from __future__ import annotations

import json

import pytest
import torch

from dcp_plugin import ConfigError
from dcp_plugin.lightning import DCPCheckpoint, DCPCheckpointIO
from tests.lightning.helpers import TinyModule, loader, seed_all, trainer


def _weights(module: TinyModule) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_dcp_checkpoint_passes_the_scope_to_the_plugin_and_resumes_across_the_nodes(tmp_path):
    local = tmp_path / "node-disk"
    seed_all(0)
    first_module = TinyModule()
    callback = DCPCheckpoint(str(local), every_n_train_steps=2, keep_last=1, local_scope="node", peer_replicas=0)
    plugin = DCPCheckpointIO()
    first = trainer(str(tmp_path), plugin, max_epochs=1, callbacks=[callback])
    first.fit(first_module, loader())
    assert first.global_step == 4 and plugin.config.local_scope == "node"
    assert sorted(p.name for p in local.iterdir()) == ["step_000000004"]  # keep_last=1 on this node
    assert json.loads((local / "step_000000004" / "dcp_plugin.json").read_text())["part"]["nodes"] == 1

    seed_all(99)
    second_module = TinyModule()
    resumed = DCPCheckpoint(str(local), every_n_train_steps=2, local_scope="node")
    second = trainer(str(tmp_path), DCPCheckpointIO(), max_epochs=1, callbacks=[resumed])
    second.fit(second_module, loader())  # auto-resume: nothing left to train after step 4
    assert second.global_step == 4 and resumed.run_id == callback.run_id
    for key, value in _weights(first_module).items():
        assert torch.equal(_weights(second_module)[key], value), key


def test_bad_scope_options_are_refused_when_the_callback_is_built():
    with pytest.raises(ConfigError, match="local_scope"):
        DCPCheckpoint("ckpts", local_scope="nodes")
    with pytest.raises(ConfigError, match="needs local_scope='node'"):
        DCPCheckpoint("ckpts", local_scope="shared", peer_replicas=1)
