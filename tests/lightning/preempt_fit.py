"""A Lightning training run with DCPCheckpoint, run as a real process (or one process per rank) by the tests.

    python -m tests.lightning.preempt_fit DIR --max-steps N [--pace S] [--final FILE]

Rank processes are started by the test with RANK/LOCAL_RANK/WORLD_SIZE/MASTER_* set (as torchrun does).
One batch per epoch, no shuffling and the plugin's saved RNG states make a resumed run repeat an
uninterrupted one exactly. Prints ``step <n>`` (rank 0) after each step and ``stopped <n>`` when a
preemption signal ended training.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

from dcp_plugin.lightning import DCPCheckpoint, DCPCheckpointIO
from tests.lightning.helpers import TinyModule, dataset, seed_all


class Pace(pl.Callback):
    """Report progress and slow the loop down so a signal lands mid-run."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def on_train_batch_end(self, trainer: pl.Trainer, *args: object) -> None:
        if trainer.is_global_zero:
            print(f"step {trainer.global_step}", flush=True)
        if self.seconds:
            time.sleep(self.seconds)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("directory")
    parser.add_argument("--max-steps", type=int, required=True)
    parser.add_argument("--pace", type=float, default=0.0)
    parser.add_argument("--final", default=None, help="write the final weights here (rank 0)")
    args = parser.parse_args(argv)

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    seed_all(0)
    module = TinyModule()
    callback = DCPCheckpoint(args.directory, every_n_train_steps=1000, keep_last=2, save_on_signal=True)
    trainer = pl.Trainer(
        default_root_dir=args.directory,
        accelerator="cpu",
        devices=world_size,
        strategy="ddp" if world_size > 1 else "auto",
        max_steps=args.max_steps,
        max_epochs=-1,
        plugins=[DCPCheckpointIO(async_mode="thread")],
        callbacks=[Pace(args.pace), callback],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    data = DataLoader(dataset(n=4 * world_size), batch_size=4, shuffle=False)
    try:
        trainer.fit(module, data)
    except SystemExit:  # Lightning's SIGTERMException after the preemption save
        if trainer.is_global_zero:
            print(f"stopped {trainer.global_step}", flush=True)
        return 0
    if trainer.should_stop and trainer.global_step < args.max_steps:
        if trainer.is_global_zero:
            print(f"stopped {trainer.global_step}", flush=True)
        return 0
    if trainer.is_global_zero:
        print(f"done {trainer.global_step}", flush=True)
        if args.final:
            torch.save({k: v.detach().clone() for k, v in module.state_dict().items()}, args.final)
    return 0


if __name__ == "__main__":
    sys.exit(main())
