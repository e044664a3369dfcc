"""The charts of docs/scaling.md, drawn from the scaling results and model files.

Like ``benchmarks/charts.py``: each chart is an SVG in ``docs/figures/`` whose description holds the values it plots
as JSON, so a test can check a chart against the files without comparing drawings; same results, same bytes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from benchmarks import scaling_model
from benchmarks.figures import CHARTS
from benchmarks.scaling_contenders import LABELS
from benchmarks.scaling_tables import axis_points, by_point

COLOURS = {
    "plugin_sync|first": "#a5d6a7",
    "plugin_sync|repeat": "#2e7d32",
    "dcp_save|repeat": "#546e7a",
    "plugin_sync": "#2e7d32",
    "plugin_thread": "#81c784",
    "plugin_load": "#00897b",
    "dcp_save": "#546e7a",
    "dcp_async": "#b0bec5",
    "dcp_load": "#8d6e63",
}
CHART_NAMES = ("scaling-tensors", "scaling-ranks", "scaling-payload", "scaling-projection")


def chart_data(results: dict[str, Any], model: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """For each chart (file stem): title, axes and series, from the files."""
    obs = by_point(results)
    fitted = model["model"]

    def series(axis: str, contender: str, kind: str, x_of: Any, quantity: str = "cpu") -> dict[str, Any]:
        points = [p for p in axis_points(results, axis) if (p["key"], contender, kind) in obs]
        measured = [[x_of(p), round(obs[(p["key"], contender, kind)]["values"][quantity], 5)] for p in points]
        work = fitted.get(contender, {}).get(kind, {}).get(quantity)
        line = [[x_of(p), round(scaling_model.predict(work, p["shape"]), 5)] for p in points] if work else []
        return {"label": f"{LABELS[contender]} ({kind})", "key": contender, "measured": measured, "model": line}

    tensors = {
        "title": "CPU seconds of one save or restore against the tensor count (64 MiB, one rank)",
        "x": "tensors",
        "y": "CPU seconds of the busiest rank",
        "log": True,
        "series": [
            series("tensors", c, k, lambda p: p["tensors"])
            for c, k in (
                ("plugin_sync", "repeat"),
                ("plugin_thread", "repeat"),
                ("dcp_save", "repeat"),
                ("dcp_async", "repeat"),
                ("plugin_load", "first"),
                ("dcp_load", "first"),
            )
        ],
    }
    ranks_points = [p for p in axis_points(results, "ranks") if p["layout"] == "fsdp"]
    layout_tensors = ranks_points[0]["tensors"] if ranks_points else 0
    ranks = {
        "title": f"CPU seconds of the busiest rank, {layout_tensors} DTensors sharded over every rank (FSDP layout)",
        "x": "ranks",
        "y": "CPU seconds of the busiest rank",
        "log": False,
        "series": [
            _rank_series(results, obs, fitted, c, k)
            for c, k in (
                ("plugin_sync", "repeat"),
                ("dcp_save", "repeat"),
                ("plugin_load", "first"),
                ("dcp_load", "first"),
            )
        ],
    }
    payload = {
        "title": "Coordinator's pickled bytes per save against the chunks (FSDP layout)",
        "x": "chunks (tensors × ranks in the FSDP layout)",
        "y": "bytes (sent + received)",
        "log": True,
        "series": [
            _payload_series(results, c, k)
            for c, k in (("plugin_sync", "first"), ("plugin_sync", "repeat"), ("dcp_save", "repeat"))
        ],
    }
    bars = []
    for row in model["projections"]["rows"]:
        if row["kind"] != ("repeat" if row["operation"] == "save" else "first"):
            continue
        if row["contender"] not in ("plugin_sync", "dcp_save", "plugin_load", "dcp_load"):
            continue
        bars.append(
            {
                "label": LABELS[row["contender"]],
                "world": row["world"],
                "key": row["contender"],
                "parts": [round(row["work_s"], 2), round(row["network_s"], 2), round(row["disk_s"], 2)],
                "probe": round(row.get("total_disk_probe_s", row["total_disk_s"]), 2),
            }
        )
    projection = {
        "title": "Projected time of a repeated save and of a restore: 70B model, AdamW, FSDP2",
        "x": "seconds (CPU work + collectives + local disk; ticks: with the probe's per-chunk cost)",
        "parts": ["CPU work", "collectives", "local disk"],
        "bars": bars,
    }
    return {
        "scaling-tensors": tensors,
        "scaling-ranks": ranks,
        "scaling-payload": payload,
        "scaling-projection": projection,
    }


def _rank_series(
    results: dict[str, Any], obs: dict[Any, Any], fitted: dict[str, Any], contender: str, kind: str
) -> dict[str, Any]:
    points = [p for p in axis_points(results, "ranks") if p["layout"] == "fsdp"]
    one = [p for p in results["points"] if p["world"] == 1 and p["layout"] == "fsdp"]
    if points and one:
        same = [p for p in one if p["tensors"] == points[0]["tensors"]]
        points = same + points
    measured = [
        [p["world"], round(obs[(p["key"], contender, kind)]["values"]["cpu"], 5)]
        for p in points
        if (p["key"], contender, kind) in obs
    ]
    work = fitted.get(contender, {}).get(kind, {}).get("cpu")
    line = [[p["world"], round(scaling_model.predict(work, p["shape"]), 5)] for p in points] if work else []
    return {"label": f"{LABELS[contender]} ({kind})", "key": contender, "measured": measured, "model": line}


def _payload_series(results: dict[str, Any], contender: str, kind: str) -> dict[str, Any]:
    shapes = {p["key"]: p for p in results["points"]}
    seen: dict[float, int] = {}
    for row in results["measurements"]:
        if row["contender"] != contender or ("first" if row["rep"] == 0 else "repeat") != kind:
            continue
        point = shapes[row["point"]]
        if point["layout"] != "fsdp":
            continue
        c = row["collectives"]
        seen.setdefault(point["shape"]["chunks"], c["pickled_out"] + c["pickled_in"])
    return {
        "label": f"{LABELS[contender]} ({kind})",
        "key": f"{contender}|{kind}",
        "measured": sorted([chunks, value] for chunks, value in seen.items()),
        "model": [],
    }


def draw(name: str, data: dict[str, Any], directory: Path = CHARTS) -> Path:
    """Write one chart as ``<directory>/<name>.svg``; returns its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams["svg.hashsalt"] = "dcp-plugin"
    plt.rcParams["svg.fonttype"] = "none"
    if "bars" in data:
        figure = _draw_bars(plt, data)
    else:
        figure, axes = plt.subplots(figsize=(7.5, 4.2), facecolor="white")
        for entry in data["series"]:
            colour = COLOURS.get(entry["key"], "#888888")
            if entry["measured"]:
                xs, ys = zip(*entry["measured"])
                axes.plot(xs, ys, "o", color=colour, label=entry["label"])
            if entry["model"]:
                xs, ys = zip(*entry["model"])
                axes.plot(xs, ys, "--", color=colour, linewidth=1)
        if data["log"]:
            axes.set_xscale("log")
            axes.set_yscale("log")
        axes.set_xlabel(data["x"], fontsize=9)
        axes.set_ylabel(data["y"], fontsize=9)
        axes.legend(fontsize=8, frameon=False)
        axes.tick_params(labelsize=8)
        for side in ("top", "right"):
            axes.spines[side].set_visible(False)
        figure.suptitle(data["title"] + " (dots: measured; dashes: model)", fontsize=9, x=0.02, ha="left")
        figure.tight_layout()
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.svg"
    figure.savefig(path, format="svg", metadata={"Date": None, "Description": json.dumps(data, sort_keys=True)})
    plt.close(figure)
    return path


