"""Save a LoRA-style model while the kernel fills a frozen weight through an io_uring fixed buffer registered
before the first save: ``pinned_writes.py DIR``. Writes DIR/step_000000003 and DIR/live.pt (the weight's bytes at
that save)."""

import os
import sys

import torch

from dcp_plugin import CheckpointManager, ModelState
from tests.kernel_writes import FixedBuffer
from tests.models import make_lora

if __name__ == "__main__":
    directory = sys.argv[1]
    model = make_lora()
    weight = model[1].base.weight
    buffer = FixedBuffer(weight)
    with CheckpointManager(directory, async_mode="sync") as manager:
        manager.save(1, {"model": ModelState(model)})
        manager.save(2, {"model": ModelState(model)})
        before = weight.detach().clone()
        buffer.read_into(4096 * 4, b"\x05" * 8192)
        assert not torch.equal(weight, before), "the kernel did not fill the buffer"
        manager.save(3, {"model": ModelState(model)})
        torch.save(weight.detach().clone(), os.path.join(directory, "live.pt"))
    buffer.close()
