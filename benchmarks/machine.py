"""A description of the machine the numbers were measured on."""

from __future__ import annotations

import os
import platform
import subprocess
import time
from importlib import metadata
from typing import Any


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _disk(path: str) -> str:
    """The device and filesystem holding ``path`` (from ``df``), e.g. ``/dev/vda ext4 252G``."""
    try:
        out = (
            subprocess.run(["df", "-hT", path], capture_output=True, text=True, timeout=10, check=True)
            .stdout.splitlines()[-1]
            .split()
        )
        return f"{out[0]} ({out[1]}, {out[2]} total, {out[4]} free)"
    except (OSError, subprocess.SubprocessError, IndexError):
        return "unknown"


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def describe(directory: str) -> dict[str, Any]:
    import psutil
    import torch

    return {
        "date": time.strftime("%Y-%m-%d"),
        "cpu": _cpu_model(),
        "nproc": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "disk": _disk(directory),
        "directory": directory,
        "os": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "lightning": _version("lightning"),
        "accelerate": _version("accelerate"),
        "dcp_plugin": _version("dcp-plugin"),
        "cuda": torch.cuda.is_available(),
        "load_average_start": list(os.getloadavg()),
    }
