"""The README's first command: the demo trains, is killed mid-write, resumes bit-exact, and ends with ``dcp-plugin``
commands to try next, each of which runs exactly as printed from the directory the demo was started in."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.paths import REPO

pytestmark = pytest.mark.slow  # spawns and kills a training process


def test_the_demo_resumes_bit_exact_and_its_suggested_commands_run_as_printed(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("DCP_PLUGIN_")}
    demo = subprocess.run(
        [sys.executable, os.path.join(REPO, "examples", "demo.py"), "--dir", "runs/demo", "--steps", "12",
         "--save-every", "4", "--kill-at", "8", "--keep", "2"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert demo.returncode == 0, demo.stdout + demo.stderr
    out = demo.stdout
    assert "resumed run matches the uninterrupted run bit for bit: yes" in out
    assert "CheckpointManager with its defaults: async_mode='thread', snapshot copied in the background" in out
    suggested = out.split("try next (from this directory):\n", 1)[1].splitlines()
    commands = [line.strip() for line in suggested if line.startswith("     ")]
    assert len(commands) == 4 and commands[0].split()[-2:] == ["ls", "runs/demo/checkpoints"], commands
    for command in commands:
        result = subprocess.run(["bash", "-c", command], cwd=tmp_path, env=env, capture_output=True, text=True)
        assert result.returncode == 0, f"{command}\n{result.stdout}{result.stderr}"
    assert (tmp_path / "model.safetensors").exists()
