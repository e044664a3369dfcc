"""How the ``dcp-plugin`` command prints (tables with a header row, human sizes and ISO times, JSON, progress bars)
and reads its JSON options.

Nothing here imports torch; the command's start time depends on it.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from dcp_plugin.cli.progress import ProgressBar


def human_size(count: float | None) -> str:
    """``1536`` -> ``"1.5 KiB"``; None -> ``"-"``."""
    if count is None:
        return "-"
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def iso_time(stamp: float | None) -> str:
    """A Unix time as local ISO 8601 with its offset, to the second (``-`` when unknown)."""
    if not stamp:
        return "-"
    return datetime.fromtimestamp(float(stamp)).astimezone().isoformat(timespec="seconds")


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Columns aligned under a header row; the last column is left ragged."""
    cells = [[str(c) for c in header]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header) - 1)]
    lines = []
    for row in cells:
        padded = [cell.ljust(width) for cell, width in zip(row, widths)] + row[len(widths) :]
        lines.append("  ".join(padded).rstrip())
    return "\n".join(lines)


def emit(text: str) -> None:
    """One block of output on stdout (the command turns a closed pipe into a quiet exit)."""
    sys.stdout.write(text + "\n")


def emit_note(text: str) -> None:
    """A remark for the person at the terminal, on stderr (stdout stays parseable)."""
    print(f"note: {text}", file=sys.stderr)


def emit_json(value: Any) -> None:
    emit(json.dumps(value, indent=1, default=str))


def progress(total: int, description: str, *, unit: str = "B", show: bool = True) -> ProgressBar:
    """A progress bar on stderr; hidden when ``show`` is false or stderr is not a terminal."""
    return ProgressBar(total, description, unit=unit, show=show)


def parse_options(text: str | None, flag: str) -> dict[str, Any]:
    """fsspec options given as a JSON object on the command line (``{}`` when not given)."""
    from dcp_plugin.errors import ConfigError

    if not text:
        return {}
    try:
        options = json.loads(text)
    except json.JSONDecodeError as err:
        raise ConfigError(f"{flag} must be a JSON object of fsspec options: {err}") from None
    if not isinstance(options, dict):
        raise ConfigError(f"{flag} must be a JSON object of fsspec options, not {type(options).__name__}.")
    return options


__all__ = ["emit", "emit_json", "emit_note", "human_size", "iso_time", "parse_options", "progress", "table"]
