"""One restore, timed in a fresh process: ``python -m benchmarks.restore_worker '<json spec>'`` prints one JSON line.

The spec names a workload (``large``: an MLP of a few large fp32 layers; ``small``: many small experts, so many
small tensors), a contender, ``cold`` or ``warm``, and where the checkpoints are. The fresh model and optimizer are
built before the clock starts (the same for every contender); the clock runs from the load call to the end of the
first training step after it, so a lazy load (``torch.load(mmap=True)``) pays its reads inside the step. Cold: the
checkpoint's files are fsynced and dropped from the page cache first (``posix_fadvise(DONTNEED)``, no privileges
needed); warm: they are read once first. After the clock stops, the model's and optimizer's bytes are hashed:
every contender of a workload must end its first step with the same bytes (see ``benchmarks/restore.py``).
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import xxhash  # noqa: E402

from benchmarks import diskio, workload  # noqa: E402

BATCH = 8


class Experts(torch.nn.Module):
    """``count`` small Linear layers all applied to the input: many small tensors, every one used by each step."""

    def __init__(self, count: int, width: int) -> None:
        super().__init__()
        self.experts = torch.nn.ModuleList(torch.nn.Linear(width, width) for _ in range(count))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([expert(x) for expert in self.experts]).sum(0)


def build(spec: dict[str, Any]) -> tuple[torch.nn.Module, torch.optim.Optimizer, int]:
    """A fresh model and optimizer (no state yet) for the spec's workload, and its input width."""
    torch.manual_seed(7)
    if spec["workload"] == "small":
        width = spec["width"]
        model: torch.nn.Module = Experts(spec["experts"], width)
    else:
        width, layers = workload.layout(spec["state_bytes"])
        blocks: list[torch.nn.Module] = []
        for i in range(layers):
            blocks.append(torch.nn.Linear(width, width))
            if i < layers - 1:
                blocks.append(torch.nn.ReLU())
        model = torch.nn.Sequential(*blocks)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-4), width


def batch(width: int, seed: int = 11) -> torch.Tensor:
    return torch.randn(BATCH, width, generator=torch.Generator().manual_seed(seed))


