"""The documentation's charts, drawn from the results file (``benchmarks/figures.py``), one per question.

Each chart is an SVG in ``docs/figures/`` whose description (``<dc:description>``) holds the values it plots as
JSON, so a test can check a chart against the results file without comparing drawings. The output is the same for
the same results (fixed hash salt, no date).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from benchmarks.figures import CHARTS, LABELS, extra, figures

PLUGIN_COLOUR = "#2e7d32"
OTHER_COLOUR = "#90a4ae"


def chart_data(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """For each chart (file stem): its title, axis label and the (label, value, shown) bars, from ``results``."""
    values = figures(results)
    saves, goodput = results["saves"], results["goodput"]
    charts: dict[str, dict[str, Any]] = {
        "stall": {
            "title": f"Stall per save, {values['saves.state']} state",
            "axis": "ms the training loop waits per save (lower is better)",
            "bars": [
                [LABELS[k], round(e["stall_s"] * 1000, 1), values[f"saves.{k}.stall"]]
                for k, e in sorted(saves["contenders"].items(), key=lambda item: -item[1]["stall_s"])
            ],
        },
        "durable": {
            "title": f"Time until the checkpoint is on disk, {values['saves.state']} state",
            "axis": "seconds from save until written, fsynced where the contender fsyncs (lower is better)",
            "bars": [
                [
                    f"{LABELS[k]}{'' if e['fsync'] else ' (no fsync)'}",
                    round(e["durable_s"], 3),
                    values[f"saves.{k}.durable"],
                ]
                for k, e in sorted(saves["contenders"].items(), key=lambda item: -item[1]["durable_s"])
            ],
            "line": [f"raw write + fsync: {values['saves.raw_write']}", round(saves["raw_write_s"], 3)],
        },
        "goodput": {
            "title": f"Extra training time, a save every {goodput['every']} steps",
            "axis": f"% longer than without checkpoints, {values['goodput.state']} state (lower is better)",
            "bars": [
                [LABELS[k], round(extra(goodput, k) * 100, 1), values[f"goodput.{k}.extra"]]
                for k in sorted(goodput["contenders"], key=lambda k: -extra(goodput, k))
            ],
        },
    }
    return charts


def draw(name: str, data: dict[str, Any], directory: Path = CHARTS) -> Path:
    """Write one chart as ``<directory>/<name>.svg``; returns its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams["svg.hashsalt"] = "dcp-plugin"
    plt.rcParams["svg.fonttype"] = "none"  # text stays text: small files, the page's font, searchable
    bars = data["bars"]
    figure, axes = plt.subplots(figsize=(7.5, 0.55 * len(bars) + 1.3), facecolor="white")
    labels = [label for label, _, _ in bars]
    heights = [value for _, value, _ in bars]
    colours = [PLUGIN_COLOUR if label.startswith("dcp-plugin") else OTHER_COLOUR for label in labels]
    drawn = axes.barh(labels, heights, color=colours)
    axes.bar_label(drawn, labels=[shown for _, _, shown in bars], padding=4, fontsize=9)
    if "line" in data:
        text, value = data["line"]
        axes.axvline(value, color="#c62828", linestyle="--", linewidth=1)
        axes.text(value, len(bars) - 0.45, f" {text}", color="#c62828", fontsize=8, va="bottom")
    axes.set_xlabel(data["axis"], fontsize=9)
    figure.suptitle(data["title"], fontsize=10, x=0.02, ha="left")
    axes.set_xlim(0, max(heights) * 1.25)
    axes.tick_params(labelsize=9)
    for side in ("top", "right"):
        axes.spines[side].set_visible(False)
    figure.tight_layout()
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.svg"
    figure.savefig(path, format="svg", metadata={"Date": None, "Description": json.dumps(data, sort_keys=True)})
    plt.close(figure)
    return path


def draw_all(results: dict[str, Any], directory: Path = CHARTS) -> list[Path]:
    """Every chart of the results file."""
    return [draw(name, data, directory) for name, data in chart_data(results).items()]


DESCRIPTION = re.compile(r"<dc:description>(?P<text>.*?)</dc:description>", re.S)


def plotted(path: Path) -> dict[str, Any]:
    """The values a chart was drawn from (its SVG description)."""
    import html

    match = DESCRIPTION.search(path.read_text(encoding="utf-8"))
    if match is None:
        raise ValueError(f"{path} carries no description of its data; redraw it with benchmarks/headline.py")
    return json.loads(html.unescape(match["text"]))


__all__ = ["chart_data", "draw", "draw_all", "plotted"]
