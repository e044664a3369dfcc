"""Accelerate's mid-epoch resume recipe, run with ``accelerate launch`` on several processes.

    mid_epoch_script.py train  --out PREFIX --save-dir DIR --save-at EPOCH:BATCH[,EPOCH:BATCH...] [--oracle-dir DIR]
    mid_epoch_script.py resume --out PREFIX --load CHECKPOINT --epoch EPOCH --skip BATCHES
    mid_epoch_script.py resume --out PREFIX --load CHECKPOINT --step STEP

``train`` runs 3 epochs without interruption and calls ``save_state(<DIR>/e<EPOCH>_b<BATCH>)`` right after
batch BATCH (1-based) of epoch EPOCH; with ``--oracle-dir``, Accelerate's own ``save_state`` also writes the
same state there. ``resume`` builds everything afresh, calls ``load_state`` and then
``skip_first_batches(dataloader, BATCHES)`` for the rest of epoch EPOCH, then trains on to the end. With
``--step`` (the number of batches trained before the save) it resumes as Accelerate's checkpointing example does:
``starting_epoch = step // len(dataloader)`` and ``skip_first_batches(dataloader, step - starting_epoch *
len(dataloader))`` for that epoch, even when that is 0 (a save on an epoch's last batch).
Both write ``<PREFIX>_rank<r>.pt``: every batch seen (epoch, index in the epoch, inputs, loss) and the final
state. dcp-plugin is on unless ``DCP_PLUGIN_ENABLE=0`` (Accelerate's own ``save_state``, the oracle).
"""

from __future__ import annotations

import argparse
import weakref

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

import dcp_plugin.accelerate

EPOCHS = 3


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("phase", choices=["train", "resume"])
    parser.add_argument("--out", required=True)
    parser.add_argument("--save-dir", default=None)
    parser.add_argument("--save-at", default="")
    parser.add_argument("--oracle-dir", default=None)
    parser.add_argument("--load", default=None)
    parser.add_argument("--epoch", type=int, default=0)
    parser.add_argument("--skip", type=int, default=0)
    parser.add_argument("--step", type=int, default=None)
    args = parser.parse_args()

    accelerator = Accelerator(cpu=True)
    dcp_plugin.accelerate.enable(accelerator)  # a no-op with DCP_PLUGIN_ENABLE=0
    set_seed(1234)  # the same on every rank: Accelerate seeds the shuffling generator from it in prepare()

    generator = torch.Generator().manual_seed(0)
    dataset = torch.utils.data.TensorDataset(
        torch.randn(64, 16, generator=generator), torch.randn(64, 8, generator=generator)
    )
    dataloader = torch.utils.data.DataLoader(dataset, batch_size=4, shuffle=True)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model, optimizer, dataloader = accelerator.prepare(model, optimizer, dataloader)

    seen: list[tuple[int, int, torch.Tensor, float]] = []
    save_at = {tuple(int(x) for x in point.split(":")) for point in args.save_at.split(",") if point}
    first_epoch, skip_at_start = 0, 0
    if args.phase == "resume":
        accelerator.load_state(args.load)
        first_epoch, skip_at_start = args.epoch, args.skip
        if args.step is not None:  # Accelerate's examples/by_feature/checkpointing.py
            first_epoch = args.step // len(dataloader)
            skip_at_start = args.step - first_epoch * len(dataloader)
    for epoch in range(first_epoch, EPOCHS):
        skip = skip_at_start if args.phase == "resume" and epoch == first_epoch else 0
        example = args.step is not None and epoch == first_epoch
        batches = accelerator.skip_first_batches(dataloader, skip) if skip or example else dataloader
        for index, (inputs, targets) in enumerate(batches, start=skip + 1):
            loss = torch.nn.functional.mse_loss(model(inputs), targets)
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
            seen.append((epoch, index, inputs.clone(), loss.item()))
            if (epoch, index) in save_at:
                accelerator.save_state(f"{args.save_dir}/e{epoch}_b{index}")
                if args.oracle_dir:  # Accelerate's own method, bypassing dcp-plugin's
                    Accelerator.save_state(accelerator, f"{args.oracle_dir}/e{epoch}_b{index}")
    accelerator.wait_for_everyone()
    weights = {k: v.detach().clone() for k, v in accelerator.unwrap_model(model).state_dict().items()}
    torch.save({"seen": seen, "model": weights}, f"{args.out}_rank{accelerator.process_index}.pt")
    # Release the DDP-wrapped model before end_training() destroys the process group. Otherwise DDP's reducer holds
    # the group's last reference, and freeing it (with the GIL held) can deadlock against a gloo worker thread that
    # needs the GIL to free the last finished collective: the process then never exits (torch 2.13, pytorch#56297).
    wrapped = weakref.ref(model)
    model, optimizer = accelerator.free_memory(model, optimizer)
    assert wrapped() is None, "something still holds the prepared model after free_memory()"
    accelerator.end_training()


if __name__ == "__main__":
    main()
