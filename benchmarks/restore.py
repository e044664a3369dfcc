"""Restore: how long a run waits to be training again, from its checkpoint to the end of the first step.

    python benchmarks/restore.py                  # 400 MiB MLP + AdamW and 2,048 small experts; cold and warm
    python benchmarks/restore.py --quick          # small sizes, one repetition: a few minutes

Two workloads, each a model and its AdamW state as a training run saves them: ``large`` (an MLP of a few large
fp32 layers, ``--large-mib``) and ``small`` (``--experts`` Linear layers of ``--width``, all used by every step:
many small tensors, as in a mixture of experts). For each, the same state is saved once per format: a
``torch.save`` file, a plain ``dcp.save`` directory, a dcp-plugin checkpoint, a Lightning checkpoint with
Lightning's default plugin and with ``DCPCheckpointIO``, an Accelerate ``save_state`` with Accelerate's own format
and with dcp-plugin.

Every (contender, mode, repetition) then runs in a fresh process (``benchmarks/restore_worker.py``): a fresh model
and optimizer, the checkpoint's pages dropped from the cache (``cold``: fsync + ``posix_fadvise(DONTNEED)`` per
file) or read once (``warm``), then the clock runs from the load until the end of the first training step after
it, so that a lazy load (``torch.load(mmap=True)``) pays its reads where the training does. The contenders take
turns. ``raw read`` reads every byte of the dcp-plugin checkpoint into one buffer: the floor under any load.
Bit for bit: after its first step, every plain contender's model and optimizer must hold exactly the bytes the
same step gives from the saved state in memory; the Lightning and Accelerate runs with dcp-plugin must hold
exactly what their framework's default plugin gives.

Also measured (``benchmarks/restore_slope.py``): the cost of each added tensor of a warm load into tensors
allocated beforehand, ``--slope-mib`` split into ``--slope-counts`` tensors.

Writes ``<out>.json`` (settings, machine, every run, the summary) and ``<out>.md``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import warnings
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import machine  # noqa: E402

PLAIN = ["raw read", "torch.load", "torch.load mmap", "dcp.load", "dcp-plugin"]
LIGHTNING = ["Lightning default", "Lightning dcp-plugin"]
ACCELERATE = ["Accelerate default", "Accelerate dcp-plugin"]
ALL = PLAIN + LIGHTNING + ACCELERATE
BASELINES = {"dcp-plugin": "torch.load", "Lightning dcp-plugin": "Lightning default", "Accelerate dcp-plugin":
             "Accelerate default", "dcp.load": "torch.load", "torch.load mmap": "torch.load"}  # fmt: skip
"""Each contender's ratio is taken against this one, in the same workload and mode."""


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes, one repetition (a few minutes)")
    parser.add_argument("--large-mib", type=float, default=400.0, help="state of the large workload")
    parser.add_argument("--experts", type=int, default=2048, help="experts of the small workload")
    parser.add_argument("--width", type=int, default=32, help="width of each expert")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--modes", nargs="+", default=["cold", "warm"], choices=["cold", "warm"])
    parser.add_argument("--workloads", nargs="+", default=["large", "small"], choices=["large", "small"])
    parser.add_argument("--contender", action="append", choices=ALL, help="only these (repeatable)")
    parser.add_argument("--slope-mib", type=float, default=64.0)
    parser.add_argument("--slope-counts", type=int, nargs="+", default=[64, 1024, 4096])
    parser.add_argument("--slope-repeats", type=int, default=5)
    parser.add_argument("--no-slope", action="store_true")
    parser.add_argument(
        "--torch-threads",
        type=int,
        default=None,
        help="torch's intra-op threads in every worker (default: torch's own; 1 steadies timings on a shared host)",
    )
    parser.add_argument("--dir", default=None, help="where checkpoints go (default: a temporary directory)")
    parser.add_argument("--out", default="benchmarks/results/restore")
    args = parser.parse_args(argv)
    if args.quick:
        args.large_mib, args.experts, args.repeats = min(args.large_mib, 64.0), min(args.experts, 512), 1
        args.slope_mib, args.slope_counts, args.slope_repeats = 16.0, [64, 1024], 3
    args.contenders = args.contender or ALL
    return args


