"""Peak extra host memory and time to durable of thread-mode saves, unbounded against ``max_staging_bytes``.

    python -m benchmarks.bounded_staging [--state-mib 400] [--budgets-mib 16,64] [--saves 3]

Each contender runs in a fresh process (the workload of :mod:`benchmarks.workload`: an MLP + AdamW); the parent
samples the child's host memory (PSS, page cache not counted) every 10 ms. Reported per contender: the largest
tensor, the peak extra host memory during a save over the memory before the first save (highest of all saves),
what stays resident between saves, the time ``save`` blocks (until the snapshot is safe, ``async_staging`` off)
and the time to durable (committed), medians over the saves after the first. ``tracemalloc`` is no use here: it
sees Python's allocator only, not torch's.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from benchmarks.memory import Sampler

MIB = 2**20


def measure(budget_mib: float | None, state_mib: float, saves: int, directory: str) -> dict:
    import torch

    from benchmarks import workload
    from dcp_plugin import CheckpointManager

    work = workload.build(int(state_mib * MIB))
    largest = max(p.nbytes for p in work.model.parameters())
    budget = None if budget_mib is None else int(budget_mib * MIB)
    time.sleep(1.0)  # the parent takes the baseline now
    ready = time.monotonic()
    windows, blocking, durable = [], [], []
    with CheckpointManager(directory, async_mode="thread", max_staging_bytes=budget) as manager:
        for step in range(1, saves + 1):
            began = time.monotonic()
            stats = manager.save(step, {"model": work.model, "optim": work.optimizer})
            manager.wait()
            windows.append((began, time.monotonic()))
            blocking.append(stats.blocking_s)
            durable.append(stats.durable_s)
            time.sleep(0.3)
        settled = time.monotonic()
        time.sleep(0.5)  # the parent measures what stays resident between saves
        done = time.monotonic()
    del torch
    return {
        "ready": ready,
        "windows": windows,
        "between": (settled, done),
        "largest": largest,
        "state": work.state_bytes,
        "blocking_s": blocking,
        "durable_s": durable,
    }


def run_one(budget_mib: float | None, args: argparse.Namespace, root: str) -> dict:
    command = [sys.executable, "-m", "benchmarks.bounded_staging", "--worker", str(budget_mib or 0)]
    command += ["--state-mib", str(args.state_mib), "--saves", str(args.saves)]
    child = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, cwd=root)
    with Sampler(child.pid, interval=0.01) as sampler:
        out, _ = child.communicate()
    if child.returncode:
        raise RuntimeError(f"the worker for budget {budget_mib} failed")
    result = json.loads(out.strip().splitlines()[-1])
    ready = result["ready"]
    before = [v for t, v in sampler.samples if ready - 0.6 <= t <= ready]
    baseline = max(before)
    peak = sampler.peak_between([tuple(w) for w in result["windows"]]) or baseline
    settled, done = result["between"]
    between = [v for t, v in sampler.samples if settled <= t <= done]
    later = slice(1, None) if args.saves > 1 else slice(None)
    return {
        "budget_mib": budget_mib,
        "state_mib": result["state"] / MIB,
        "largest_mib": result["largest"] / MIB,
        "peak_extra_mib": (peak - baseline) / MIB,
        "resident_after_mib": (statistics.median(between) - baseline) / MIB if between else None,
        "blocking_s": statistics.median(result["blocking_s"][later]),
        "durable_s": statistics.median(result["durable_s"][later]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--state-mib", type=float, default=400)
    parser.add_argument("--budgets-mib", default="16,64")
    parser.add_argument("--saves", type=int, default=3)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        budget = float(args.worker) or None
        with tempfile.TemporaryDirectory() as directory:
            print(json.dumps(measure(budget, args.state_mib, args.saves, directory)))
        return
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    budgets: list[float | None] = [None] + [float(b) for b in args.budgets_mib.split(",") if b]
    columns = ["max_staging_bytes", "state", "largest tensor", "peak extra host memory", "resident between saves"]
    print("| " + " | ".join(columns + ["save blocks", "time to durable"]) + " |")
    print("|---|---|---|---|---|---|---|")
    for budget in budgets:
        r = run_one(budget, args, root)
        name = "unbounded" if budget is None else f"{budget:g} MiB"
        after = "-" if r["resident_after_mib"] is None else f"{r['resident_after_mib']:.0f} MiB"
        print(
            f"| {name} | {r['state_mib']:.0f} MiB | {r['largest_mib']:.0f} MiB | {r['peak_extra_mib']:.0f} MiB | "
            f"{after} | {r['blocking_s']:.2f} s | {r['durable_s']:.2f} s |",
            flush=True,
        )


if __name__ == "__main__":
    main()