def loss_of(model: torch.nn.Module, data: torch.Tensor) -> torch.Tensor:
    return model(data).pow(2).mean()


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, data: torch.Tensor) -> None:
    loss_of(model, data).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def digest(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> str:
    """xxh3-128 of every parameter and every optimizer state value, in parameter order."""
    hasher = xxhash.xxh3_128()
    for param in model.parameters():
        hasher.update(param.detach().contiguous().view(torch.uint8).reshape(-1).numpy())
        state = optimizer.state.get(param, {})
        for key in sorted(state):
            value = state[key]
            if torch.is_tensor(value):
                hasher.update(value.detach().contiguous().reshape(-1).view(torch.uint8).numpy())
            else:
                hasher.update(repr(value).encode())
    return hasher.hexdigest()


# -- contenders: each returns (seconds to the end of the load, seconds to the end of the first step, digest) ----


def _plain(load: Callable[[torch.nn.Module, torch.optim.Optimizer], None]) -> Callable[..., Any]:
    def run(spec: dict[str, Any]) -> tuple[float, float, str]:
        model, optimizer, width = build(spec)
        data = batch(width)
        _prepare_files(spec, spec["path"])
        started = time.perf_counter()
        load(model, optimizer)
        loaded = time.perf_counter()
        train_step(model, optimizer, data)
        done = time.perf_counter()
        return loaded - started, done - started, digest(model, optimizer)

    return run


def _torch_load(spec: dict[str, Any], mmap: bool) -> Callable[[Any, Any], None]:
    def load(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        saved = torch.load(spec["path"], map_location="cpu", weights_only=True, mmap=mmap)
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optim"])

    return load


def _dcp_load(spec: dict[str, Any]) -> Callable[[Any, Any], None]:
    def load(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        model_state, optim_state = get_state_dict(model, optimizer)
        state = {"model": model_state, "optim": optim_state}
        dcp.load(state, checkpoint_id=spec["path"], no_dist=True)
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])

    return load


def _plugin(spec: dict[str, Any]) -> Callable[[Any, Any], None]:
    def load(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        from dcp_plugin import CheckpointManager

        manager = CheckpointManager(spec["path"], async_mode="sync")
        manager.load({"model": model, "optim": optimizer})
        manager.close()

    return load


def _raw_read(spec: dict[str, Any]) -> tuple[float, float, str]:
    """Every byte of the dcp-plugin checkpoint read into one buffer allocated beforehand: the floor of a load."""
    files = sorted(diskio.files_under(spec["path"]))
    buffer = bytearray(sum(os.path.getsize(name) for name in files))
    view = memoryview(buffer)
    _prepare_files(spec, spec["path"])
    started = time.perf_counter()
    position = 0
    for name in files:
        with open(name, "rb", buffering=0) as handle:
            while True:
                count = handle.readinto(view[position : position + diskio.CHUNK])
                if not count:
                    break
                position += count
    elapsed = time.perf_counter() - started
    return elapsed, elapsed, ""


def _lightning(spec: dict[str, Any]) -> tuple[float, float, str]:
    from benchmarks.restore_frameworks import lightning_resume

    model, optimizer, width = build(spec)
    del optimizer  # Lightning makes its own in configure_optimizers
    return lightning_resume(spec, model, batch(width), _prepare_files, digest)


def _accelerate(spec: dict[str, Any]) -> tuple[float, float, str]:
    from benchmarks.restore_frameworks import accelerate_resume

    model, optimizer, width = build(spec)
    return accelerate_resume(spec, model, optimizer, batch(width), _prepare_files, digest, train_step)


def _prepare_files(spec: dict[str, Any], path: str) -> None:
    """Cold: make the files durable and drop them from the page cache; warm: read them all once."""
    if spec["mode"] == "cold":
        diskio.evict(path)
        return
    for name in diskio.files_under(path):
        with open(name, "rb", buffering=0) as handle:
            while handle.read(diskio.CHUNK):
                pass


CONTENDERS: dict[str, Callable[[dict[str, Any]], tuple[float, float, str]]] = {
    "raw read": _raw_read,
    "torch.load": lambda spec: _plain(_torch_load(spec, mmap=False))(spec),
    "torch.load mmap": lambda spec: _plain(_torch_load(spec, mmap=True))(spec),
    "dcp.load": lambda spec: _plain(_dcp_load(spec))(spec),
    "dcp-plugin": lambda spec: _plain(_plugin(spec))(spec),
    "Lightning default": _lightning,
    "Lightning dcp-plugin": _lightning,
    "Accelerate default": _accelerate,
    "Accelerate dcp-plugin": _accelerate,
}


def _import_libraries() -> None:
    """Import what any contender loads with before any clock runs: a restarting job has imported its libraries
    before it restores, and every contender should pay the same outside the timings."""
    import torch.distributed.checkpoint  # noqa: F401
    import torch.distributed.checkpoint.state_dict  # noqa: F401

    import dcp_plugin  # noqa: F401
    import dcp_plugin.checkpointer  # noqa: F401
    import dcp_plugin.manager  # noqa: F401


def main(argv: list[str]) -> int:
    spec = json.loads(argv[0])
    if spec.get("torch_threads"):
        torch.set_num_threads(int(spec["torch_threads"]))
    _import_libraries()
    began_cpu = time.process_time()
    try:
        load_s, restore_s, state = CONTENDERS[spec["contender"]](spec)
        result = {"ok": True, "load_s": load_s, "restore_s": restore_s, "digest": state}
    except Exception as err:  # noqa: BLE001 - reported to the driver, which goes on with the others
        result = {"ok": False, "error": f"{type(err).__name__}: {err}"}
    result["process_cpu_s"] = time.process_time() - began_cpu
    print("RESULT " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
