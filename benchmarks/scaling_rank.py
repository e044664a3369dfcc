"""One rank of the scaling benchmark: saves and restores every configuration it is given, with every contender,
and writes what it measured.

Usage (``benchmarks/scaling_launch.py`` starts one per rank, with torchrun's variables set):
``python -m benchmarks.scaling_rank SPEC.json OUT_DIR``. The ``__main__`` guard matters: DCP's process mode would
re-import this module (only the thread mode is measured, but the guard costs nothing).

For each configuration (:class:`~benchmarks.scaling_state.Point`) the rank builds its part of the state, then
saves it ``1 + repeats`` times with each saver (the first save of each is kept apart: it plans from scratch, opens
the plugin's process group and sizes its buffers), rotating the savers' order from one round to the next; then
restores it ``1 + restore_repeats`` times with each restorer (the first is a restarted job's: a fresh manager),
into the live tensors overwritten beforehand, and checks the values came back. Every timed window starts after a
barrier, and records wall time, this process's CPU time (all its threads) and the collectives made
(``benchmarks/scaling_collectives.py``).
"""

from __future__ import annotations

import gc
import json
import os
import sys
import time
import traceback
from typing import Any


def main(argv: list[str]) -> int:
    spec_path, out_dir = argv
    with open(spec_path, encoding="utf-8") as handle:
        spec = json.load(handle)
    import torch

    torch.set_num_threads(int(spec.get("torch_threads", 1)))
    import torch.distributed as dist

    from benchmarks import scaling_collectives

    scaling_collectives.install()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo", rank=rank, world_size=world)
    result: dict[str, Any] = {"rank": rank, "world": world, "ok": False, "measurements": [], "point_wall_s": {}}
    try:
        result["collective_latency_s"] = _collective_latency(spec.get("latency_probes", 20))
        for raw in spec["points"]:
            began = time.perf_counter()
            result["measurements"] += measure_point(raw, spec, rank, world)
            result["point_wall_s"][json.dumps(raw, sort_keys=True)] = time.perf_counter() - began
        result["ok"] = True
    except BaseException as err:  # noqa: BLE001 - reported to the launcher (CheckpointException is a BaseException)
        result["error"] = f"{type(err).__name__}: {err}"
        result["traceback"] = traceback.format_exc()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w", encoding="utf-8") as handle:
        json.dump(result, handle)
    sys.stdout.flush()
    sys.stderr.flush()
    # Leave without interpreter teardown: gloo's and DCP's native threads can abort a process while static
    # destructors run, after the rank's work is done and written.
    os._exit(0 if result["ok"] else 1)


def measure_point(raw: dict[str, Any], spec: dict[str, Any], rank: int, world: int) -> list[dict[str, Any]]:
    """Every save and restore of one configuration on this rank."""
    from benchmarks import scaling_contenders as contenders
    from benchmarks import scaling_state

    point = scaling_state.Point(**raw)
    state = scaling_state.build(point, rank)
    root = os.path.join(spec["directory"], point.key)
    detail = rank == 0  # the coordinator's calls are kept one by one; every rank's totals
    savers = {name: contenders.saver(name, os.path.join(root, name), state) for name in spec["savers"]}
    out: list[dict[str, Any]] = []
    repeats = int(spec["repeats"]) if point.tensors < int(spec["fewer_repeats_from"]) else 1
    restore_repeats = min(repeats, int(spec["restore_repeats"]))
    try:
        for rep in range(1 + repeats):
            names = list(savers)
            shift = rep % len(names)
            for name in names[shift:] + names[:shift]:
                out.append(_save(savers[name], rep + 1, name, rep, point, detail))
            if rep > 0:
                for saver in savers.values():
                    saver.delete(rep)  # keep the newest of each saver: the restorers read it
        expected = scaling_state.fingerprint(state)
        for name in spec["restorers"]:
            restorer = contenders.restorer(name, os.path.join(root, contenders.SAVED_BY[name]), state)
            try:
                for rep in range(1 + restore_repeats):
                    scaling_state.perturb(state)
                    record = _timed(restorer.load, detail, rep)
                    record["verified"] = abs(scaling_state.fingerprint(state) - expected) <= 1e-6 * max(1.0, expected)
                    out.append(dict(record, point=point.key, contender=name, rep=rep))
            finally:
                restorer.close()
    finally:
        for saver in savers.values():
            saver.close()
        _barrier()
        if rank == 0:
            import shutil

            shutil.rmtree(root, ignore_errors=True)
        del state
        gc.collect()
    return out


def _save(saver: Any, step: int, name: str, rep: int, point: Any, detail: bool) -> dict[str, Any]:
    from benchmarks import scaling_collectives

    _barrier()
    position = scaling_collectives.mark()
    cpu0, wall0 = time.process_time(), time.perf_counter()
    saver.start(step)
    wall_returned = time.perf_counter()
    saver.staged()
    cpu_staged, wall_staged = time.process_time(), time.perf_counter()
    blocking_calls = scaling_collectives.mark() - position
    saver.finish()
    cpu_done, wall_done = time.process_time(), time.perf_counter()
    calls = scaling_collectives.since(position)
    return {
        "point": point.key,
        "contender": name,
        "rep": rep,
        "returned_s": wall_returned - wall0,
        "blocking_s": wall_staged - wall0,
        "blocking_cpu_s": cpu_staged - cpu0,
        "wall_s": wall_done - wall0,
        "cpu_s": cpu_done - cpu0,
        "collectives": scaling_collectives.summary(calls),
        "blocking_calls": blocking_calls,
        "calls": _compact(calls) if detail and rep <= 1 else None,
    }


def _timed(action: Any, detail: bool, rep: int) -> dict[str, Any]:
    from benchmarks import scaling_collectives

    _barrier()
    position = scaling_collectives.mark()
    cpu0, wall0 = time.process_time(), time.perf_counter()
    action()
    cpu1, wall1 = time.process_time(), time.perf_counter()
    calls = scaling_collectives.since(position)
    return {
        "wall_s": wall1 - wall0,
        "cpu_s": cpu1 - cpu0,
        "collectives": scaling_collectives.summary(calls),
        "calls": _compact(calls) if detail and rep <= 1 else None,
    }


def _compact(calls: list[dict[str, Any]]) -> list[list[Any]]:
    """Each call as ``[op, origin, pickled_out, pickled_in, wire]`` (a short form for the results file)."""
    return [[c["op"], c["origin"], c["pickled_out"], c["pickled_in"], c["wire"]] for c in calls]


def _barrier() -> None:
    import torch.distributed as dist

    dist.barrier()


def _collective_latency(probes: int) -> float:
    """Median seconds of a tiny ``all_gather_object`` over all ranks on this host (loopback TCP)."""
    import statistics

    import torch.distributed as dist

    samples = []
    out: list[Any] = [None] * dist.get_world_size()
    for index in range(probes):
        _barrier()
        began = time.perf_counter()
        dist.all_gather_object(out, index)
        samples.append(time.perf_counter() - began)
    return statistics.median(samples)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
