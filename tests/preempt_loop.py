"""A plain PyTorch training loop driven by CheckpointManager policies, run as a real process by the tests.

    python -m tests.preempt_loop DIR --steps N            train from scratch (or resume) up to N steps
    python -m tests.preempt_loop DIR --until-stopped      train until preempted (SIGTERM/SIGUSR1)

Each step's data comes from a generator seeded with the step, so a resumed run and an uninterrupted one
see the same batches. Prints ``step <n>`` after every step and ``stopped <n>`` / ``done <n>`` at the end.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from dcp_plugin import CheckpointManager
from dcp_plugin.policies import EveryNSteps, KeepLast, OnPreemption
from dcp_plugin.storage import CheckpointNotFoundError
from tests.models import make_training


def batch(step: int) -> torch.Tensor:
    return torch.randn(8, 16, generator=torch.Generator().manual_seed(step))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("directory")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--until-stopped", action="store_true")
    parser.add_argument(
        "--pace", type=float, default=0.02, help="seconds to sleep per step (lets a signal land mid-run)"
    )
    args = parser.parse_args(argv)

    model, optimizer, scheduler = make_training(0)
    manager = CheckpointManager(
        args.directory,
        async_mode="thread",
        run_id="preempt-loop",
        save_policy=EveryNSteps(1000) | OnPreemption(),
        retention=KeepLast(2),
    )
    state = {"model": model, "optim": optimizer, "sched": scheduler, "step": 0}
    try:
        manager.load(state)
    except CheckpointNotFoundError:
        pass
    step = int(state["step"])
    limit = args.steps if args.steps is not None else 10**9
    with manager:
        while step < limit:
            loss = model(batch(step)).pow(2).mean()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            scheduler.step()
            step += 1
            state["step"] = step
            print(f"step {step}", flush=True)
            manager.maybe_save(step, state)
            if manager.should_stop:
                print(f"stopped {step}", flush=True)
                return 0
            if args.until_stopped and args.pace:
                time.sleep(args.pace)
    print(f"done {step}", flush=True)
    torch.save({k: v.clone() for k, v in model.state_dict().items()}, f"{args.directory}.final.pt")
    return 0


if __name__ == "__main__":
    sys.exit(main())
