"""What the scaling benchmark measures, and the results file it writes.

The grid (:data:`GRIDS`) varies one thing at a time around a 64 MiB state:

- tensors: 64 to 16,384 tensors of 64 MiB in all, on one rank;
- bytes: 16 MiB to 1 GiB in 64 tensors, on one rank;
- ranks: 1, 2, 4 and 8 ranks holding the same total state, in both layouts of ``benchmarks/scaling_state.py``
  (whole tensors split over the ranks, and every tensor sharded over every rank as FSDP does).

One job per rank count runs all of its configurations (ranks start once), and every saver and restorer of
``benchmarks/scaling_contenders.py`` runs on each. The results file keeps, per configuration, contender and
repetition, the slowest rank's wall time, the CPU time of the busiest rank and of all ranks together, the
coordinator's collectives (counts, pickled and wire bytes), and the coordinator's calls one by one for the first and
a repeated save: what ``benchmarks/scaling_model.py`` fits.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

from benchmarks import diskio, machine, scaling_contenders, scaling_probe
from benchmarks.scaling_launch import run_job
from benchmarks.scaling_state import Point, shape

MIB = 2**20

GRIDS: dict[str, dict[str, Any]] = {
    "full": {
        "repeats": 2,
        "restore_repeats": 1,
        "fewer_repeats_from": 16384,
        "points": [
            *(Point(1, "split", tensors, 64 * MIB) for tensors in (64, 256, 1024, 4096, 16384)),
            *(Point(1, "split", 64, mib * MIB) for mib in (16, 256, 1024)),
            *(Point(1, "fsdp", tensors, 64 * MIB) for tensors in (128, 512)),
            *(Point(world, "split", 1024, 64 * MIB) for world in (2, 4, 8)),
            *(Point(world, "fsdp", 128, 64 * MIB) for world in (2, 4, 8)),
        ],
        "held_out": {"world": 8, "tensors": 16384, "total_bytes": 1024 * MIB},
    },
    "quick": {
        "repeats": 1,
        "restore_repeats": 1,
        "fewer_repeats_from": 64,
        "points": [
            Point(1, "split", 16, 1 * MIB),
            Point(1, "split", 64, 1 * MIB),
            Point(1, "split", 16, 2 * MIB),
            Point(1, "fsdp", 16, 1 * MIB),
            Point(2, "split", 64, 1 * MIB),
            Point(2, "fsdp", 16, 1 * MIB),
        ],
        "held_out": {"world": 2},
    },
}
"""The configurations of a full run and of ``--quick`` (a smoke test: tiny states, one repetition), how often each
is repeated after its first save (restores: after the first restore; configurations with ``fewer_repeats_from``
tensors or more are saved once more only), and which configurations the model is fitted without, to be predicted
(the largest value of each axis)."""

JOB_TIMEOUT_S = 1800.0


def measure(
    grid: str, directory: str | None = None, log: Callable[[str], None] = print, command: str = ""
) -> dict[str, Any]:
    """Run the grid; returns the results file's content."""
    spec = GRIDS[grid]
    parent = directory or tempfile.gettempdir()
    os.makedirs(parent, exist_ok=True)
    root = tempfile.mkdtemp(prefix="dcp-scaling-", dir=parent)
    started = time.monotonic()
    info = machine.describe(root)
    settings = {
        "directory": root,
        "repeats": spec["repeats"],
        "restore_repeats": spec["restore_repeats"],
        "fewer_repeats_from": spec["fewer_repeats_from"],
        "savers": list(scaling_contenders.SAVERS),
        "restorers": list(scaling_contenders.RESTORERS),
        "torch_threads": 1,
    }
    measurements: list[dict[str, Any]] = []
    calls: dict[str, list[Any]] = {}
    latency: dict[str, float] = {}
    load: dict[str, float] = {}
    durations: dict[str, float | None] = {}
    try:
        host = _host_disk(root, 64 * MIB if grid == "quick" else 256 * MIB)
        for world in sorted({point.world for point in spec["points"]}):
            points = [point for point in spec["points"] if point.world == world]
            log(f"[{time.monotonic() - started:5.0f}s] {world} rank(s): {', '.join(p.key for p in points)}")
            load[str(world)] = os.getloadavg()[0]
            ranks = run_job(world, points, settings, JOB_TIMEOUT_S)
            latency[str(world)] = statistics.median(rank["collective_latency_s"] for rank in ranks)
            for point in points:
                durations[point.key] = ranks[0]["point_wall_s"].get(json.dumps(asdict(point), sort_keys=True))
            rows, detail = combine(ranks)
            measurements += rows
            calls.update(detail)
        log(
            f"[{time.monotonic() - started:5.0f}s] probe: DCP's per-chunk work at up to "
            f"{max(t * w for t, w in scaling_probe.GRIDS[grid]):,} chunks"
        )
        probe = scaling_probe.run(grid)
    finally:
        diskio.remove(root)
    info.update(load_average_end=list(os.getloadavg()), wall_s=round(time.monotonic() - started, 1))
    host["collective_latency_s"] = latency
    host["load_average_before_job"] = load
    info["point_wall_s"] = durations
    host["cores"] = os.cpu_count()
    return {
        "about": "Measurements of the scaling benchmark (benchmarks/scaling.py): per configuration, contender and "
        "repetition. benchmarks/scaling_model.py fits the model to them; docs/scaling.md is rendered from them.",
        "command": command,
        "grid": grid,
        "machine": info,
        "host": host,
        "settings": {k: v for k, v in settings.items() if k != "directory"},
        "held_out": spec["held_out"],
        "points": [dict(vars(point), key=point.key, shape=shape(point)) for point in spec["points"]],
        "measurements": measurements,
        "calls": calls,
        "probe": probe,
    }


