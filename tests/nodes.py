"""Several nodes on this one host: each "node" is its own ``torchrun --nnodes N --node_rank k`` process (c10d
rendezvous on 127.0.0.1), with its own directory standing for its local disk (``NODE_DIR``)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tests.accelerate.launch import script_env
from tests.multiproc import free_port

ROOT = Path(__file__).resolve().parents[1]
DRILL = Path(__file__).with_name("scripts") / "nodes_drill.py"


@dataclass
class NodeRun:
    """How one node's torchrun ended."""

    node: int
    returncode: int | None
    output: str

    @property
    def killed(self) -> bool:
        return self.returncode == -signal.SIGKILL


def launch_nodes(
    args: list[str],
    dirs: list[Path],
    *,
    env: dict[str, str] | None = None,
    node_env: dict[int, dict[str, str]] | None = None,
    timeout: float = 240,
    script: Path = DRILL,
) -> list[NodeRun]:
    """Start one torchrun per directory (a node each, one process per node) and wait for all of them; a node that
    outlives ``timeout`` is killed with its whole process group. Returns how each ended (no assertion here)."""
    port = free_port()
    procs = []
    logs = []
    for node, directory in enumerate(dirs):
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nnodes={len(dirs)}",
            f"--node_rank={node}",
            "--nproc_per_node=1",
            "--rdzv_backend=c10d",
            f"--rdzv_endpoint=127.0.0.1:{port}",
            "--max_restarts=0",
            "--monitor_interval=0.5",
            str(script),
            *args,
        ]
        extra = {"NODE_DIR": str(directory), "NODE_LAUNCH": str(node), **(env or {}), **(node_env or {}).get(node, {})}
        log = open(directory.parent / f"node{node}.{time.monotonic_ns()}.log", "w+")  # noqa: SIM115 - closed below
        logs.append(log)
        procs.append(
            subprocess.Popen(
                command, env=script_env(extra), cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        )
    deadline = time.monotonic() + timeout
    runs = []
    for proc in procs:
        try:
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    for node, proc in enumerate(procs):
        if proc.poll() is None:
            stop(proc)
        logs[node].seek(0)
        runs.append(NodeRun(node, proc.returncode, logs[node].read()))
        logs[node].close()
    return runs


def stop(proc: subprocess.Popen) -> None:
    """Kill a node: its torchrun and every process it started (its own process group, and the workers' groups)."""
    import psutil

    try:
        children = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        children = []
    for process in [proc, *children]:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            process.kill()
        except (psutil.NoSuchProcess, ProcessLookupError):
            pass
    proc.wait(30)


def succeeded(runs: list[NodeRun]) -> None:
    """Fail with every node's output unless every node exited 0."""
    if any(run.returncode != 0 for run in runs):
        raise AssertionError("\n".join(f"--- node {r.node} exited {r.returncode}\n{r.output[-6000:]}" for r in runs))


def results(out: Path, phase: str, nodes: int) -> list[Any]:
    """What each node's script reported for ``phase`` (by launch, not by the rank the rendezvous gave it)."""
    return [torch.load(out / f"{phase}_{node}.pt", weights_only=False) for node in range(nodes)]


__all__ = ["NodeRun", "launch_nodes", "results", "stop", "succeeded"]
