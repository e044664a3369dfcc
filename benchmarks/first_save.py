"""How long the first save blocks the loop compared with later ones (``process`` mode starts a writer daemon).

    python benchmarks/first_save.py [--state-mib 256] [--saves 4]

Each case runs in a fresh process: a ``CheckpointManager`` (the daemon starts when the manager is built; the
staging buffers are prepared in the background by ``maybe_save`` at the first step that does not save, here by
calling ``prepare`` after a training step) and a Lightning ``DCPCheckpointIO`` called as a Trainer would (at
``fit`` setup ``ModelCheckpoint``/``DCPCheckpoint`` start the daemon and, after the first optimizer step, prepare
the staging buffers: done here by the same calls), and an ``Accelerator`` with dcp-plugin enabled (its first
optimizer step starts the daemon and prepares the buffers). ``--no-prepare`` leaves all that out (the old
behaviour).
Reported: the first save's blocking time and the median of the later ones.
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

LEAD_S = 8.0
"""Training time before the first save: the writer daemon (a fresh interpreter importing torch) needs a few
seconds to start; on a busy 2-core host more than 3."""


def measure(kind: str, state_mib: float, saves: int, directory: str, prepare: bool) -> dict:
    from benchmarks import workload

    work = workload.build(int(state_mib * 2**20))
    work.train_step()  # the optimizer's moments exist, as after the first step of a run
    blocked = []
    if kind == "CheckpointManager":
        from dcp_plugin import CheckpointManager

        with CheckpointManager(directory, async_mode="process") as manager:
            if prepare:
                manager.prepare({"model": work.model, "optim": work.optimizer})
            time.sleep(LEAD_S)  # training would run here while the daemon starts
            for step in range(1, saves + 1):
                began = time.perf_counter()
                manager.save(step, {"model": work.model, "optim": work.optimizer})
                blocked.append(time.perf_counter() - began)
                manager.wait()
    elif kind == "Accelerate":
        from accelerate import Accelerator

        import dcp_plugin.accelerate as dpa

        accelerator = Accelerator(cpu=True)
        model, optimizer = accelerator.prepare(work.model, work.optimizer)
        work.model, work.optimizer = model, optimizer
        if prepare:
            dpa.enable(accelerator, async_mode="process")
            work.train_step()  # the first optimizer step starts the writer process and prepares the buffers
        else:
            work.train_step()
            dpa.enable(accelerator, async_mode="process")
        time.sleep(LEAD_S)
        for step in range(1, saves + 1):
            began = time.perf_counter()
            accelerator.save_state(os.path.join(directory, f"checkpoint_{step}"))
            blocked.append(time.perf_counter() - began)
            accelerator.wait_for_everyone()
        dpa.disable(accelerator)
    else:
        from dcp_plugin.lightning import DCPCheckpointIO, layout

        plugin = DCPCheckpointIO(async_mode="process")
        if prepare:  # what fit setup does, and its hook after the first optimizer step
            plugin.engine().warm_up()
            live = {"state_dict": work.model.state_dict(), "optimizer_states": [work.optimizer.state_dict()]}
            plugin.checkpointer().prepare(layout.split_checkpoint(live)[0])
            time.sleep(LEAD_S)
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
    parser.add_argument("--no-prepare", action="store_true", help="no daemon start or staging ahead of time")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        with tempfile.TemporaryDirectory() as directory:
            print(json.dumps(measure(args.worker, args.state_mib, args.saves, directory, not args.no_prepare)))
        return
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for kind in ("CheckpointManager", "DCPCheckpointIO", "Accelerate"):
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
                *(["--no-prepare"] if args.no_prepare else []),
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
