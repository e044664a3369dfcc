"""How long the first save blocks the loop compared with later ones (``process`` mode starts a writer daemon).

    python benchmarks/first_save.py [--state-mib 256] [--saves 4]

Each case runs in a fresh process: a ``CheckpointManager`` (the daemon starts when the manager is built) and a
Lightning ``DCPCheckpointIO`` called as a Trainer would (the daemon starts at the first save unless a
callback's setup warmed it up). Reported: the first save's blocking time and the median of the later ones.
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


def measure(kind: str, state_mib: float, saves: int, directory: str) -> dict:
    from benchmarks import workload

    work = workload.build(int(state_mib * 2**20))
    blocked = []
    if kind == "CheckpointManager":
        from dcp_plugin import CheckpointManager

        with CheckpointManager(directory, async_mode="process") as manager:
            time.sleep(3)  # training would run here while the daemon starts
            for step in range(1, saves + 1):
                began = time.perf_counter()
                manager.save(step, {"model": work.model, "optim": work.optimizer})
                blocked.append(time.perf_counter() - began)
                manager.wait()
    else:
        from dcp_plugin.lightning import DCPCheckpointIO

        plugin = DCPCheckpointIO(async_mode="process")
        for step in range(1, saves + 1):
            checkpoint = {
                "global_step": step,
                "state_dict": work.model.state_dict(),
                "optimizer_states": [work.optimizer.state_dict()],
            }
            began = time.perf_counter()
            plugin.save_checkpoint(checkpoint, os.path.join(directory, f"step={step}.ckpt"))
            blocked.append(time.perf_counter() - began)
            plugin.wait()
        plugin.teardown()
    return {"first_s": blocked[0], "later_s": statistics.median(blocked[1:])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--state-mib", type=float, default=256)
    parser.add_argument("--saves", type=int, default=4)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        with tempfile.TemporaryDirectory() as directory:
            print(json.dumps(measure(args.worker, args.state_mib, args.saves, directory)))
        return
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for kind in ("CheckpointManager", "DCPCheckpointIO"):
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "benchmarks.first_save",
                "--worker",
                kind,
                "--state-mib",
                str(args.state_mib),
                "--saves",
                str(args.saves),
            ],
            capture_output=True,
            text=True,
            cwd=root,
            check=True,
        )
        result = json.loads(done.stdout.strip().splitlines()[-1])
        ratio = result["first_s"] / result["later_s"]
        print(
            f"{kind} (process mode, {args.state_mib:g} MiB): first save blocked {result['first_s'] * 1000:.0f} ms, "
            f"later saves {result['later_s'] * 1000:.0f} ms (median): first / later = {ratio:.2f}"
        )


if __name__ == "__main__":
    main()
