"""Full against incremental saves of a LoRA-style fine-tune: bytes written and time to durable per save.

    python benchmarks/incremental.py [--base-mib 512] [--saves 4] [--mode thread]

The model is a stack of frozen ``Linear`` layers (the base, about ``--base-mib`` MiB of float32 weights) with a
rank-8 trainable adapter on each, trained with AdamW between saves. Each save is made through a
``CheckpointManager`` with ``incremental=False`` (full) and with the default ``incremental=True``. Reported per
save: the bytes of the files the save added to the directory, and the time from ``save`` until it was durable
(committed).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import torch


def _files(directory: str) -> dict[str, int]:
    found = {}
    for folder, _, names in os.walk(directory):
        for name in names:
            found[os.path.join(folder, name)] = os.path.getsize(os.path.join(folder, name))
    return found


def run(incremental: bool, base_mib: float, saves: int, mode: str) -> list[dict]:
    from dcp_plugin import CheckpointManager
    from tests.models import LoRALinear

    width, layers = 2048, max(1, round(base_mib * 2**20 / (2048 * 2048 * 4)))
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[LoRALinear(width, 8) for _ in range(layers)])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    rows = []
    with (
        tempfile.TemporaryDirectory() as directory,
        CheckpointManager(directory, async_mode=mode, incremental=incremental) as manager,
    ):
        for step in range(1, saves + 1):
            model(torch.randn(8, width)).pow(2).mean().backward()
            optimizer.step()
            optimizer.zero_grad()
            before = _files(directory)
            began = time.perf_counter()
            manager.save(step, {"model": model, "optim": optimizer})
            manager.wait()
            durable = time.perf_counter() - began
            after = _files(directory)
            written = sum(size for path, size in after.items() if path not in before)
            rows.append({"save": step, "bytes": written, "durable_s": durable})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-mib", type=float, default=512)
    parser.add_argument("--saves", type=int, default=4)
    parser.add_argument("--mode", default="thread", choices=["sync", "thread", "process"])
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    results = {
        kind: run(kind == "incremental", args.base_mib, args.saves, args.mode) for kind in ("full", "incremental")
    }
    if args.json:
        print(json.dumps(results, indent=1))
        return
    print("| save | full: MiB written | full: durable (s) | incremental: MiB written | incremental: durable (s) |")
    print("|---:|---:|---:|---:|---:|")
    for full, inc in zip(results["full"], results["incremental"]):
        print(
            f"| {full['save']} | {full['bytes'] / 2**20:.1f} | {full['durable_s']:.2f} | "
            f"{inc['bytes'] / 2**20:.1f} | {inc['durable_s']:.2f} |"
        )


if __name__ == "__main__":
    main()