def _draw_bars(plt: Any, data: dict[str, Any]) -> Any:
    """Stacked horizontal bars, one panel per rank count (each on its own linear scale)."""
    worlds = sorted({bar["world"] for bar in data["bars"]})
    per_panel = max(1, max(sum(bar["world"] == w for bar in data["bars"]) for w in worlds))
    figure, panels = plt.subplots(
        len(worlds), 1, figsize=(7.5, len(worlds) * (0.45 * per_panel + 0.9) + 0.6), facecolor="white", squeeze=False
    )
    shades = ["#2e7d32", "#f9a825", "#546e7a"]
    for axes, world in zip(panels[:, 0], worlds):
        bars = [bar for bar in data["bars"] if bar["world"] == world]
        labels = [bar["label"] for bar in bars]
        left = [0.0] * len(bars)
        for index, part in enumerate(data["parts"]):
            widths = [bar["parts"][index] for bar in bars]
            axes.barh(labels, widths, left=left, color=shades[index % len(shades)], label=part)
            left = [a + b for a, b in zip(left, widths)]
        for position, bar in enumerate(bars):
            axes.plot([bar["probe"]] * 2, [position - 0.4, position + 0.4], color="black", linewidth=2)
        axes.invert_yaxis()
        axes.set_title(f"{world:,} ranks", fontsize=9, loc="left")
        axes.tick_params(labelsize=8)
        for side in ("top", "right"):
            axes.spines[side].set_visible(False)
    panels[0, 0].legend(fontsize=8, frameon=False, loc="lower right")
    panels[-1, 0].set_xlabel(data["x"], fontsize=9)
    figure.suptitle(data["title"], fontsize=9, x=0.02, ha="left")
    figure.tight_layout()
    return figure


def draw_all(results: dict[str, Any], model: dict[str, Any], directory: Path = CHARTS) -> list[Path]:
    """Every chart of the page."""
    return [draw(name, data, directory) for name, data in chart_data(results, model).items()]


__all__ = ["CHART_NAMES", "chart_data", "draw", "draw_all"]
