"""Measures one contender (or the raw disk) in a fresh process; the runner starts one per measurement.

Usage: ``python -m benchmarks.worker SPEC.json RESULT.json``. The ``__main__`` guard matters: DCP's
process mode re-imports this module in its writer process.
"""

from __future__ import annotations

import gc
import json
import os
import statistics
import sys
import time
import traceback
from typing import Any

MAX_OVERLAP_STEPS = 10_000


def _now() -> float:
    return time.perf_counter()


def run_raw(spec: dict[str, Any]) -> dict[str, Any]:
    """Sequential write + fsync, then read after eviction, of the workload's byte count."""
    from benchmarks import diskio, workload

    nbytes = workload.exact_bytes(spec["state_bytes"])
    path = os.path.join(spec["directory"], "raw.bin")
    samples = []
    for _ in range(spec["saves"]):
        write_s = diskio.raw_write(path, nbytes)
        read_s = diskio.raw_read(path)
        diskio.remove(path)
        samples.append({"write_s": write_s, "read_s": read_s, "bytes": nbytes})
    return {"samples": samples, "state_bytes": nbytes}


def run_contender(spec: dict[str, Any]) -> dict[str, Any]:
    from benchmarks import diskio, workload
    from benchmarks.contenders import CONTENDERS, Context, remove_checkpoint
    from benchmarks.memory import tree_memory

    info = CONTENDERS[spec["contender"]]
    work = workload.build(spec["state_bytes"])
    contender = info.factory(Context(work=work, directory=spec["directory"]))
    pid = os.getpid()
    result: dict[str, Any] = {"state_bytes": work.state_bytes, "saves": [], "overlap": [], "windows": []}

    def baseline_steps() -> list[float]:
        times = []
        for _ in range(spec["train_steps"]):
            began = _now()
            work.train_step()
            times.append(_now() - began)
        return times

    step_times = baseline_steps()
    result["train_step_s"] = step_times
    gc.collect()
    result["memory_baseline"] = tree_memory(pid)

    step = 0
    previous: int | None = None
    fingerprints: dict[int, list[float]] = {}

    def forget_previous(current: int) -> None:
        nonlocal previous
        if previous is not None:
            remove_checkpoint(contender, previous)
            fingerprints.pop(previous, None)
        previous = current

    # Saves with nothing else running: blocking, staging and time to durable, without overlap.
    for index in range(spec["saves"] + 1):
        step += 1
        fingerprints[step] = work.fingerprint()
        window_start = time.monotonic()
        started = _now()
        contender.save(step)
        returned = _now()
        contender.wait_staging()
        staged = _now()
        contender.wait()
        durable = _now()
        result["windows"].append((window_start, time.monotonic()))
        nbytes = diskio.size_of(contender.path(step))
        forget_previous(step)
        result["saves"].append(
            {
                "warmup": index == 0,
                "blocked_s": returned - started,
                "staged_s": staged - started,
                "durable_s": durable - started,
                "bytes": nbytes,
                "memory_after": tree_memory(pid),
            }
        )

    # Saves while training continues: how long the loop stalls, and its throughput meanwhile.
    if info.background:
        for _ in range(spec["overlap_saves"]):
            # the baseline right before each overlapped save: on a shared machine conditions drift
            baseline = statistics.median(baseline_steps())
            step += 1
            fingerprints[step] = work.fingerprint()
            stall = 0.0

            def wait_for_snapshot() -> None:
                nonlocal stall
                began = _now()
                contender.wait_staging()
                stall += _now() - began

            started = _now()
            contender.save(step)
            stall += _now() - started
            steps = 0
            while True:
                work.train_step(wait_for_snapshot)
                steps += 1
                if contender.done() or steps >= MAX_OVERLAP_STEPS:
                    break
            elapsed = _now() - started
            contender.wait()
            forget_previous(step)
            result["overlap"].append(
                {"stall_s": stall, "steps": steps, "elapsed_s": elapsed, "baseline_step_s": baseline}
            )

    # Load the last checkpoint from disk (its pages evicted) into a perturbed state.
    assert previous is not None
    diskio.evict(contender.path(previous))
    work.perturb()
    started = _now()
    contender.load(previous)
    result["load_s"] = _now() - started
    expected, got = fingerprints[previous], work.fingerprint()
    result["load_verified"] = all(abs(a - b) <= 1e-6 * max(1.0, abs(a)) for a, b in zip(expected, got))
    contender.close()
    return result


def main(argv: list[str]) -> int:
    spec_path, result_path = argv
    with open(spec_path, encoding="utf-8") as handle:
        spec = json.load(handle)
    try:
        result = run_raw(spec) if spec.get("raw") else run_contender(spec)
        result["ok"] = True
    except BaseException as err:  # noqa: BLE001 - reported to the runner (CheckpointException is a BaseException)
        result = {"ok": False, "error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()}
    with open(result_path, "w", encoding="utf-8") as handle:
        json.dump(result, handle)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
