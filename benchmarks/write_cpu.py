"""Writer CPU per byte: CPU seconds per GiB to write the same tensors durably, for every way of writing them.

    python benchmarks/write_cpu.py                          # 400 MiB = 8 x 50 MiB fp32, 5 repeats
    python benchmarks/write_cpu.py --mib 8 --repeats 1      # a quick look

Rows: a raw buffered write + fsync of the tensors' bytes (the floor every other row is compared with),
``dcp.save`` with one writer thread (and the same with ``torch.save``'s crc32 off, for reference), and each
dcp-plugin mode (sync, thread, process; with and without async staging). Every repetition writes fresh files
(a new checkpoint), from just before the save until it is durable (``wait()`` returned); the contenders take
turns within each repetition. Every contender takes one untimed warm-up save first (first-save costs such as
starting the writer daemon are not per-byte costs). The time from the save until it is durable is reported too,
against the raw write's.

CPU is process CPU time (user + system, all threads, ``resource.getrusage(RUSAGE_SELF)``) plus the CPU time of
every live child process (the ``process`` mode's writer daemon, read from ``/proc/<pid>/stat``) plus finished,
waited-for children (``RUSAGE_CHILDREN``). Reported: min and median over ``--repeats`` in seconds per GiB, and
each as a ratio to the raw write's (minimum to minimum: other work on a shared host only ever adds CPU, for
instance page reclaim charged to whoever writes into the page cache). Outputs ``<out>.json`` and a printed table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.distributed.checkpoint as dcp  # noqa: E402
from torch.distributed.checkpoint import FileSystemWriter  # noqa: E402

RAW = "raw write + fsync"
MODES: dict[str, dict[str, Any]] = {
    "dcp-plugin sync": {"async_mode": "sync"},
    "dcp-plugin thread": {"async_mode": "thread"},
    "dcp-plugin thread+staging": {"async_mode": "thread", "async_staging": True},
    "dcp-plugin process": {"async_mode": "process"},
    "dcp-plugin process+staging": {"async_mode": "process", "async_staging": True},
}
PAGE_CACHE = "dcp-plugin sync, no O_DIRECT"
CONTENDERS = [RAW, "dcp.save", "dcp.save, crc32 off", *MODES, PAGE_CACHE]
Sample = tuple[float, float]
"""(CPU seconds, seconds until durable) of one write."""
_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _children_cpu() -> float:
    """CPU seconds of this process's live descendants (Linux /proc; 0 elsewhere)."""
    if not os.path.isdir("/proc"):
        return 0.0
    parents: dict[int, int] = {}
    cpu: dict[int, float] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(entry)] = int(fields[1])
        cpu[int(entry)] = (int(fields[11]) + int(fields[12])) / _TICKS
    me, total, stack = os.getpid(), 0.0, [os.getpid()]
    while stack:
        parent = stack.pop()
        for pid, ppid in parents.items():
            if ppid == parent and pid != me:
                total += cpu[pid]
                stack.append(pid)
    return total


def cpu_seconds() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    done = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + done.ru_utime + done.ru_stime + _children_cpu()


def make_state(total_mib: float, count: int) -> dict[str, torch.Tensor]:
    numel = max(1, int(total_mib * 2**20 / count / 4))
    torch.manual_seed(0)
    return {f"w{i}": torch.randn(numel) for i in range(count)}


def raw_write(state: dict[str, torch.Tensor], path: str) -> None:
    """The floor: every tensor's bytes through one buffered file, then fsync."""
    with open(path, "wb") as handle:
        for tensor in state.values():
            handle.write(tensor.numpy().data)
        handle.flush()
        os.fsync(handle.fileno())


def _dcp_save(state: dict[str, torch.Tensor], path: str, crc32: bool) -> None:
    from torch.utils.serialization import config

    previous = config.save.compute_crc32
    config.save.compute_crc32 = crc32  # this thread's setting (torch keeps it per thread); DCP writes on this thread
    try:
        dcp.save(state, storage_writer=FileSystemWriter(path, thread_count=1), no_dist=True)
    finally:
        config.save.compute_crc32 = previous


class Writer:
    """One contender: ``write(number)`` writes a fresh checkpoint durably; ``close()`` releases it."""

    def __init__(self, name: str, state: dict[str, torch.Tensor], directory: str) -> None:
        self.name = name
        self.directory = directory
        os.makedirs(directory, exist_ok=True)
        self._manager: Any = None
        if name in MODES or name == PAGE_CACHE:
            from dcp_plugin import CheckpointManager

            options = MODES.get(name, {"async_mode": "sync", "direct_io": False})
            self._manager = CheckpointManager(directory, distributed=False, **options)
        self._state = state

    def write(self, number: int) -> None:
        path = os.path.join(self.directory, f"w{number}")
        if self.name == RAW:
            raw_write(self._state, path)
        elif self.name == "dcp.save":
            _dcp_save(self._state, path, crc32=True)
        elif self.name == "dcp.save, crc32 off":
            _dcp_save(self._state, path, crc32=False)
        else:
            self._manager.save(number, self._state)
            self._manager.wait()

    def clean(self, number: int) -> None:
        if self._manager is not None:
            self._manager.delete(number)
            return
        path = os.path.join(self.directory, f"w{number}")
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.exists(path):
            os.remove(path)

    def close(self) -> None:
        if self._manager is not None:
            self._manager.close()


