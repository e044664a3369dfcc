"""Saves step 1, starts an async save of step 2, prints SAVING and waits to be killed.

Arguments: directory, mode, megabytes, and optionally a flag file to create before the second save
(``tests.faultyfs`` then slows its writes down, so the save is surely in flight when the kill comes).
"""

import pathlib
import sys
import time

import torch

import tests.faultyfs  # noqa: F401 - registers faulty://
from dcp_plugin import CheckpointManager


def main(directory: str, mode: str, megabytes: int, slow_flag: str | None) -> None:
    torch.manual_seed(0)
    state = {"weights": torch.nn.ParameterDict({"w": torch.nn.Parameter(torch.randn(megabytes * 2**18))})}
    manager = CheckpointManager(directory, async_mode=mode)
    manager.save(1, {"model": state["weights"]})
    manager.wait()
    with torch.no_grad():
        state["weights"]["w"].add_(1)
    if slow_flag:
        pathlib.Path(slow_flag).touch()
    manager.save(2, {"model": state["weights"]})
    print("SAVING", flush=True)
    time.sleep(600)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] if len(sys.argv) > 4 else None)