def _specs(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    return {
        "large": {"workload": "large", "state_bytes": int(args.large_mib * 2**20)},
        "small": {"workload": "small", "experts": args.experts, "width": args.width},
    }


def prepare(spec: dict[str, Any], directory: str, contenders: list[str]) -> dict[str, Any]:
    """Save the workload's state in every format the contenders read; the digest the plain contenders must reach."""
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    from benchmarks import restore_frameworks as frameworks
    from benchmarks import restore_worker as worker
    from dcp_plugin import CheckpointManager

    os.makedirs(directory, exist_ok=True)
    model, optimizer, width = worker.build(spec)
    worker.train_step(model, optimizer, worker.batch(width, seed=3))
    paths = {name: os.path.join(directory, name.replace(" ", "_")) for name in ("torch", "dcp", "plugin")}
    torch.save({"model": model.state_dict(), "optim": optimizer.state_dict()}, paths["torch"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model_state, optim_state = get_state_dict(model, optimizer)
        dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=paths["dcp"], no_dist=True)
    manager = CheckpointManager(paths["plugin"], async_mode="sync")
    manager.save(1, {"model": model, "optim": optimizer})
    manager.close()
    twin_model, twin_optimizer = copy.deepcopy((model, optimizer))
    worker.train_step(twin_model, twin_optimizer, worker.batch(width))
    reference = worker.digest(twin_model, twin_optimizer)
    out = {"paths": {}, "reference": reference, "state_bytes": _state_bytes(model, optimizer)}
    for name in contenders:
        out["paths"][name] = {
            "torch.load": paths["torch"],
            "torch.load mmap": paths["torch"],
            "dcp.load": paths["dcp"],
            "dcp-plugin": paths["plugin"],
            "raw read": paths["plugin"],
        }.get(name)
    for name, ours in (("Lightning default", False), ("Lightning dcp-plugin", True)):
        if name in contenders:
            path = os.path.join(directory, "lightning_ours" if ours else "lightning.ckpt")
            fresh, _optimizer, _width = worker.build(spec)
            frameworks.lightning_checkpoint(fresh, worker.batch(width, seed=3), path, ours=ours)
            out["paths"][name] = path
    for name, ours in (("Accelerate default", False), ("Accelerate dcp-plugin", True)):
        if name in contenders:
            path = os.path.join(directory, "accelerate_ours" if ours else "accelerate")
            fresh, fresh_optimizer, _width = worker.build(spec)
            frameworks.accelerate_checkpoint(fresh, fresh_optimizer, worker.batch(width, seed=3), path, ours=ours)
            out["paths"][name] = path
    return out


def _state_bytes(model: Any, optimizer: Any) -> int:
    import torch

    total = sum(p.numel() * p.element_size() for p in model.parameters())
    for state in optimizer.state.values():
        total += sum(v.numel() * v.element_size() for v in state.values() if torch.is_tensor(v))
    return total


def run_worker(module: str, spec: dict[str, Any], timeout: float = 1800) -> dict[str, Any]:
    command = [sys.executable, "-m", module, json.dumps(spec)]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run(command, cwd=root, capture_output=True, text=True, timeout=timeout)
    for line in done.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    return {"ok": False, "error": f"exit {done.returncode}: {done.stderr.strip().splitlines()[-1:]}"}


def _group_reference(name: str, workload: str, mode: str, runs: list[dict[str, Any]], prepared: Any) -> str | None:
    """The digest a run must reach: the in-memory reference for plain contenders, the framework's default's
    (same workload, mode and repetition) for the framework contenders."""
    if name in PLAIN:
        return None if name == "raw read" else prepared[workload]["reference"]
    oracle = name.replace("dcp-plugin", "default")
    digests = [r["digest"] for r in runs if r["contender"] == oracle and r["workload"] == workload and r.get("ok")]
    return digests[0] if digests else None


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for run in runs:
        key = summary.setdefault(run["workload"], {}).setdefault(run["mode"], {})
        entry = key.setdefault(run["contender"], {"restore": [], "load": [], "cpu": [], "exact": True, "errors": []})
        if run.get("ok"):
            entry["restore"].append(run["restore_s"])
            entry["load"].append(run["load_s"])
            entry["cpu"].append(run["process_cpu_s"])
            entry["exact"] = entry["exact"] and run.get("exact", True)
        else:
            entry["errors"].append(run.get("error"))
    for modes in summary.values():
        for contenders in modes.values():
            for name, entry in contenders.items():
                med = {k: statistics.median(entry[k]) if entry[k] else None for k in ("restore", "load", "cpu")}
                contenders[name] = {
                    "restore_s": med["restore"],
                    "load_s": med["load"],
                    "process_cpu_s": med["cpu"],
                    "runs": len(entry["restore"]),
                    "exact": entry["exact"] and not entry["errors"],
                    "errors": entry["errors"],
                }
            for name, entry in contenders.items():
                base = contenders.get(BASELINES.get(name, ""), {}).get("restore_s")
                if base and entry["restore_s"]:
                    entry["vs"] = {"baseline": BASELINES[name], "ratio": entry["restore_s"] / base}
    return summary


def _markdown(result: dict[str, Any]) -> str:
    lines = ["# Restore to the end of the first training step", ""]
    machine_info = result.get("machine", {})
    loads = [machine_info.get(k) for k in ("load_average_start", "load_average_end")]
    if all(loads):
        shown = " → ".join("/".join(f"{x:.1f}" for x in load) for load in loads)
        lines += [f"Load average (1/5/15 min) at start → end: {shown}; torch threads: "
                  f"{result['settings'].get('torch_threads') or 'default'}.", ""]  # fmt: skip
    for workload, modes in result["summary"].items():
        prepared = result["workloads"][workload]
        lines += [f"## {workload}: {prepared['state_bytes'] / 2**20:.0f} MiB, {prepared['tensors']} tensors", ""]
        lines += [
            "| contender | mode | restore | load | process CPU | ratio | exact |",
            "|---|---|---:|---:|---:|---|---|",
        ]
        for mode, contenders in modes.items():
            for name, entry in contenders.items():
                ratio = f"{entry['vs']['ratio']:.2f}× {entry['vs']['baseline']}" if "vs" in entry else ""
                cells = [f"{entry[k]:.3f} s" if entry[k] is not None else "failed" for k in
                         ("restore_s", "load_s", "process_cpu_s")]  # fmt: skip
                lines.append(f"| {name} | {mode} | {' | '.join(cells)} | {ratio} | {entry['exact']} |")
        lines.append("")
    slope = result.get("per_tensor")
    if slope:
        lines += [f"## Per tensor: {slope['mib']:g} MiB in {slope['counts']} tensors, warm, into allocated tensors", ""]
        head = " | ".join(f"{n} tensors" for n in slope["counts"])
        lines += [f"| contender | {head} | ms per tensor (wall) | ms per tensor (CPU) | exact |"]
        lines += ["|---|" + "---:|" * (len(slope["counts"]) + 2) + "---|"]
        for name, per in slope["ms_per_tensor"].items():
            rows = [slope["rows"][str(n)][name] for n in slope["counts"]]
            cells = [f"{row['wall_s'] * 1000:.0f} ms" for row in rows]
            exact = all(row["exact"] for row in rows)
            lines.append(f"| {name} | {' | '.join(cells)} | {per['wall_s']:.4f} | {per['cpu_s']:.4f} | {exact} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    directory = args.dir or tempfile.mkdtemp(prefix="dcp-restore-")
    os.makedirs(directory, exist_ok=True)
    result: dict[str, Any] = {"settings": {k: v for k, v in vars(args).items() if k != "contender"}}
    result["machine"] = machine.describe(directory)
    specs = _specs(args)
    prepared, runs = {}, []
    try:
        for workload in args.workloads:
            print(f"== preparing {workload}", flush=True)
            prepared[workload] = prepare(specs[workload], os.path.join(directory, workload), args.contenders)
            prepared[workload]["tensors"] = _tensor_count(prepared[workload]["paths"].get("dcp-plugin"))
        for rep in range(args.repeats):
            for workload in args.workloads:
                for mode in args.modes:
                    shift = rep % len(args.contenders)
                    for name in args.contenders[shift:] + args.contenders[:shift]:
                        spec = {**specs[workload], "contender": name, "mode": mode}
                        spec["torch_threads"] = args.torch_threads
                        spec["path"] = prepared[workload]["paths"][name]
                        outcome = run_worker("benchmarks.restore_worker", spec)
                        run = {"workload": workload, "mode": mode, "contender": name, "repeat": rep, **outcome}
                        runs.append(run)
                        shown = f"{run['restore_s']:.3f} s" if run.get("ok") else run.get("error")
                        print(f"{workload} {mode} {name}: {shown}", flush=True)
        for run in runs:
            expected = _group_reference(run["contender"], run["workload"], run["mode"], runs, prepared)
            if run.get("ok") and expected is not None:
                run["exact"] = run["digest"] == expected
        if not args.no_slope:
            print("== per tensor", flush=True)
            spec = {"mib": args.slope_mib, "counts": args.slope_counts, "repeats": args.slope_repeats, "dir": directory}
            spec["torch_threads"] = args.torch_threads
            result["per_tensor"] = run_worker("benchmarks.restore_slope", spec)
    finally:
        if args.dir is None:
            shutil.rmtree(directory, ignore_errors=True)
    result["machine"]["load_average_end"] = list(os.getloadavg())  # a shared host: say how busy it was
    result["workloads"] = {w: {k: v for k, v in p.items() if k != "paths"} for w, p in prepared.items()}
    result["runs"] = runs
    result["summary"] = summarize(runs)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(f"{args.out}.json", "w", encoding="utf-8") as handle:
        json.dump(result, handle, indent=1)
    markdown = _markdown(result)
    with open(f"{args.out}.md", "w", encoding="utf-8") as handle:
        handle.write(markdown)
    print(markdown)
    return 0 if all(r.get("ok") and r.get("exact", True) for r in runs) else 1


def _tensor_count(path: str | None) -> int | None:
    """Tensors in a dcp-plugin checkpoint (from its ``.metadata``), skeleton included."""
    if path is None:
        return None
    from dcp_plugin.storage import CheckpointStorage

    storage = CheckpointStorage(path)
    info = storage.latest()
    if info is None:
        return None
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    metadata = storage.metadata_reader(info).read_metadata()
    return sum(isinstance(v, TensorStorageMetadata) for v in metadata.state_dict_metadata.values())


if __name__ == "__main__":
    sys.exit(main())
