"""Running a crash-point script (tests/scripts/) in its own process group until the injected SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from typing import Any


def run_until_killed(
    script: str,
    scenario: str,
    mode: str,
    url: str,
    options: dict,
    point: str,
    cwd: Any,
    *,
    env: dict | None = None,
    timeout: float = 120,
) -> None:
    """Run ``script`` with DCP_PLUGIN_CRASH_AT-style arguments and assert it died of SIGKILL at ``point``."""
    proc = subprocess.Popen(
        [sys.executable, script, scenario, mode, url, json.dumps(options), point],
        cwd=cwd,
        env=env if env is not None else dict(os.environ, PYTHONPATH=os.getcwd()),
        start_new_session=True,  # its own process group: the crash takes the writer daemon along
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == -signal.SIGKILL, f"expected a SIGKILL at {point}, got {proc.returncode}:\n{out}\n{err}"
