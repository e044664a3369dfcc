"""A real read-only filesystem is one project error saying so (not the builtin
PermissionError speaking of permissions), and its checkpoints still load. Skipped, saying why, where a tmpfs
cannot be mounted or remounted."""

from __future__ import annotations

import os
import subprocess

import pytest
import torch

from dcp_plugin import CheckpointManager, ModelState
from dcp_plugin.errors import CheckpointSaveError
from tests.adversarial.helpers import small_tmpfs
from tests.models import make_lora


def test_a_read_only_filesystem_is_a_save_error_that_says_so_and_loads_still_work(tmp_path):
    with small_tmpfs(str(tmp_path / "disk"), size="8m") as disk:
        root = os.path.join(disk, "run")
        model = make_lora(width=128, layers=2)
        with CheckpointManager(root, async_mode="sync") as manager:
            manager.save(1, {"model": ModelState(model)})
        remounted = subprocess.run(["mount", "-o", "remount,ro", disk], capture_output=True, text=True)
        if remounted.returncode != 0:
            pytest.skip(f"cannot remount the tmpfs read-only: {remounted.stderr.strip()}")
        for target in (root, os.path.join(disk, "fresh-run")):
            with CheckpointManager(target, async_mode="thread") as manager:
                with pytest.raises(CheckpointSaveError, match="read-only filesystem") as raised:
                    manager.save(2, {"model": ModelState(model)})
                assert "permissions" not in str(raised.value)
        fresh = make_lora(3, width=128, layers=2)
        CheckpointManager(root).load({"model": ModelState(fresh)})
        assert all(torch.equal(fresh.state_dict()[k], v) for k, v in model.state_dict().items())
