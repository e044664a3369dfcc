"""One goodput run in a fresh process: train, save every N steps, report the loop's wall time as JSON.

Usage: ``python -m benchmarks.goodput_worker SPEC_JSON`` (``contender`` null: the loop without checkpoints).
The ``__main__`` guard matters: DCP's process mode re-imports this module in its writer process.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from typing import Any


def run(spec: dict[str, Any]) -> dict[str, Any]:
    from benchmarks import workload
    from benchmarks.contenders import CONTENDERS, Context

    work = workload.build(spec["state_bytes"])
    contender = None
    if spec["contender"] is not None:
        contender = CONTENDERS[spec["contender"]].factory(Context(work=work, directory=spec["directory"]))
    for _ in range(2):  # warm-up: allocator, threads
        work.train_step()
    if contender is not None:  # warm-up save: writer process, staging buffers, plan caches
        contender.save(0)
        contender.wait_staging()
        contender.wait()
    stalls: list[float] = []  # per save: the save call, plus the staging waits before the next save

    def wait_for_staging() -> None:
        if contender is not None and stalls:
            waiting = time.perf_counter()
            contender.wait_staging()
            stalls[-1] += time.perf_counter() - waiting

    began, faults = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for step in range(1, spec["steps"] + 1):
        work.train_step(before_optimizer_step=wait_for_staging)
        if contender is not None and step % spec["every"] == 0:
            saving = time.perf_counter()
            contender.save(step)
            stalls.append(time.perf_counter() - saving)
    train_s = time.perf_counter() - began
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
    drained = time.perf_counter()
    if contender is not None:
        contender.wait()
        contender.close()
    return {
        "train_s": train_s,
        "drain_s": time.perf_counter() - drained,
        "stalls_s": stalls,
        "saves": len(stalls),
        "state_bytes": work.state_bytes,
        "faults_per_step": faults / spec["steps"],  # minor page faults: memory the loop gets afresh each step
    }


if __name__ == "__main__":
    print(json.dumps(run(json.loads(sys.argv[1]))))
