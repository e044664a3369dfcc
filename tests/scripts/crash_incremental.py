"""Incremental saves and retention of a LoRA-style model, killed (SIGKILL, whole process group) at one crash point.

Usage: crash_incremental.py SCENARIO MODE URL OPTIONS_JSON POINT
Phase 1 commits steps 1 and 2 in sync mode (the frozen base is replaced before step 2, so step 1's shared
data is used by step 1 alone). Phase 2 resumes from step 2 (so the next save refers to it),
arms DCP_PLUGIN_CRASH_AT and, in MODE, saves step 3 ("save") or saves step 3 under KeepLast(1), whose retention
deletes steps 1 and 2 and removes the shared data only they used ("retention"). The state of each step is
:func:`lora_at`.
"""

from __future__ import annotations

import json
import os
import sys

import torch

from dcp_plugin import CheckpointManager, KeepLast, ModelState
from tests.models import make_lora


def lora_at(step: int) -> torch.nn.Module:
    """The model as saved at ``step``: adapters filled with the step; the frozen base replaced at step 2."""
    model = make_lora(0 if step == 1 else 1)
    with torch.no_grad():
        for layer in model:
            layer.a.fill_(float(step))
    return model


def main() -> None:
    scenario, mode, url, options_json, point = sys.argv[1:6]
    options = json.loads(options_json)
    os.environ["DCP_PLUGIN_CRASH_GROUP"] = str(os.getpgid(0))
    model = lora_at(1)
    with CheckpointManager(url, async_mode="sync", storage_options=options) as manager:
        manager.save(1, {"model": ModelState(model)})
        changed = lora_at(2)
        model.load_state_dict(changed.state_dict())
        manager.save(2, {"model": ModelState(model)})
        run_id = manager.run_id
    retention = KeepLast(1) if scenario == "retention" else None
    os.environ["DCP_PLUGIN_CRASH_AT"] = point  # before the manager: a writer daemon started now inherits it
    with CheckpointManager(url, async_mode=mode, storage_options=options, run_id=run_id, retention=retention) as m:
        m.load({"model": ModelState(model)})  # the next save refers to step 2's data
        with torch.no_grad():
            for layer in model:
                layer.a.fill_(3.0)
        m.save(3, {"model": ModelState(model)})
    print("finished without reaching the crash point", flush=True)


if __name__ == "__main__":
    main()
