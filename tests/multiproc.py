"""Run a function on N real processes joined in a gloo process group (spawned, like torchrun would)."""

from __future__ import annotations

import os
import socket
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rank_env(rank: int, world_size: int, port: int) -> dict[str, str]:
    """The variables torchrun sets for one rank of a single-node job on 127.0.0.1."""
    return {
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "RANK": str(rank),
        "LOCAL_RANK": str(rank),
        "WORLD_SIZE": str(world_size),
        "LOCAL_WORLD_SIZE": str(world_size),
    }


def _entry(rank: int, fn: Callable[..., Any], world_size: int, port: int, args: tuple, result_dir: str) -> None:
    import torch.distributed as dist

    os.environ.update(rank_env(rank, world_size, port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    succeeded = False
    try:
        result = fn(rank, world_size, *args)
        import torch

        torch.save(result, os.path.join(result_dir, f"rank{rank}.pt"))
        succeeded = True
    except BaseException:
        traceback.print_exc()
    finally:
        from dcp_plugin.engine import daemon

        daemon.shutdown()
        if dist.is_initialized():
            dist.destroy_process_group()
    # Leave without interpreter teardown: gloo's and DCP's native threads can abort a process while static
    # destructors run ("terminate called without an active exception") after the rank's work is done.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0 if succeeded else 1)


def run_ranks(fn: Callable[..., Any], *args: Any, world_size: int = 2, timeout: float = 300) -> list[Any]:
    """Call ``fn(rank, world_size, *args)`` on ``world_size`` spawned processes; return their results.

    ``fn`` must be importable (defined at module level). A failure or a hang on any rank fails the call.
    """
    import torch

    with tempfile.TemporaryDirectory() as result_dir:
        context = mp.start_processes(
            _entry,
            args=(fn, world_size, free_port(), args, result_dir),
            nprocs=world_size,
            join=False,
            start_method="spawn",
        )
        deadline = time.monotonic() + timeout
        try:
            while not context.join(timeout=1):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{fn.__name__} did not finish on {world_size} ranks within {timeout} s")
        finally:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
                    process.join(5)
        return [torch.load(os.path.join(result_dir, f"rank{r}.pt"), weights_only=False) for r in range(world_size)]
