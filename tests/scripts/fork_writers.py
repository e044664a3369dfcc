"""Save once, then fork two processes that both save at the same time, each into its own directory, the way
``notebook_launcher`` or a fork-started rank inherits a process that has already saved.

Usage: fork_writers.py DIRECTORY SAVES
Each child saves SAVES checkpoints of small tensors (they go through the writer's page-aligned buffer), then
checks every one against its digests and loads it back; the exit status is 0 only if both children found their
own bytes in every checkpoint.
"""

from __future__ import annotations

import os
import sys

import torch

from dcp_plugin import CheckpointManager


def state(child: int, save: int) -> dict[str, torch.Tensor]:
    return {f"t{index}": torch.full((16384,), float(child * 1000 + save)) for index in range(64)}  # 64 x 64 KiB


def save_and_check(directory: str, child: int, saves: int) -> bool:
    exact = True
    with CheckpointManager(directory, async_mode="sync", keep_last=None) as manager:
        for save in range(1, saves + 1):
            manager.save(save, state(child, save))
        for save in range(1, saves + 1):
            expected = state(child, save)
            loaded = {key: torch.empty_like(value) for key, value in expected.items()}
            manager.load(loaded, step=save)
            exact &= all(torch.equal(loaded[key], value) for key, value in expected.items())
    return exact


def main() -> None:
    directory, saves = sys.argv[1], int(sys.argv[2])
    torch.set_num_threads(1)  # no OpenMP team to inherit across fork
    with CheckpointManager(os.path.join(directory, "parent"), async_mode="sync") as manager:
        manager.save(0, state(9, 0))
    children = []
    for child in (1, 2):
        pid = os.fork()
        if pid == 0:
            try:
                exact = save_and_check(os.path.join(directory, f"child{child}"), child, saves)
            except BaseException as error:  # noqa: BLE001 - reported through the exit status
                print(f"child {child}: {type(error).__name__}: {error}", file=sys.stderr, flush=True)
                exact = False
            os._exit(0 if exact else 1)
        children.append(pid)
    failed = [child for child, pid in enumerate(children, 1) if os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])]
    if failed:
        sys.exit(f"children {failed} did not get their own bytes back")


if __name__ == "__main__":
    main()
