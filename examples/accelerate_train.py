"""Train with Hugging Face Accelerate, checkpointing through dcp-plugin (asynchronous DCP saves).

    python examples/accelerate_train.py --epochs 3
    torchrun --nproc-per-node 2 examples/accelerate_train.py --epochs 3
    accelerate launch --num_processes 2 examples/accelerate_train.py --epochs 3

    # choose the mode and retention without touching the code; every rank sees the variables
    DCP_PLUGIN_ASYNC_MODE=process DCP_PLUGIN_KEEP_LAST=2 \
        torchrun --nproc-per-node 2 examples/accelerate_train.py
    # or go back to Accelerate's own checkpoints
    DCP_PLUGIN_ENABLE=0 python examples/accelerate_train.py

Run it again with more epochs and it resumes from the latest committed checkpoint. The
``if __name__ == "__main__":`` guard is required for ``DCP_PLUGIN_ASYNC_MODE=process``.
"""

from __future__ import annotations

import argparse

import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, set_seed

import dcp_plugin.accelerate


def main() -> None:
    parser = argparse.ArgumentParser(description="Accelerate training with dcp-plugin checkpoints.")
    parser.add_argument("--project-dir", default="runs/accelerate_example")
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()

    accelerator = Accelerator(
        project_config=ProjectConfiguration(
            project_dir=args.project_dir, automatic_checkpoint_naming=True, total_limit=3
        )
    )
    # The one line: save_state/load_state now go through DCP. Options come from DCP_PLUGIN_* variables.
    checkpointer = dcp_plugin.accelerate.enable(accelerator)
    set_seed(0)

    inputs = torch.randn(256, 32)
    targets = inputs @ torch.randn(32, 4) + 0.1 * torch.randn(256, 4)
    dataset = torch.utils.data.TensorDataset(inputs, targets)
    dataloader = torch.utils.data.DataLoader(dataset, batch_size=16, shuffle=True)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 4))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.epochs * len(dataloader))
    model, optimizer, dataloader, scheduler = accelerator.prepare(model, optimizer, dataloader, scheduler)

    if checkpointer is not None and checkpointer.latest() is not None:
        info = accelerator.load_state()  # the latest committed checkpoint, loaded in place
        accelerator.print(f"resumed from {info.name} at epoch {dataloader.iteration}")

    for epoch in range(dataloader.iteration, args.epochs):
        total = 0.0
        for batch_inputs, batch_targets in dataloader:
            with accelerator.accumulate(model):
                loss = torch.nn.functional.mse_loss(model(batch_inputs), batch_targets)
                accelerator.backward(loss)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            total += loss.item()
        location = accelerator.save_state()  # returns once the snapshot is taken; written in the background
        accelerator.print(f"epoch {epoch + 1}: loss {total / len(dataloader):.4f}, saving {location}")

    # Let go of the prepared model before end_training() destroys the process group: on CPU (gloo) with several
    # processes, freeing it afterwards can hang the process at exit (docs/troubleshooting.md).
    model, optimizer = accelerator.free_memory(model, optimizer)
    accelerator.end_training()  # commits the last checkpoint and stops the writer
    if checkpointer is not None:
        for stats in checkpointer.engine.drain_completed():
            accelerator.print(stats.summary())


if __name__ == "__main__":
    main()
