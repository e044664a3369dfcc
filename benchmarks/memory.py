"""Host memory of a process tree, sampled in a thread of the parent (the measured process is not disturbed).

We sum PSS (proportional set size) over the process and its children: RSS would count twice the shared
memory that DCP's process mode maps in both the trainer and its writer daemon. Page cache is not counted.
"""

from __future__ import annotations

import threading
import time

import psutil


def tree_memory(pid: int) -> int:
    """Bytes of host memory used by process ``pid`` and all its descendants (PSS, RSS if PSS is missing)."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0
    total = 0
    for proc in procs:
        try:
            info = proc.memory_full_info()
            total += getattr(info, "pss", info.rss)
        except psutil.Error:
            continue
    return total


class Sampler:
    """Samples ``tree_memory(pid)`` every ``interval`` seconds with ``time.monotonic()`` timestamps."""

    def __init__(self, pid: int, interval: float = 0.02) -> None:
        self.pid = pid
        self.interval = interval
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-memory-sampler", daemon=True)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            value = tree_memory(self.pid)
            if value:
                self.samples.append((time.monotonic(), value))
            self._stop.wait(self.interval)

    def peak_between(self, windows: list[tuple[float, float]]) -> int | None:
        """Highest sample taken inside any of the (start, end) windows, each widened by one sampling interval:
        a save shorter than the interval would otherwise have no sample at all (and the staging buffers it
        allocated are still there just after it)."""
        pad = self.interval * 1.5
        values = [v for t, v in self.samples if any(a - pad <= t <= b + pad for a, b in windows)]
        return max(values) if values else None