def measure(names: list[str], state: dict[str, torch.Tensor], base: str, repeats: int) -> dict[str, list[Sample]]:
    """(CPU seconds, seconds until durable) of each timed repetition of each contender, after one warm-up write
    each; the contenders take turns within every repetition (in a rotating order), so that a disk or host
    whose speed drifts during the run affects them alike."""
    writers = {name: Writer(name, state, os.path.join(base, f"c{index}")) for index, name in enumerate(names)}
    samples: dict[str, list[Sample]] = {name: [] for name in names}
    try:
        for writer in writers.values():
            writer.write(0)
            writer.clean(0)
        for number in range(1, repeats + 1):
            turn = (number - 1) % len(names)
            for name in names[turn:] + names[:turn]:
                writer = writers[name]
                before, began = cpu_seconds(), time.perf_counter()
                writer.write(number)
                samples[name].append((cpu_seconds() - before, time.perf_counter() - began))
                writer.clean(number)
        return samples
    finally:
        for writer in writers.values():
            writer.close()
            shutil.rmtree(writer.directory, ignore_errors=True)


def summarise(samples: dict[str, list[Sample]], nbytes: int) -> dict[str, dict[str, float]]:
    gib = nbytes / 2**30
    rows = {}
    for name, values in samples.items():
        cpu, durable = [c for c, _ in values], [d for _, d in values]
        rows[name] = {
            "min_s_per_gib": min(cpu) / gib,
            "median_s_per_gib": statistics.median(cpu) / gib,
            "durable_s": statistics.median(durable),
        }
    floor, floor_min = rows[RAW]["median_s_per_gib"], rows[RAW]["min_s_per_gib"]
    for row in rows.values():
        row["ratio_to_raw"] = row["median_s_per_gib"] / floor if floor > 0 else float("nan")
        # other work on the host only ever adds CPU (page reclaim lands on whoever writes): minimum against minimum
        row["min_ratio_to_raw"] = row["min_s_per_gib"] / floor_min if floor_min > 0 else float("nan")
        row["durable_ratio_to_raw"] = row["durable_s"] / rows[RAW]["durable_s"]
    return rows


def table(rows: dict[str, dict[str, float]]) -> str:
    lines = [
        "| writer | CPU s/GiB, min | CPU s/GiB, median | min vs raw min | median vs raw median "
        "| time to durable (s), median | durable vs raw |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, row in rows.items():
        lines.append(
            f"| {name} | {row['min_s_per_gib']:.3f} | {row['median_s_per_gib']:.3f} | "
            f"{row['min_ratio_to_raw']:.2f}x | {row['ratio_to_raw']:.2f}x | "
            f"{row['durable_s']:.2f} | {row['durable_ratio_to_raw']:.2f}x |"
        )
    return "\n".join(lines)


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mib", type=float, default=400.0, help="total tensor data (default 400)")
    parser.add_argument("--tensors", type=int, default=8, help="number of fp32 tensors it is split into")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--contender", action="append", dest="contenders", help=f"repeatable; default: all of {CONTENDERS}"
    )
    parser.add_argument("--dir", help="where files are written (default: a temporary directory)")
    parser.add_argument("--out", default="benchmarks/results/write_cpu")
    args = parser.parse_args(argv)
    unknown = [c for c in args.contenders or [] if c not in CONTENDERS]
    if unknown:
        parser.error(f"unknown contender(s) {unknown}; choose from: {', '.join(CONTENDERS)}")
    if args.mib <= 0 or args.tensors < 1 or args.repeats < 1:
        parser.error("--mib must be > 0, --tensors and --repeats >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    warnings.filterwarnings("ignore", message="torch.distributed is disabled")
    names = [RAW] + [c for c in (args.contenders or CONTENDERS) if c != RAW]
    state = make_state(args.mib, args.tensors)
    nbytes = sum(t.nbytes for t in state.values())
    base = args.dir or tempfile.mkdtemp(prefix="write-cpu-")
    try:
        samples = measure(names, state, base, args.repeats)
        for name, values in samples.items():
            print(f"{name}: {[(round(c, 4), round(d, 3)) for c, d in values]} (CPU s, durable s)", file=sys.stderr)
    finally:
        if args.dir is None:
            shutil.rmtree(base, ignore_errors=True)
    rows = summarise(samples, nbytes)
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": {
            "nproc": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
        },
        "bytes": nbytes,
        "tensors": args.tensors,
        "repeats": args.repeats,
        "cpu_measure": "RUSAGE_SELF + RUSAGE_CHILDREN + live child processes (/proc), user + system",
        "samples_s": {name: [cpu for cpu, _ in values] for name, values in samples.items()},
        "durable_s": {name: [durable for _, durable in values] for name, values in samples.items()},
        "rows": rows,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(f"{args.out}.json", "w") as handle:
        json.dump(result, handle, indent=2)
    print(f"{nbytes / 2**20:.0f} MiB in {args.tensors} fp32 tensors, {args.repeats} repeats\n")
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
