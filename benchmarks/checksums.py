"""What integrity costs: checksums while saving and verification while loading, against plain DCP.

Run: ``python benchmarks/checksums.py [--gib 1] [--repeats 5]``. Each repetition saves the same state with
DCP's own ``FileSystemWriter`` and with dcp-plugin's writer (xxh3-128 of every byte as it is written, plus the
manifest and the rename commit), synchronously and fsynced, then loads it back with DCP's ``FileSystemReader``
and with dcp-plugin's reader (checksums of every file verified before DCP reads it), once from the page cache
and once after evicting the files. Medians are printed as ratios (dcp-plugin / plain DCP), as JSON too.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.distributed.checkpoint as dcp  # noqa: E402
import xxhash  # noqa: E402
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter  # noqa: E402

from benchmarks.diskio import evict  # noqa: E402
from dcp_plugin.storage import CheckpointStorage  # noqa: E402

WRITER_OPTIONS = dict(thread_count=2, sync_files=True, per_thread_copy_ahead=10_000_000)


def make_state(gib: float) -> dict[str, torch.Tensor]:
    tensors = 32
    numel = int(gib * 2**30 / 4 / tensors)
    generator = torch.Generator().manual_seed(0)
    return {f"layer{i}.weight": torch.randn(numel, generator=generator) for i in range(tensors)}


def timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def hash_cost(state: dict[str, torch.Tensor]) -> float:
    """Seconds xxh3-128 takes over every byte of the state in memory: the noise-free part of the checksum cost."""
    hasher = xxhash.xxh3_128()
    started = time.perf_counter()
    for tensor in state.values():
        hasher.update(tensor.numpy().data)
    return time.perf_counter() - started


def one_round(state: dict[str, torch.Tensor], work: str, round_no: int) -> dict[str, float]:
    plain_dir = os.path.join(work, f"plain-{round_no}")
    storage = CheckpointStorage(os.path.join(work, f"ours-{round_no}"))
    name = "step_000000001"

    def save_plain() -> None:
        dcp.save(state, storage_writer=FileSystemWriter(plain_dir, single_file_per_rank=True, **WRITER_OPTIONS))

    def save_ours() -> None:
        pending = storage.begin_write(name)
        pending.manifest = {"step": 1, "created": time.time(), "save_id": f"r{round_no}", "world_size": 1}
        dcp.save(state, storage_writer=storage.writer(pending, **WRITER_OPTIONS))

    # alternate which goes first, so neither always meets a disk still busy writing back the other
    if round_no % 2:
        out = {"save_ours_s": timed(save_ours), "save_plain_s": timed(save_plain)}
    else:
        out = {"save_plain_s": timed(save_plain), "save_ours_s": timed(save_ours)}
    target = {k: torch.empty_like(v) for k, v in state.items()}
    ours = storage.info(name)
    loads = {
        "plain": lambda: dcp.load(target, storage_reader=FileSystemReader(plain_dir)),
        "ours": lambda: dcp.load(target, storage_reader=storage.metadata_reader(name)),
    }
    order = ["ours", "plain"] if round_no % 2 else ["plain", "ours"]
    for cache in ("warm", "cold"):
        for who in order:
            if cache == "cold":
                evict(plain_dir if who == "plain" else ours.url)
            out[f"load_{who}_{cache}_s"] = timed(loads[who])
    assert all(torch.equal(target[k], state[k]) for k in state)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    state = make_state(args.gib)
    rounds = []
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR")) as work:
        for round_no in range(args.repeats):
            rounds.append(one_round(state, work, round_no))
    medians = {key: statistics.median(r[key] for r in rounds) for key in rounds[0]}
    medians["hash_only_s"] = hash_cost(state)
    ratios = {
        "save (time to durable)": medians["save_ours_s"] / medians["save_plain_s"],
        "load from page cache": medians["load_ours_warm_s"] / medians["load_plain_warm_s"],
        "load after eviction": medians["load_ours_cold_s"] / medians["load_plain_cold_s"],
        "hashing alone / plain save": medians["hash_only_s"] / medians["save_plain_s"] + 1,
    }
    print(f"{args.gib:g} GiB, {args.repeats} repetitions, medians (seconds): {json.dumps(medians, indent=1)}")
    for label, ratio in ratios.items():
        print(f"  dcp-plugin / plain DCP, {label}: {ratio:.3f} ({(ratio - 1) * 100:+.1f} %)")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(
                {"gib": args.gib, "repeats": args.repeats, "medians": medians, "ratios": ratios}, handle, indent=1
            )


if __name__ == "__main__":
    main()
