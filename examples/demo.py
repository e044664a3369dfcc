"""The main demo: train with asynchronous checkpoints, get killed, resume, and check nothing was lost.

1. A training process saves every ``--save-every`` steps to the local disk in the background
   (``async_mode="thread"`` with asynchronous staging), and is killed with SIGKILL at ``--kill-at``.
2. A new process resumes from the latest committed checkpoint and finishes the run.
3. An uninterrupted run without checkpoints gives the reference: the resumed run must match it bit for bit.
4. A summary says what was saved and how long training waited for checkpoints.

Run: ``python examples/demo.py`` (or ``nox -s demo``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from dcp_plugin import CheckpointManager, EveryNSteps, KeepLast, RNGState

HIDDEN = 1024


def build(seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(256, HIDDEN),
        torch.nn.GELU(),
        torch.nn.Dropout(0.1),
        torch.nn.Linear(HIDDEN, HIDDEN),
        torch.nn.GELU(),
        torch.nn.Linear(HIDDEN, 256),
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=1000)
    return model, optimizer, scheduler


def train_step(model, optimizer, scheduler) -> float:
    inputs = torch.randn(64, 256)
    loss = (model(inputs) - inputs.flip(-1)).pow(2).mean()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    scheduler.step()
    return loss.item()


def worker(directory: str, steps: int, save_every: int, keep: int, stats_path: str) -> None:
    """Train until ``steps`` (resuming if a checkpoint exists), saving asynchronously."""
    model, optimizer, scheduler = build()
    torch.manual_seed(1234)
    state = {"model": model, "optim": optimizer, "sched": scheduler, "rng": RNGState(), "step": 0}
    manager = CheckpointManager(
        directory,
        async_mode="thread",
        async_staging=True,
        save_policy=EveryNSteps(save_every),
        retention=KeepLast(keep),
        run_id="demo",  # the resumed process continues the same run, so retention covers its checkpoints
    )
    if manager.latest() is not None:
        info = manager.load(state)
        print(f"[worker {os.getpid()}] resumed from {info.name} (step {state['step']})", flush=True)
    train_time = 0.0
    with open(stats_path, "a", encoding="utf-8") as stats_file:
        while state["step"] < steps:
            began = time.perf_counter()
            train_step(model, optimizer, scheduler)
            state["step"] += 1
            manager.maybe_save(state["step"], state)
            train_time += time.perf_counter() - began
            _record(manager, stats_file, train_time)
            print(f"STEP {state['step']}", flush=True)
        manager.wait()
        _record(manager, stats_file, train_time)
    manager.close()
    torch.save(model.state_dict(), os.path.join(directory, "..", "resumed_final.pt"))


def _record(manager: CheckpointManager, stats_file, train_time: float) -> None:
    """Append finished saves (and this process's training time so far) to the stats file."""
    finished = manager.engine.drain_completed()
    for done in finished:
        record = {
            "name": done.name,
            "blocking_s": done.blocking_s,
            "staging_wait_s": done.staging_wait_s,
            "durable_s": done.durable_s,
            "bytes": done.bytes_written,
            "pid": os.getpid(),
        }
        stats_file.write(json.dumps(record) + "\n")
    stats_file.write(json.dumps({"train_time_s": train_time, "pid": os.getpid()}) + "\n")
    stats_file.flush()


def reference(steps: int) -> dict[str, torch.Tensor]:
    model, optimizer, scheduler = build()
    torch.manual_seed(1234)
    for _ in range(steps):
        train_step(model, optimizer, scheduler)
    return model.state_dict()


def run(args: argparse.Namespace) -> int:
    workdir = Path(args.dir).resolve()
    shutil.rmtree(workdir, ignore_errors=True)
    checkpoints = workdir / "checkpoints"
    stats_path = workdir / "stats.jsonl"
    workdir.mkdir(parents=True)
    command = [
        sys.executable,
        __file__,
        "--worker",
        "--dir",
        str(checkpoints),
        "--steps",
        str(args.steps),
        "--save-every",
        str(args.save_every),
        "--keep",
        str(args.keep),
        "--stats",
        str(stats_path),
    ]
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")]),
    )

    print(
        f"== 1. training to step {args.steps}, checkpoint every {args.save_every} steps; SIGKILL at step {args.kill_at}"
    )
    first = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env)
    for line in first.stdout:
        if line.startswith("STEP ") and int(line.split()[1]) >= args.kill_at:
            first.send_signal(signal.SIGKILL)
            break
    first.wait()
    print(f"   killed the training process (exit code {first.returncode}) right after step {args.kill_at}")

    with CheckpointManager(str(checkpoints), async_mode="sync") as manager:
        survivors = manager.steps
    print(f"   committed checkpoints that survived: {survivors}")

    print("== 2. resuming in a new process")
    second = subprocess.run(command, capture_output=True, text=True, env=env)
    resumed_line = next((line for line in second.stdout.splitlines() if "resumed from" in line), "")
    if second.returncode != 0:
        print(second.stdout[-2000:], second.stderr[-4000:])
        return 1
    print(f"   {resumed_line.split('] ', 1)[-1]}; finished step {args.steps}")

    print("== 3. reference run without interruption or checkpoints")
    expected = reference(args.steps)
    resumed = torch.load(workdir / "resumed_final.pt", weights_only=True)
    identical = all(torch.equal(expected[key], resumed[key]) for key in expected)
    print(f"   resumed run matches the uninterrupted run bit for bit: {'yes' if identical else 'NO'}")

    print("== 4. summary")
    records = [json.loads(line) for line in stats_path.read_text().splitlines()]
    saves = [r for r in records if "name" in r]
    train_time_by_pid: dict[int, float] = {}
    for record in records:
        if "train_time_s" in record:
            train_time_by_pid[record["pid"]] = max(train_time_by_pid.get(record["pid"], 0.0), record["train_time_s"])
    train_time = sum(train_time_by_pid.values())
    waits = [r["blocking_s"] + r["staging_wait_s"] for r in saves]
    durable = [r["durable_s"] for r in saves if r["durable_s"]]
    with CheckpointManager(str(checkpoints), async_mode="sync") as manager:
        on_disk = manager.list()
    size = on_disk[-1].manifest.get("bytes", 0) if on_disk else 0
    print(f"   checkpoints on disk: {[info.name for info in on_disk]} ({size / 2**20:.1f} MiB each)")
    print(f"   saves committed: {len(saves)} (before the kill and after the resume)")
    if waits:
        print(
            f"   training waited per save: median {statistics.median(waits) * 1000:.1f} ms, "
            f"max {max(waits) * 1000:.1f} ms"
        )
        print(f"   time to durable per save: median {statistics.median(durable):.2f} s")
        print(
            f"   total wait {sum(waits):.2f} s over {train_time:.1f} s of training "
            f"({100 * sum(waits) / max(train_time, 1e-9):.1f}%)"
        )
    return 0 if identical and survivors else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", default="runs/demo", help="working directory (wiped first)")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--save-every", type=int, default=10)
    parser.add_argument("--kill-at", type=int, default=35)
    parser.add_argument("--keep", type=int, default=3, help="committed checkpoints to keep")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--stats", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.dir, args.steps, args.save_every, args.keep, args.stats)
        return 0
    if not 0 < args.kill_at < args.steps:
        parser.error("--kill-at must be between 0 and --steps")
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
