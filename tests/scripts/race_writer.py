"""One of two processes that save the same steps into one directory with overwrite=False.

Usage: race_writer.py URL OPTIONS_JSON SYNC_DIR WRITER_ID TRIALS
Before each trial both writers meet at a file barrier, so their writes overlap; each outcome is printed as JSON.
"""

from __future__ import annotations

import json
import os
import sys
import time

import torch

from dcp_plugin import CheckpointError, CheckpointManager


def barrier(sync_dir: str, writer: str, trial: int) -> None:
    open(os.path.join(sync_dir, f"{trial}-{writer}"), "w").close()
    other = "b" if writer == "a" else "a"
    deadline = time.monotonic() + 60
    while not os.path.exists(os.path.join(sync_dir, f"{trial}-{other}")):
        if time.monotonic() > deadline:
            raise TimeoutError("the other writer never arrived")
        time.sleep(0.001)


def main() -> None:
    url, options, sync_dir, writer, trials = (
        sys.argv[1],
        json.loads(sys.argv[2]),
        sys.argv[3],
        sys.argv[4],
        int(sys.argv[5]),
    )
    model = torch.nn.Linear(64, 64)
    with torch.no_grad():
        model.weight.fill_(1.0 if writer == "a" else 2.0)
    with CheckpointManager(url, async_mode="sync", storage_options=options) as manager:
        for trial in range(int(trials)):
            barrier(sync_dir, writer, trial)
            try:
                manager.save(trial, {"model": model, "writer": writer})
                outcome = "committed"
            except CheckpointError as err:
                outcome = f"{type(err).__name__}: {err}"
            print(json.dumps({"trial": trial, "outcome": outcome}), flush=True)


if __name__ == "__main__":
    main()
