"""Saves, replaces or deletes checkpoints and is killed (SIGKILL, whole process group) at one crash point.

Usage: crash_at.py SCENARIO MODE URL OPTIONS_JSON POINT
Phase 1 commits step 1 (and step 2 for "delete") in sync mode with no crash point armed; phase 2
arms DCP_PLUGIN_CRASH_AT and runs the scenario in MODE, so a writer daemon started then inherits it.
Every checkpoint holds a Linear(8, 8) whose weight is filled with a value the test knows (see VALUES).
"""

from __future__ import annotations

import json
import os
import sys

import torch

import dcp_plugin.storage.commit as commit
from dcp_plugin import CheckpointManager, KeepLast

if os.environ.get("CRASH_TEST_NO_EXCHANGE") == "1":  # module level: applies in the writer daemon too
    commit.exchange = lambda source, target: False

VALUES = {"step1": 1.0, "step1_replacement": 11.0, "step2": 2.0, "step3": 3.0}


def model_with(value: float) -> torch.nn.Linear:
    model = torch.nn.Linear(8, 8)
    with torch.no_grad():
        model.weight.fill_(value)
        model.bias.fill_(value)
    return model


def main() -> None:
    scenario, mode, url, options_json, point = sys.argv[1:6]
    options = json.loads(options_json)
    os.environ["DCP_PLUGIN_CRASH_GROUP"] = str(os.getpgid(0))
    with CheckpointManager(url, async_mode="sync", storage_options=options) as manager:
        manager.save(1, {"model": model_with(VALUES["step1"])})
        if scenario == "delete":
            manager.save(2, {"model": model_with(VALUES["step2"])})
        run_id = manager.run_id
    if scenario == "repeat":  # step 2 plans the structure through DCP; step 3 repeats it, written without DCP
        with CheckpointManager(url, async_mode=mode, storage_options=options) as manager:
            model = model_with(VALUES["step2"])
            manager.save(2, {"model": model})
            manager.wait()
            os.environ["DCP_PLUGIN_CRASH_AT"] = point
            with torch.no_grad():
                model.weight.fill_(VALUES["step3"])
                model.bias.fill_(VALUES["step3"])
            manager.save(3, {"model": model})
        print("finished without reaching the crash point", flush=True)
        return
    os.environ["DCP_PLUGIN_CRASH_AT"] = point
    if scenario == "save":
        with CheckpointManager(url, async_mode=mode, storage_options=options) as manager:
            manager.save(2, {"model": model_with(VALUES["step2"])})
    elif scenario == "replace":
        with CheckpointManager(url, async_mode=mode, storage_options=options) as manager:
            manager.save(1, {"model": model_with(VALUES["step1_replacement"])}, overwrite=True)
    elif scenario == "delete":
        with CheckpointManager(url, async_mode=mode, storage_options=options) as manager:
            manager.delete(1)
    elif scenario == "retention":
        retention = KeepLast(1)
        with CheckpointManager(url, async_mode=mode, storage_options=options, run_id=run_id, retention=retention) as m:
            m.save(2, {"model": model_with(VALUES["step2"])})  # once committed, retention removes step 1
    print("finished without reaching the crash point", flush=True)


if __name__ == "__main__":
    main()
