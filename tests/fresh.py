"""Reading checkpoints back in a fresh process (no state of the writer's process can help or hide anything)."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from typing import Any

import torch

from tests.paths import REPO


def read_fresh(*paths: str) -> dict[str, dict[str, Any]]:
    """For each checkpoint directory: ``{"plugin": dcp-plugin's read(), "torch": dcp_to_torch_save's dict}``, both
    read in one fresh Python process (a reader's error comes back as text)."""
    with tempfile.TemporaryDirectory() as scratch:
        out = os.path.join(scratch, "read.pt")
        script = os.path.join(REPO, "tests", "scripts", "read_fresh.py")
        done = subprocess.run(
            [sys.executable, script, out, *map(os.fspath, paths)],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=240,
            env=dict(os.environ, PYTHONPATH=REPO),
        )
        assert done.returncode == 0, done.stderr[-3000:]
        return torch.load(out, weights_only=False)
