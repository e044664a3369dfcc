"""What a load costs per tensor: the same bytes split into more and more tensors, loaded warm into tensors
allocated beforehand, by ``torch.load`` + ``copy_``, ``dcp.load`` and dcp-plugin, taking turns in one process.

    python -m benchmarks.restore_slope '{"mib": 64, "counts": [64, 1024, 4096], "repeats": 5, "dir": "/tmp/x"}'

Prints one ``RESULT {json}`` line: per tensor count and contender the median wall and CPU seconds, and per
contender the cost of each added tensor (least squares over the counts).
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

CONTENDERS = ("torch.load + copy_", "dcp.load", "dcp-plugin")


def _loads(directory: str, src: dict[str, torch.Tensor]) -> tuple[dict[str, Callable[[], None]], dict[str, Any]]:
    import torch.distributed.checkpoint as dcp

    from dcp_plugin import CheckpointConfig, Checkpointer

    checkpointer = Checkpointer(CheckpointConfig(async_mode="sync"))
    checkpointer.save(os.path.join(directory, "plugin"), {"w": src}, step=1)
    torch.save(src, os.path.join(directory, "torch.pt"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"w": src}, checkpoint_id=os.path.join(directory, "dcp"), no_dist=True)
    dst = {key: torch.empty_like(value) for key, value in src.items()}

    def torch_load() -> None:
        for key, value in torch.load(os.path.join(directory, "torch.pt"), weights_only=True).items():
            dst[key].copy_(value)

    def dcp_load() -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dcp.load({"w": dst}, checkpoint_id=os.path.join(directory, "dcp"), no_dist=True)

    def plugin() -> None:
        checkpointer.load(os.path.join(directory, "plugin"), {"w": dst})

    return {"torch.load + copy_": torch_load, "dcp.load": dcp_load, "dcp-plugin": plugin}, dst


def _slope(counts: list[int], seconds: list[float]) -> float:
    mean_n, mean_s = statistics.fmean(counts), statistics.fmean(seconds)
    spread = sum((n - mean_n) ** 2 for n in counts)
    return sum((n - mean_n) * (s - mean_s) for n, s in zip(counts, seconds)) / spread if spread else 0.0


def measure(mib: float, counts: list[int], repeats: int, directory: str) -> dict[str, Any]:
    rows: dict[str, dict[str, dict[str, float]]] = {}
    for count in counts:
        per = max(1, int(mib * 2**20) // 4 // count)
        src = {f"t{i}": torch.randn(per) for i in range(count)}
        where = tempfile.mkdtemp(dir=directory)
        try:
            loads, dst = _loads(where, src)
            for load in loads.values():  # warm the page cache and the code
                load()
            wall: dict[str, list[float]] = {name: [] for name in loads}
            cpu: dict[str, list[float]] = {name: [] for name in loads}
            exact = dict.fromkeys(loads, True)
            for rep in range(repeats):
                order = list(loads)[rep % len(loads) :] + list(loads)[: rep % len(loads)]
                for name in order:
                    for tensor in dst.values():  # untimed: every load must write every byte itself
                        tensor.fill_(float("nan"))
                    began, began_cpu = time.perf_counter(), time.process_time()
                    loads[name]()
                    wall[name].append(time.perf_counter() - began)
                    cpu[name].append(time.process_time() - began_cpu)
                    exact[name] = exact[name] and all(torch.equal(dst[key], value) for key, value in src.items())
        finally:
            shutil.rmtree(where, ignore_errors=True)
        rows[str(count)] = {
            name: {"wall_s": statistics.median(wall[name]), "cpu_s": statistics.median(cpu[name]), "exact": exact[name]}
            for name in wall
        }
    slopes = {
        name: {kind: _slope(counts, [rows[str(n)][name][kind] for n in counts]) * 1000 for kind in ("wall_s", "cpu_s")}
        for name in CONTENDERS
    }
    return {"mib": mib, "counts": counts, "repeats": repeats, "rows": rows, "ms_per_tensor": slopes}


def main(argv: list[str]) -> int:
    spec = json.loads(argv[0])
    if spec.get("torch_threads"):
        torch.set_num_threads(int(spec["torch_threads"]))
    result = measure(spec["mib"], spec["counts"], spec["repeats"], spec["dir"])
    print("RESULT " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
