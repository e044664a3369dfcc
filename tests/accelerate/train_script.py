"""A small Accelerate training run used by the multi-process tests (run with python or torchrun).

    train_script.py train  --project P --epochs 4 --save-epochs 1,2,3 --record R
    train_script.py resume --project P --epochs 4 --save-epochs 4 --record R [--load DIR]
    ... [--check-load DIR --check-tag T]   after training: load DIR and record what was loaded

dcp-plugin is enabled with ``enable(accelerator)`` only: every option comes from DCP_PLUGIN_* variables.
Snapshots (model, optimizer, scheduler, RNG, counters) are written per rank to ``<record>_<tag>_rank<r>.pt``.
"""

from __future__ import annotations

import argparse
import random
import weakref

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, set_seed

import dcp_plugin.accelerate


def snapshot(accelerator, model, optimizer, scheduler, dataloader) -> dict:
    inner = optimizer.optimizer
    checkpointer = dcp_plugin.accelerate.checkpointer_of(accelerator)
    generator = getattr(dataloader, "synchronized_generator", None)
    return {
        "shuffle_generator": generator.get_state() if generator is not None else None,
        "model": {k: v.detach().clone() for k, v in accelerator.unwrap_model(model).state_dict().items()},
        "optimizer": inner.state_dict(),
        "scheduler": scheduler.state_dict(),
        "torch_rng": torch.get_rng_state(),
        "python_rng": random.getstate(),
        "numpy_rng": torch.from_numpy(np.random.get_state()[1].astype(np.int64)),
        "step": accelerator.step,
        "iteration": accelerator.project_configuration.iteration,
        "epoch": dataloader.iteration,
        "rank": accelerator.process_index,
        "world_size": accelerator.num_processes,
        "async_mode": checkpointer.config.async_mode if checkpointer else None,
        "thread_count": checkpointer.config.thread_count if checkpointer else None,
        "keep_last": checkpointer.keep_last if checkpointer else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("phase", choices=["train", "resume"])
    parser.add_argument("--project", required=True)
    parser.add_argument("--epochs", type=int, required=True)
    parser.add_argument("--save-epochs", default="")
    parser.add_argument("--record", required=True)
    parser.add_argument("--load", default=None, help="checkpoint to resume from (default: latest)")
    parser.add_argument("--total-limit", type=int, default=None)
    parser.add_argument("--check-load", default=None)
    parser.add_argument("--check-tag", default="check")
    args = parser.parse_args()

    accelerator = Accelerator(
        cpu=True,
        project_config=ProjectConfiguration(
            project_dir=args.project, automatic_checkpoint_naming=True, total_limit=args.total_limit
        ),
    )
    dcp_plugin.accelerate.enable(accelerator)
    set_seed(1234 + accelerator.process_index)

    def record(tag: str) -> None:
        data = snapshot(accelerator, model, optimizer, scheduler, dataloader)
        torch.save(data, f"{args.record}_{tag}_rank{accelerator.process_index}.pt")

    generator = torch.Generator().manual_seed(0)
    dataset = torch.utils.data.TensorDataset(
        torch.randn(64, 16, generator=generator), torch.randn(64, 8, generator=generator)
    )
    dataloader = torch.utils.data.DataLoader(dataset, batch_size=8, shuffle=True)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=5, gamma=0.7)
    model, optimizer, dataloader, scheduler = accelerator.prepare(model, optimizer, dataloader, scheduler)

    if args.phase == "resume":
        accelerator.load_state(args.load)
        record("loaded")
    save_epochs = {int(e) for e in args.save_epochs.split(",") if e}
    for epoch in range(dataloader.iteration, args.epochs):
        model.train()
        for inputs, targets in dataloader:
            with accelerator.accumulate(model):
                noisy = inputs + 0.01 * torch.randn_like(inputs)  # uses the global RNG every step
                loss = torch.nn.functional.mse_loss(model(noisy), targets)
                accelerator.backward(loss)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
        if epoch + 1 in save_epochs:
            record(f"save{epoch + 1}")
            accelerator.save_state()
    accelerator.wait_for_everyone()
    record("final")
    if args.check_load:
        accelerator.load_state(args.check_load)
        record(args.check_tag)
    # Release the DDP-wrapped model before end_training() destroys the process group. Otherwise DDP's reducer holds
    # the group's last reference, and freeing it (with the GIL held) can deadlock against a gloo worker thread that
    # needs the GIL to free the last finished collective: the process then never exits (torch 2.13, pytorch#56297).
    wrapped = weakref.ref(model)
    model, optimizer = accelerator.free_memory(model, optimizer)
    assert wrapped() is None, "something still holds the prepared model after free_memory()"
    accelerator.end_training()


if __name__ == "__main__":
    main()
