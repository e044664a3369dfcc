"""Starting a job of N ranks on this host (one process per rank joined in a gloo group, as torchrun starts them),
waiting for it, and gathering what each rank measured.

Every rank runs ``benchmarks/scaling_rank.py`` in a session of its own; a job that fails on any rank or runs past
its deadline has every rank killed by process id, and its error is reported with the ranks' last output.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from typing import Any

from benchmarks.scaling_state import Point

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class JobFailed(RuntimeError):
    """A rank failed, or the job ran past its deadline."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_job(world: int, points: list[Point], settings: dict[str, Any], timeout_s: float) -> list[dict[str, Any]]:
    """Run ``points`` on a job of ``world`` ranks; returns each rank's result (``benchmarks/scaling_rank.py``)."""
    with tempfile.TemporaryDirectory(prefix="dcp-scaling-job-") as scratch:
        spec = dict(settings, points=[asdict(point) for point in points])
        spec_path = os.path.join(scratch, "spec.json")
        with open(spec_path, "w", encoding="utf-8") as handle:
            json.dump(spec, handle)
        port = free_port()
        procs, logs = [], []
        env_base = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")])))
        env_base.update(OMP_NUM_THREADS=str(settings.get("torch_threads", 1)), MASTER_ADDR="127.0.0.1")
        try:
            for rank in range(world):
                env = dict(env_base, MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank))
                env.update(WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world))
                log = open(os.path.join(scratch, f"rank{rank}.log"), "wb")  # noqa: SIM115 - closed below
                logs.append(log)
                procs.append(
                    subprocess.Popen(
                        [sys.executable, "-m", "benchmarks.scaling_rank", spec_path, scratch],
                        cwd=REPO,
                        env=env,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                    )
                )
            _wait(procs, timeout_s)
        finally:
            _kill(procs)
            for log in logs:
                log.close()
        results = []
        for rank in range(world):
            path = os.path.join(scratch, f"rank{rank}.json")
            if not os.path.exists(path):
                raise JobFailed(f"rank {rank} of {world} wrote no result:\n{_tail(scratch, rank)}")
            with open(path, encoding="utf-8") as handle:
                result = json.load(handle)
            if not result.get("ok"):
                raise JobFailed(f"rank {rank} of {world} failed: {result.get('traceback') or result.get('error')}")
            results.append(result)
        return results


def _wait(procs: list[subprocess.Popen], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while any(proc.poll() is None for proc in procs):
        if any(proc.poll() not in (None, 0) for proc in procs):
            time.sleep(5)  # let the other ranks notice and write their errors, then stop them
            return
        if time.monotonic() > deadline:
            raise JobFailed(f"a job of {len(procs)} ranks ran past {timeout_s:.0f} s")
        time.sleep(0.2)


def _kill(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()


def _tail(scratch: str, rank: int) -> str:
    try:
        with open(os.path.join(scratch, f"rank{rank}.log"), encoding="utf-8", errors="replace") as handle:
            return handle.read()[-3000:]
    except OSError:
        return "(no log)"


__all__ = ["JobFailed", "run_job"]
