"""Saves step 1 locally with a remote tier and is killed (SIGKILL) while the copy to the remote tier is
written but not yet committed there.

Usage: crash_replication.py LOCAL URL OPTIONS_JSON
"""

from __future__ import annotations

import json
import os
import sys

import torch

from dcp_plugin import CheckpointManager


def main() -> None:
    local, url, options = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    os.environ["DCP_PLUGIN_CRASH_GROUP"] = str(os.getpgid(0))
    os.environ["DCP_PLUGIN_CRASH_AT"] = "copy.written"
    model = torch.nn.Linear(8, 8)
    with CheckpointManager(local, async_mode="sync", remote=url, remote_storage_options=options) as manager:
        manager.save(1, {"model": model})
    print("finished without reaching the crash point", flush=True)


if __name__ == "__main__":
    main()
