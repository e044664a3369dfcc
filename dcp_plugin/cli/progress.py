"""Progress bars of the ``dcp-plugin`` command, on stderr and only when it is a terminal.

Callers report small steps (a chunk of bytes read, an entry removed), so the bar moves smoothly. The rate and the
time left are shown only once they mean something: after :data:`SETTLE_S` seconds and :data:`SETTLE_FRACTION` of
the work, from the average over everything done so far (a first step that came after a slow start cannot make a
13-second job show hours left). Nothing here imports torch.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

SETTLE_S = 1.0
"""No rate or time left before this many seconds."""
SETTLE_FRACTION = 0.02
"""No time left before this fraction of the total is done."""
REDRAW_S = 0.1
"""At most this often (except the first and the last drawing)."""
WIDTH = 24
"""Characters of the bar itself."""


def _size(count: float, unit: str) -> str:
    if unit != "B":
        return f"{int(count)}"
    value = float(count)
    for name in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or name == "TiB":
            return f"{int(value)} B" if name == "B" else f"{value:.1f} {name}"
        value /= 1024
    raise AssertionError("unreachable")


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes:02d}:{secs:02d}"


class ProgressBar:
    """``description  [#####.....]  40%  1.2 GiB / 3.0 GiB  250.0 MiB/s  00:07 left`` redrawn in place.

    ``update(n)`` adds ``n`` units of work; ``total`` may be set (or raised) later. Used as a context manager it
    clears its line at the end. ``show=False`` (or a stderr that is not a terminal) makes every call a no-op.
    """

    def __init__(
        self,
        total: int,
        description: str,
        *,
        unit: str = "B",
        show: bool = True,
        stream: TextIO | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.stream = sys.stderr if stream is None else stream
        self.total = total
        self.done = 0
        self.description = description
        self.unit = unit
        self.clock = clock
        self.enabled = (show and stream_is_terminal(self.stream)) if stream is None else show
        self.started = clock()
        self._drawn_at: float | None = None

    @property
    def n(self) -> int:
        """Units done so far."""
        return self.done

    def update(self, count: int = 1) -> None:
        """Count ``count`` more units done, and redraw when due."""
        self.done += count
        if not self.enabled:
            return
        now = self.clock()
        finished = self.total > 0 and self.done >= self.total
        if self._drawn_at is None or finished or now - self._drawn_at >= REDRAW_S:
            self._draw(now)

    def line(self, now: float | None = None) -> str:
        """The text of the bar at ``now`` (default: the clock's time)."""
        now = self.clock() if now is None else now
        elapsed = now - self.started
        parts = [self.description]
        if self.total <= 0 and self.done <= 0:
            return self.description  # a phase without a count: its name is all there is to show
        if self.total > 0:
            fraction = min(1.0, self.done / self.total)
            filled = int(fraction * WIDTH)
            parts.append(f"[{'#' * filled}{'.' * (WIDTH - filled)}] {fraction * 100:3.0f}%")
            parts.append(f"{_size(self.done, self.unit)} / {_size(self.total, self.unit)}")
        else:
            parts.append(_size(self.done, self.unit))
        if elapsed >= SETTLE_S and self.done > 0:
            rate = self.done / elapsed
            parts.append(f"{_size(rate, self.unit)}/s" if self.unit == "B" else f"{rate:.1f} {self.unit}/s")
            if self.total > 0 and SETTLE_FRACTION <= self.done / self.total < 1:
                parts.append(f"{_duration((self.total - self.done) / rate)} left")
        return "  ".join(parts)

    def _draw(self, now: float) -> None:
        self.stream.write("\r\x1b[K" + self.line(now))
        self.stream.flush()
        self._drawn_at = now

    def close(self) -> None:
        """Clear the bar's line (the command's own output follows)."""
        if self.enabled and self._drawn_at is not None:
            self.stream.write("\r\x1b[K")
            self.stream.flush()

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def stream_is_terminal(stream: Any) -> bool:
    """Whether ``stream`` is an interactive terminal (bars are drawn only there)."""
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


__all__ = ["ProgressBar", "stream_is_terminal"]