def combine(ranks: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], dict[str, list[Any]]]:
    """One row per (configuration, contender, repetition) from every rank's records, and the calls one by one."""
    rows = []
    detail: dict[str, list[Any]] = {}
    for index, first in enumerate(ranks[0]["measurements"]):
        same = [rank["measurements"][index] for rank in ranks]
        assert all(
            (m["point"], m["contender"], m["rep"]) == (first["point"], first["contender"], first["rep"]) for m in same
        )
        row = {
            "point": first["point"],
            "contender": first["contender"],
            "rep": first["rep"],
            "wall_s": max(m["wall_s"] for m in same),
            "cpu_max_s": max(m["cpu_s"] for m in same),
            "cpu_sum_s": sum(m["cpu_s"] for m in same),
            "cpu_coordinator_s": first["cpu_s"],
            "collectives": first["collectives"],
            "wire_bytes_max": max(m["collectives"]["wire_bytes"] for m in same),
        }
        if "blocking_s" in first:
            row.update(
                blocking_s=max(m["blocking_s"] for m in same),
                blocking_cpu_max_s=max(m["blocking_cpu_s"] for m in same),
                returned_s=max(m["returned_s"] for m in same),
                blocking_calls=first["blocking_calls"],
            )
        if "verified" in first:
            row["verified"] = all(m["verified"] for m in same)
        rows.append(row)
        calls = ranks[0]["measurements"][index]["calls"]
        if calls is not None:
            detail[call_key(first["point"], first["contender"], first["rep"], "coordinator")] = calls
    return rows, detail


def call_key(point: str, contender: str, rep: int, role: str) -> str:
    """The key of one save's or restore's calls in the results file: ``point|contender|first|coordinator``."""
    return f"{point}|{contender}|{'first' if rep == 0 else 'repeat'}|{role}"


def _host_disk(root: str, nbytes: int) -> dict[str, Any]:
    """This host's sequential write + fsync and (evicted) read bandwidth, median of three."""
    path = os.path.join(root, "raw.bin")
    writes, reads = [], []
    for _ in range(3):
        writes.append(diskio.raw_write(path, nbytes))
        reads.append(diskio.raw_read(path))
        diskio.remove(path)
    return {
        "write_bytes_per_s": nbytes / statistics.median(writes),
        "read_bytes_per_s": nbytes / statistics.median(reads),
    }


__all__ = ["GRIDS", "call_key", "combine", "measure"]
