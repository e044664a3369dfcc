"""The main demo: train with asynchronous checkpoints, get killed, resume, and check nothing was lost.

1. A training process saves every ``--save-every`` steps to the local disk with ``CheckpointManager``'s defaults
   (a background writer thread, the snapshot copied in the background too), and is killed with SIGKILL at
   ``--kill-at``: by default a save step, right after that save started, so its checkpoint is cut off in the
   middle of the write.
2. The interrupted write is not listed; a new process resumes from the latest committed checkpoint and finishes.
3. An uninterrupted run without checkpoints gives the reference: the resumed run must match it bit for bit.
4. A summary: where the files are, why only the newest are left (retention), how long training waited per save
   next to ``torch.save`` of the same state, measured in the same run, and ``dcp-plugin`` commands to try next,
   printed so that they run as shown from the directory the demo was started in.

Run: ``python examples/demo.py`` (or ``nox -s demo``).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
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
    manager = CheckpointManager(  # the defaults: what a new user gets (printed by the demo's first line)
        directory,
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
            started = manager.maybe_save(state["step"], state)
            train_time += time.perf_counter() - began
            _record(manager, stats_file, train_time)
            print(f"STEP {state['step']}", flush=True)
            if started is not None:
                print(f"SAVING {state['step']}", flush=True)  # returned: the write goes on in the background
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


def reference(steps: int):
    model, optimizer, scheduler = build()
    torch.manual_seed(1234)
    for _ in range(steps):
        train_step(model, optimizer, scheduler)
    return model, optimizer, scheduler


def time_torch_save(model, optimizer, scheduler, path: Path, repeats: int = 3) -> float:
    """Median seconds ``torch.save`` of the same state blocks (it writes into the page cache; no fsync)."""
    state = {"model": model.state_dict(), "optim": optimizer.state_dict(), "sched": scheduler.state_dict()}
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        torch.save(state, path)
        times.append(time.perf_counter() - began)
    path.unlink()
    return statistics.median(times)


def shown(path: Path) -> str:
    """``path`` relative to the current directory when it is below it (what to type next)."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def cli_command() -> str:
    """How to run the ``dcp-plugin`` command as typed in this shell: its name when the one on ``PATH`` is this
    interpreter's, else the path of this interpreter's script (e.g. ``.nox/demo/bin/dcp-plugin`` under nox), else
    ``python -m dcp_plugin.cli`` with this interpreter and the source tree it imported dcp-plugin from."""
    script = Path(sys.executable).parent / "dcp-plugin"
    on_path = shutil.which("dcp-plugin")
    if script.exists():
        if on_path and Path(on_path).resolve() == script.resolve():
            return "dcp-plugin"
        return shlex.quote(shown(script) if "/" in shown(script) else f"./{shown(script)}")
    import dcp_plugin

    source = Path(dcp_plugin.__file__).resolve().parents[1]  # not installed: run from the source tree
    return f"PYTHONPATH={shlex.quote(str(source))} {shlex.quote(sys.executable)} -m dcp_plugin.cli"


def try_next(command: str, directory: str, newest: str) -> list[str]:
    """The commands the summary suggests, each runnable as printed."""
    directory, newest = shlex.quote(directory), shlex.quote(newest)
    return [
        f"{command} ls {directory}",
        f"{command} verify --load {newest}",
        f"{command} inspect {newest}",
        f"{command} export {newest} model.safetensors",
    ]


def defaults_line() -> str:
    """What ``CheckpointManager``'s defaults resolve to on this host (the demo uses them)."""
    from dcp_plugin import CheckpointConfig

    config = CheckpointConfig()
    staging = "in the background" if config.stages_in_background else "before save returns"
    return f"async_mode={config.async_mode!r}, snapshot copied {staging}, {config.thread_count} writer threads"


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

    mid_write = args.kill_at % args.save_every == 0
    when = "while the checkpoint of that step is being written" if mid_write else "between two saves"
    print(
        f"== 1. training to step {args.steps}, checkpoint every {args.save_every} steps, keeping the last {args.keep}; "
        f"SIGKILL at step {args.kill_at}, {when}"
    )
    print(f"   CheckpointManager with its defaults: {defaults_line()}")
    first = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env)
    trigger = f"SAVING {args.kill_at}" if mid_write else f"STEP {args.kill_at}"
    for line in first.stdout:
        if line.strip() == trigger:
            first.send_signal(signal.SIGKILL)
            break
    first.wait()
    print(f"   killed the training process (exit code {first.returncode}) right after step {args.kill_at}")

    with CheckpointManager(str(checkpoints), async_mode="sync") as manager:
        survivors = manager.steps
        leftovers = manager.storage.incomplete()
    print(f"   committed checkpoints that survived: {survivors}")
    if leftovers:
        print(
            f"   the interrupted write left {', '.join(leftovers)}: it is never listed and never loaded "
            f"(`dcp-plugin ls` counts it; `dcp-plugin purge` removes it)"
        )
    elif mid_write:
        print(f"   (the write of step {args.kill_at} finished before the kill arrived: nothing was cut off this time)")

    print("== 2. resuming in a new process")
    second = subprocess.run(command, capture_output=True, text=True, env=env)
    resumed_line = next((line for line in second.stdout.splitlines() if "resumed from" in line), "")
    if second.returncode != 0:
        print(second.stdout[-2000:], second.stderr[-4000:])
        return 1
    print(f"   {resumed_line.split('] ', 1)[-1]}; finished step {args.steps}")
    if mid_write:
        print(f"   (not from step {args.kill_at}: that write never committed, so no process can load it)")

    print("== 3. reference run without interruption or checkpoints")
    model, optimizer, scheduler = reference(args.steps)
    expected = model.state_dict()
    resumed = torch.load(workdir / "resumed_final.pt", weights_only=True)
    identical = all(torch.equal(expected[key], resumed[key]) for key in expected)
    print(f"   resumed run matches the uninterrupted run bit for bit: {'yes' if identical else 'NO'}")
    torch_save_s = time_torch_save(model, optimizer, scheduler, workdir / "torch_save.pt")

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
    gone = sorted({r["name"] for r in saves} - {info.name for info in on_disk})
    if gone:
        print(
            f"   {', '.join(gone)}: deleted by retention, KeepLast({args.keep}), each once a newer checkpoint had "
            "committed (--keep changes how many stay)"
        )
    if waits:
        print(
            f"   training waited per save: median {statistics.median(waits) * 1000:.1f} ms, "
            f"max {max(waits) * 1000:.1f} ms; torch.save of the same state: {torch_save_s * 1000:.1f} ms "
            f"(median of 3, just now, into the page cache without fsync)"
        )
        print(f"   time to durable per save (written and fsynced): median {statistics.median(durable):.2f} s")
        print(
            f"   total wait {sum(waits):.2f} s over {train_time:.1f} s of training "
            f"({100 * sum(waits) / max(train_time, 1e-9):.1f}%)"
        )
    newest = shown(checkpoints / on_disk[-1].name) if on_disk else shown(checkpoints)
    print(f"== files: {shown(checkpoints)} (one directory per checkpoint, the data files and a checksummed manifest)")
    command = cli_command()
    print("   try next (from this directory):")
    for line in try_next(command, shown(checkpoints), newest):
        print(f"     {line}")
    return 0 if identical and survivors else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", default="runs/demo", help="working directory (wiped first)")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--save-every", type=int, default=10)
    parser.add_argument(
        "--kill-at", type=int, default=40, help="step to SIGKILL at; a save step cuts its checkpoint's write off"
    )
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
