"""What a save costs per tensor and per rank: the same bytes split into more tensors, or over more ranks.

    python benchmarks/per_tensor.py                   # 64 MiB as 64 / 1,024 / 4,096 / 16,384 tensors; 1 / 2 / 4 ranks
    python benchmarks/per_tensor.py --quick           # 8 MiB, 64 / 1,024 tensors, 1 / 2 ranks, 3 saves: a first look

**Tensors.** A module holds ``--mib`` MiB of fp32 parameters split into N equal tensors (a mixture-of-experts model
has tens of thousands). Every contender saves it ``--saves`` times after ``--warmup`` untimed saves, every tensor
changed in place before each save, in a process of its own per (contender, N); the contenders take turns:

* ``torch.save``: ``torch.save(model.state_dict(), file)`` (into the page cache, no fsync);
* ``dcp.save``: plain ``torch.distributed.checkpoint.save`` of the state dict into a fresh directory;
* ``dcp-plugin sync``: ``CheckpointManager(dir, async_mode="sync").save(step, {"model": model})``;
* ``dcp-plugin thread``: the default mode (a writer thread, the snapshot copied in the background): the *blocking*
  part is the ``save`` call (wall time, and the CPU time of the calling thread), the *stall* the ``save`` call plus
  the wait for the snapshot copy right after it (no training overlaps it here), the *total* until the checkpoint is
  committed (``wait()``).

Per save: wall time and process CPU time (all threads), medians. The cost per added tensor is the slope of a
least-squares line through (N, time); ratios are taken against ``torch.save`` measured in the same run.

**Ranks.** ``--rank-tensors`` tensors of ``--mib`` MiB in all are split over R gloo processes (each rank its own
parameters: every tensor is written once, by its rank), for R in ``--ranks``; each rank saves collectively with
dcp-plugin (sync) and with plain ``dcp.save``. Reported per R: the time per save (the slowest rank, median over
saves) and the collectives each save makes and their payload (pickled bytes handed to ``torch.distributed``'s
object collectives, summed over the calls of one rank), counted by wrapping those functions in the benchmark.

Writes ``<out>.json`` (default ``benchmarks/results/per_tensor.json``) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CONTENDERS = ["torch.save", "dcp.save", "dcp-plugin sync", "dcp-plugin thread"]
_SENT = {
    "all_gather_object": "obj",
    "gather_object": "obj",
    "broadcast_object_list": "object_list",
    "scatter_object_list": "scatter_object_input_list",
}
"""The argument that carries what a rank sends, per object collective of ``torch.distributed``."""
OBJECT_COLLECTIVES = tuple(_SENT)


def _model(total_mib: float, count: int, prefix: str = "") -> Any:
    import torch

    per = max(1, int(total_mib * 2**20) // 4 // count)
    model = torch.nn.Module()
    model.weights = torch.nn.ParameterDict(
        {f"{prefix}{index}": torch.nn.Parameter(torch.randn(per)) for index in range(count)}
    )
    return model


def _touch(model: Any) -> None:
    import torch

    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(1.0)


# -- one contender, one tensor count, in a process of its own -------------------------------------------------
def run_tensors(contender: str, count: int, total_mib: float, saves: int, warmup: int, directory: str) -> dict:
    import torch
    import torch.distributed.checkpoint as dcp

    model = _model(total_mib, count)
    samples: dict[str, list[float]] = {"wall": [], "cpu": [], "blocking": [], "blocking_cpu": [], "stall": []}
    manager = None
    if contender.startswith("dcp-plugin"):
        from dcp_plugin import CheckpointManager

        manager = CheckpointManager(directory, async_mode=contender.split()[-1])
    for number in range(warmup + saves):
        _touch(model)
        target = os.path.join(directory, f"save_{number}")
        began, cpu, own = time.perf_counter(), time.process_time(), time.thread_time()
        blocking = stall = blocking_cpu = 0.0
        if contender == "torch.save":
            torch.save(model.state_dict(), target)
        elif contender == "dcp.save":
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                dcp.save(model.state_dict(), checkpoint_id=target, no_dist=True)
        else:
            assert manager is not None
            manager.save(number, {"model": model})
            blocking, blocking_cpu = time.perf_counter() - began, time.thread_time() - own
            manager.wait_for_staging()
            stall = time.perf_counter() - began
            manager.wait()
        wall, used = time.perf_counter() - began, time.process_time() - cpu
        if number >= warmup:
            samples["wall"].append(wall)
            samples["cpu"].append(used)
            samples["blocking"].append(blocking or wall)
            samples["blocking_cpu"].append(blocking_cpu or used)
            samples["stall"].append(stall or wall)
        if manager is None:
            (shutil.rmtree if os.path.isdir(target) else os.remove)(target)
        elif number >= 1:
            manager.delete(number - 1)
    if manager is not None:
        manager.close()
    result = {name: statistics.median(values) for name, values in samples.items()}
    if contender == "dcp-plugin thread":  # the least per-tensor work a save's caller does: take the state dict
        floor = []
        for _ in range(saves):
            own = time.thread_time()
            model.state_dict()
            floor.append(time.thread_time() - own)
        result["state_dict_cpu"] = statistics.median(floor)
    return result


# -- ranks --------------------------------------------------------------------------------------------------
class _Counter:
    """Counts the object collectives of ``torch.distributed`` this process makes, and their pickled payload."""

    def __init__(self) -> None:
        import torch.distributed as dist

        self.calls: dict[str, int] = {}
        self.payload = 0
        for name in OBJECT_COLLECTIVES:
            original = getattr(dist, name)
            setattr(dist, name, self._wrap(name, original))

    def _wrap(self, name: str, original: Any) -> Any:
        import inspect

        signature = inspect.signature(original)
        argument = _SENT[name]

        def counted(*args: Any, **kwargs: Any) -> Any:
            self.calls[name] = self.calls.get(name, 0) + 1
            sent = signature.bind(*args, **kwargs).arguments.get(argument)
            try:
                self.payload += len(pickle.dumps(sent)) if sent is not None else 0
            except Exception:  # noqa: BLE001 - unpicklable payloads fail in the collective itself
                pass
            return original(*args, **kwargs)

        return counted

    def reset(self) -> None:
        self.calls, self.payload = {}, 0


def _rank_main(rank: int, world: int, port: int, args: dict, out: str) -> None:
    import torch.distributed as dist

    from tests.multiproc import rank_env

    os.environ.update(rank_env(rank, world, port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    counter = _Counter()
    result = {}
    try:
        result = _rank_saves(rank, world, args, counter)
    finally:
        with open(os.path.join(out, f"rank{rank}.json"), "w", encoding="utf-8") as handle:
            json.dump(result, handle)
        dist.barrier()
        dist.destroy_process_group()


def _rank_saves(rank: int, world: int, args: dict, counter: _Counter) -> dict:
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    from dcp_plugin import CheckpointManager

    model = _model(args["mib"] / world, args["tensors"] // world, prefix=f"r{rank}_")
    result: dict[str, Any] = {}
    for contender in ("dcp-plugin sync", "dcp.save"):
        directory = os.path.join(args["dir"], contender.replace(" ", "_"))
        manager = CheckpointManager(directory, async_mode="sync") if contender != "dcp.save" else None
        times, calls, payloads = [], [], []
        for number in range(args["warmup"] + args["saves"]):
            _touch(model)
            dist.barrier()
            counter.reset()
            began = time.perf_counter()
            if manager is not None:
                manager.save(number, {"model": model})
            else:
                dcp.save(model.state_dict(), checkpoint_id=os.path.join(directory, f"save_{number}"))
            elapsed = time.perf_counter() - began
            if number >= args["warmup"]:
                times.append(elapsed)
                calls.append(dict(counter.calls))
                payloads.append(counter.payload)
        if manager is not None:
            manager.close()
        result[contender] = {"times": times, "calls": calls[-1], "payload": payloads[-1]}
    return result


def run_ranks(world: int, args: dict) -> dict:
    import torch.multiprocessing as mp

    from tests.multiproc import free_port

    with tempfile.TemporaryDirectory() as out:
        mp.start_processes(_rank_main, args=(world, free_port(), args, out), nprocs=world, start_method="spawn")
        ranks = []
        for rank in range(world):
            with open(os.path.join(out, f"rank{rank}.json"), encoding="utf-8") as handle:
                ranks.append(json.load(handle))
    summary = {}
    for contender in ranks[0]:
        slowest = [max(r[contender]["times"][i] for r in ranks) for i in range(len(ranks[0][contender]["times"]))]
        summary[contender] = {
            "time_s": statistics.median(slowest),
            "collectives_per_rank": ranks[-1][contender]["calls"],
            "payload_bytes_rank0": ranks[0][contender]["payload"],
            "payload_bytes_last_rank": ranks[-1][contender]["payload"],
        }
    return summary


# -- the driver ---------------------------------------------------------------------------------------------
def _slope(points: list[tuple[int, float]]) -> float:
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def _worker(argv: list[str]) -> None:
    contender, count, mib, saves, warmup, directory = argv
    result = run_tensors(contender, int(count), float(mib), int(saves), int(warmup), directory)
    print(json.dumps(result))


def measure_tensors(args: argparse.Namespace, base: str) -> dict[str, dict[int, dict]]:
    results: dict[str, dict[int, dict]] = {name: {} for name in args.contenders}
    for count in args.counts:
        order = args.contenders[count % len(args.contenders) :] + args.contenders[: count % len(args.contenders)]
        for contender in order:
            directory = tempfile.mkdtemp(dir=base)
            try:
                command = [sys.executable, os.path.abspath(__file__), "--worker", contender, str(count)]
                command += [str(args.mib), str(args.saves), str(args.warmup), directory]
                env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
                done = subprocess.run(command, capture_output=True, text=True, check=True, env=env)
                results[contender][count] = json.loads(done.stdout.strip().splitlines()[-1])
            finally:
                shutil.rmtree(directory, ignore_errors=True)
            row = results[contender][count]
            line = f"{contender:18s} {count:6d} tensors: {row['wall'] * 1e3:8.1f} ms, CPU {row['cpu'] * 1e3:8.1f} ms"
            print(f"  {line}", file=sys.stderr)
    return results


def summarise(results: dict[str, dict[int, dict]]) -> dict[str, Any]:
    slopes: dict[str, dict[str, float]] = {}
    for contender, rows in results.items():
        slopes[contender] = {
            kind: _slope([(count, row[kind]) for count, row in rows.items()]) * 1e3 for kind in ("wall", "cpu")
        }
        if contender == "dcp-plugin thread":
            for kind in ("blocking", "blocking_cpu", "stall", "state_dict_cpu"):
                slopes[contender][kind] = _slope([(count, row[kind]) for count, row in rows.items()]) * 1e3
    reference = slopes.get("torch.save")
    ratios = {}
    if reference:
        for contender, slope in slopes.items():
            ratios[contender] = {kind: slope[kind] / reference[kind] for kind in ("wall", "cpu") if reference[kind]}
    thread = results.get("dcp-plugin thread", {})
    blocking_ratio = None
    if thread:
        few, many = min(thread), max(thread)
        blocking_ratio = {
            "tensors": [few, many],
            **{kind: thread[many][kind] / thread[few][kind] for kind in ("blocking", "blocking_cpu", "stall")},
        }
    return {"ms_per_tensor": slopes, "per_tensor_vs_torch_save": ratios, "thread_many_vs_few": blocking_ratio}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        _worker(sys.argv[2:])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=float, default=64.0)
    parser.add_argument("--counts", type=int, nargs="+", default=[64, 1024, 4096, 16384])
    parser.add_argument("--saves", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--contender", action="append", dest="contenders", choices=CONTENDERS)
    parser.add_argument("--ranks", type=int, nargs="*", default=[1, 2, 4])
    parser.add_argument("--rank-tensors", type=int, default=4096)
    parser.add_argument("--dir", help="where checkpoints are written (default: a temporary directory)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "per_tensor"))
    parser.add_argument("--quick", action="store_true", help="8 MiB, 64 / 1,024 tensors, 1 / 2 ranks, 3 saves")
    args = parser.parse_args()
    args.contenders = args.contenders or list(CONTENDERS)
    if args.quick:
        args.mib, args.counts, args.saves, args.ranks, args.rank_tensors = 8.0, [64, 1024], 3, [1, 2], 1024
    from benchmarks import machine

    base = args.dir or tempfile.mkdtemp(prefix="per-tensor-")
    os.makedirs(base, exist_ok=True)
    try:
        tensors = measure_tensors(args, base)
        ranks = {}
        for world in args.ranks:
            directory = tempfile.mkdtemp(dir=base)
            try:
                options = {"mib": args.mib, "tensors": args.rank_tensors, "saves": args.saves, "warmup": args.warmup}
                ranks[world] = run_ranks(world, {**options, "dir": directory})
            finally:
                shutil.rmtree(directory, ignore_errors=True)
            times = ", ".join(f"{c} {r['time_s'] * 1e3:.1f} ms" for c, r in ranks[world].items())
            print(f"  {world} rank(s): {times}", file=sys.stderr)
        report = {
            "machine": machine.describe(base),
            "load_average": os.getloadavg(),
            "mib": args.mib,
            "saves": args.saves,
            "tensors": {c: {str(n): row for n, row in rows.items()} for c, rows in tensors.items()},
            "summary": summarise(tensors),
            "ranks": {"tensors": args.rank_tensors, "by_world_size": {str(w): r for w, r in ranks.items()}},
        }
    finally:
        if not args.dir:
            shutil.rmtree(base, ignore_errors=True)
    with open(f"{args.out}.json", "w", encoding="utf-8") as handle:
        json.dump(report, handle, indent=1)
    _print(report)


def _print(report: dict) -> None:
    counts = list(next(iter(report["tensors"].values())))
    print(f"| contender | {' | '.join(f'{n} tensors' for n in counts)} | ms per tensor |")
    print("|---|" + "---:|" * (1 + len(counts)))
    for contender, rows in report["tensors"].items():
        slope = report["summary"]["ms_per_tensor"][contender]
        cells = " | ".join(f"{row['wall'] * 1e3:.0f} ms (CPU {row['cpu'] * 1e3:.0f})" for row in rows.values())
        print(f"| {contender} | {cells} | {slope['wall']:.4f} (CPU {slope['cpu']:.4f}) |")
    thread = report["tensors"].get("dcp-plugin thread")
    if thread:
        cells = " | ".join(
            f"{row['blocking'] * 1e3:.1f} (CPU {row['blocking_cpu'] * 1e3:.1f}) / {row['stall'] * 1e3:.1f} ms"
            for row in thread.values()
        )
        print(f"| dcp-plugin thread: blocking (its CPU) / stall | {cells} | |")
    print(json.dumps(report["summary"], indent=1))
    for world, row in report["ranks"]["by_world_size"].items():
        cells = [
            f"{c}: {r['time_s'] * 1e3:.1f} ms, {sum(r['collectives_per_rank'].values())} object collectives, "
            f"{r['payload_bytes_rank0']} B from rank 0"
            for c, r in row.items()
        ]
        print(f"{world} rank(s): " + "; ".join(cells))


if __name__ == "__main__":
    main()
