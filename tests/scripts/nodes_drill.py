"""One node of a multi-node drill (launched by tests/nodes.py: ``torchrun --nnodes N --node_rank k ...``).

FSDP2 on gloo, ``CheckpointManager(NODE_DIR, local_scope="node", peer_replicas=1)``. Phases (argv[1]):

* ``train OUT SAVES``: train, saving at the comma-separated steps; report the full state after the last step.
* ``restore OUT``: restore the latest into a fresh model; report the step, the bytes from each place, the full
  state. With ``DRILL_LOSE_COPIES=1`` every node then drops the copies of other nodes' parts it keeps and a manager
  without a remote tier asks for the latest: report the error.
* ``chain OUT STEPS``: restore the latest (if any), let the copies a crash interrupted be made again, report what
  every node lists, then train and save the
  comma-separated steps, each copied to the peer before the next; ``DRILL_CRASH_AT`` becomes
  ``DCP_PLUGIN_CRASH_AT`` for the last save (the crash seam kills this node there).

``DRILL_REMOTE`` / ``DRILL_REMOTE_OPTIONS`` (JSON) add a remote tier; ``DRILL_MODE`` picks the async mode.
Reports go to ``OUT/<phase>_<launch>.pt``, written by every node's process.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import traceback

import torch
import torch.distributed as dist

WIDTH = 64


def build(seed: int):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(seed)
    model = torch.nn.Sequential(*(torch.nn.Linear(WIDTH, WIDTH) for _ in range(4)))
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for layer in model:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    return model, optimizer


def train_step(model, optimizer, step: int) -> None:
    generator = torch.Generator().manual_seed(1000 + step)  # the same batch on every rank and in every run
    loss = model(torch.randn(8, WIDTH, generator=generator)).pow(2).mean()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()


def full_state(model, optimizer):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    model_sd, optim_sd = get_state_dict(
        model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )
    clone = lambda tree: {  # noqa: E731
        k: clone(v) if isinstance(v, dict) else (v.detach().clone() if torch.is_tensor(v) else v)
        for k, v in tree.items()
    }
    return {"model": clone(model_sd), "optim": clone(optim_sd)} if dist.get_rank() == 0 else None


def manager(remote: bool = True):
    from dcp_plugin import CheckpointManager

    options = {"async_mode": os.environ.get("DRILL_MODE", "thread")}
    if remote and os.environ.get("DRILL_REMOTE"):
        options["remote"] = os.environ["DRILL_REMOTE"]
        options["remote_storage_options"] = json.loads(os.environ.get("DRILL_REMOTE_OPTIONS", "{}"))
    return CheckpointManager(os.environ["NODE_DIR"], local_scope="node", peer_replicas=1, **options)


def state_of(model, optimizer):
    from dcp_plugin import ModelState, OptimizerState

    return {"model": ModelState(model), "optim": OptimizerState(model, optimizer), "step": 0}


def listed(m) -> dict:
    """What this node lists on its own disk: its parts and the copies it keeps (by part)."""
    from dcp_plugin.tiers.holdings import replica_parts, replica_storage

    copies = {part: [i.name for i in replica_storage(m.storage, part).list()] for part in replica_parts(m.storage)}
    return {"own": [i.name for i in m.storage.list()], "copies": copies}


def train(out: str, saves: str) -> dict:
    model, optimizer = build(0)
    state = state_of(model, optimizer)
    steps = [int(s) for s in saves.split(",")]
    with manager() as m:
        for step in range(1, max(steps) + 1):
            train_step(model, optimizer, step)
            state["step"] = step
            if step in steps:
                m.save(step, state)
        m.wait()
        names = [i.name for i in m.list()]
    return {"full": full_state(model, optimizer), "list": names}


def restore(out: str) -> dict:
    model, optimizer = build(7)
    state = state_of(model, optimizer)
    with manager() as m:
        info = m.load(state)
        report = {"step": state["step"], "from": dict(info.restored_from), "list": [i.name for i in m.list()]}
        report["listed"] = listed(m)
    report["full"] = full_state(model, optimizer)
    if os.environ.get("DRILL_LOSE_COPIES") == "1":
        shutil.rmtree(os.path.join(os.environ["NODE_DIR"], ".dcp-plugin", "replicas"), ignore_errors=True)
        dist.barrier()
        from dcp_plugin import CheckpointIncompleteError

        with manager(remote=False) as m:
            try:
                m.latest()
                report["error"] = None
            except CheckpointIncompleteError as err:
                report["error"] = str(err)
            try:
                m.load(state_of(*build(8)))
                report["load_error"] = None
            except CheckpointIncompleteError as err:
                report["load_error"] = str(err)
    return report


def chain(out: str, steps: str = "") -> dict:
    model, optimizer = build(3)
    state = state_of(model, optimizer)
    report: dict = {}
    with manager() as m:
        if m.latest() is not None:
            m.load(state)
        m.wait()  # after the restore: copies a crash interrupted are made again
        m.nodes.peers.wait()
        report.update(step=state["step"], list=[i.name for i in m.list()], listed=listed(m))
        report["full"] = full_state(model, optimizer)
        _report(out, "chain", report)  # before the saves, which may be killed
        saves = [int(step) for step in steps.split(",") if step]
        for number, step in enumerate(saves):
            train_step(model, optimizer, step)
            state["step"] = step
            reference = full_state(model, optimizer)
            if reference is not None:
                torch.save(reference, os.path.join(out, f"reference_{step}.pt"))
            if number == len(saves) - 1 and os.environ.get("DRILL_CRASH_AT"):
                os.environ["DCP_PLUGIN_CRASH_AT"] = os.environ["DRILL_CRASH_AT"]  # the last save is killed there
            m.save(step, state)
            m.wait()
            m.nodes.peers.wait()
    return report


def _report(out: str, phase: str, report: dict) -> None:
    report = {**report, "rank": dist.get_rank(), "group_rank": os.environ.get("GROUP_RANK")}
    torch.save(report, os.path.join(out, f"{phase}_{os.environ['NODE_LAUNCH']}.pt"))


def main() -> None:
    phase, out = sys.argv[1], sys.argv[2]
    os.environ["DCP_PLUGIN_CRASH_GROUP"] = str(os.getpgid(0))  # a crash point takes this node's whole process group
    dist.init_process_group("gloo")
    code = 0
    try:
        report = {"train": train, "restore": restore, "chain": chain}[phase](out, *sys.argv[3:])
        _report(out, phase, report)
    except BaseException:
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # no teardown: a peer killed mid-collective must not leave this process hanging


if __name__ == "__main__":
    main()
