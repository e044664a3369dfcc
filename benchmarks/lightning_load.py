"""Lightning loads: ``DCPCheckpointIO.load_checkpoint`` against ``torch.load`` of the same checkpoint dict.

    python benchmarks/lightning_load.py [--state-mib 256] [--repeats 5]

The dict a Trainer saves (MLP + AdamW state of ``--state-mib`` MiB) is written once with ``torch.save`` (what
Lightning's default CheckpointIO writes) and once with ``DCPCheckpointIO`` (sync). Then, alternating, each is
read back as Lightning reads it (``torch.load(path, map_location="cpu", weights_only=True)`` and
``load_checkpoint(path, weights_only=True)``), from the page cache: the figure is the work a load adds on top of
the disk. dcp-plugin verifies every byte against its checksum on the way.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--state-mib", type=float, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)

    import torch

    from benchmarks import workload
    from benchmarks.contenders import _lightning_checkpoint
    from dcp_plugin.lightning import DCPCheckpointIO

    work = workload.build(int(args.state_mib * 2**20))
    checkpoint = _lightning_checkpoint(work, step=1)
    plugin = DCPCheckpointIO(async_mode="sync")
    times: dict[str, list[float]] = {"torch.load": [], "DCPCheckpointIO.load_checkpoint": []}
    with tempfile.TemporaryDirectory() as directory:
        plain, ours = os.path.join(directory, "plain.ckpt"), os.path.join(directory, "dcp.ckpt")
        torch.save(checkpoint, plain)
        plugin.save_checkpoint(checkpoint, ours)
        loads = {
            "torch.load": lambda: torch.load(plain, map_location="cpu", weights_only=True),
            "DCPCheckpointIO.load_checkpoint": lambda: plugin.load_checkpoint(ours, weights_only=True),
        }
        for load in loads.values():  # warm the page cache and the code paths
            load()
        for rep in range(args.repeats):
            for name in list(loads)[rep % 2 :] + list(loads)[: rep % 2]:
                began = time.perf_counter()
                loaded = loads[name]()
                times[name].append(time.perf_counter() - began)
                del loaded
    base = statistics.median(times["torch.load"])
    print(f"State {work.state_bytes / 2**20:.0f} MiB, {args.repeats} alternating repetitions, from the page cache:")
    for name, values in times.items():
        median = statistics.median(values)
        spread = f"min {min(values):.3f}, max {max(values):.3f}"
        print(f"  {name}: {median:.3f} s ({spread}) = {median / base:.2f}x torch.load")


if __name__ == "__main__":
    main()
