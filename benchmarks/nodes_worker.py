"""One node of the multi-node benchmark (``torchrun --nnodes 2 ...``; see benchmarks/nodes.py).

Usage: ``python -m benchmarks.nodes_worker SPEC_JSON`` with ``NODE_DIR`` (this node's disk) and ``NODE_OUT``
(where it reports) set. FSDP2 over the MLP + AdamW of :mod:`benchmarks.workload` (``state_bytes`` over all ranks).

* ``save``: one checkpoint of the trained state with peer copies (and the remote tier, when given).
* ``restore``: restore into a fresh model, timed to the end of the load and of the first training step after it.
* ``goodput``: the loop of ``steps`` steps without checkpoints and with a save every ``every`` steps for each
  ``peer_replicas`` value, in the order given, each into a fresh directory; the loop's wall time of each.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from typing import Any

import torch
import torch.distributed as dist


def build(state_bytes: int, seed: int = 0):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from benchmarks import workload

    torch.manual_seed(seed)
    width, layers = workload.layout(state_bytes)
    model = torch.nn.Sequential(*(torch.nn.Linear(width, width) for _ in range(layers)))
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for layer in model:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    return model, optimizer, width


def step(model, optimizer, width: int) -> None:
    loss = model(torch.randn(8, width)).pow(2).mean()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def manager(directory: str, spec: dict[str, Any], replicas: int):
    from dcp_plugin import CheckpointManager

    options: dict[str, Any] = {"async_mode": spec.get("mode", "thread"), "peer_replicas": replicas}
    if spec.get("remote"):
        options.update(remote=spec["remote"], remote_storage_options=spec["remote_options"])
    return CheckpointManager(directory, local_scope="node", **options)


def state_of(model, optimizer) -> dict[str, Any]:
    from dcp_plugin import ModelState, OptimizerState

    return {"model": ModelState(model), "optim": OptimizerState(model, optimizer), "step": 0}


def save(spec: dict[str, Any]) -> dict[str, Any]:
    model, optimizer, width = build(spec["state_bytes"])
    step(model, optimizer, width)
    with manager(os.environ["NODE_DIR"], spec, 1) as m:
        m.save(1, state_of(model, optimizer))
    return {}


def restore(spec: dict[str, Any]) -> dict[str, Any]:
    model, optimizer, width = build(spec["state_bytes"], seed=1)
    step(model, optimizer, width)  # the optimizer's state exists, as in a resumed run
    with manager(os.environ["NODE_DIR"], spec, 1) as m:
        dist.barrier()
        began = time.perf_counter()
        info = m.load(state_of(model, optimizer))
        loaded = time.perf_counter()
        step(model, optimizer, width)
        stepped = time.perf_counter()
    return {
        "seconds": loaded - began,
        "to_step_s": stepped - began,
        "from": dict(info.restored_from),
        "bytes": sum(record["size"] for record in info.manifest["files"].values()),
    }


def goodput(spec: dict[str, Any]) -> dict[str, Any]:
    model, optimizer, width = build(spec["state_bytes"])
    for _ in range(2):
        step(model, optimizer, width)
    state = state_of(model, optimizer)
    out: dict[str, Any] = {}
    for contender in spec["order"]:
        directory = os.path.join(os.environ["NODE_DIR"], f"run-{contender}")
        m = None if contender == "none" else manager(directory, spec, int(contender))
        if m is not None:  # warm-up save: staging buffers, plans
            m.save(0, state)
            m.wait()
            if m.nodes is not None and m.nodes.peers is not None:
                m.nodes.peers.wait()
        dist.barrier()
        began = time.perf_counter()
        for number in range(1, spec["steps"] + 1):
            step(model, optimizer, width)
            if m is not None and number % spec["every"] == 0:
                m.save(number, state)
        dist.barrier()
        train_s = time.perf_counter() - began
        drained = time.perf_counter()
        if m is not None:
            m.close()
        out[contender] = {"train_s": train_s, "drain_s": time.perf_counter() - drained}
        shutil.rmtree(directory, ignore_errors=True)
    return out


def main() -> None:
    spec = json.loads(sys.argv[1])
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    report = {"save": save, "restore": restore, "goodput": goodput}[spec["phase"]](spec)
    report["rank"] = dist.get_rank()
    with open(os.path.join(os.environ["NODE_OUT"], f"{spec['phase']}_{os.environ['NODE_LAUNCH']}.json"), "w") as f:
        json.dump(report, f)
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
