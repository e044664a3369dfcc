"""Turns the raw runs into medians, ratios and target checks, and writes JSON, markdown and a PNG chart."""

from __future__ import annotations

import json
import os
import statistics
from typing import Any

from benchmarks.contenders import RAW_DISK

BASELINE = "torch.save"
LIGHTNING_ASYNC = "Lightning AsyncCheckpointIO"
PLUGIN_PREFIX = "dcp-plugin"
FLAT_GROWTH = 0.05
"""Memory growth across the repeated saves counts as flat below this fraction of the state size."""


def stat(values: list[float]) -> dict[str, float] | None:
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def _ratio(a: dict | None, b: dict | None) -> float | None:
    if not a or not b or not b["median"]:
        return None
    return a["median"] / b["median"]


def summarize(data: dict[str, Any]) -> dict[str, Any]:
    """Per-contender statistics (pooled over repetitions; warm-up saves excluded) and ratios."""
    runs = data["runs"]
    raw_samples = [s for r in runs if r["contender"] == RAW_DISK and r.get("ok") for s in r["samples"]]
    raw = {
        "write_s": stat([s["write_s"] for s in raw_samples]),
        "read_s": stat([s["read_s"] for s in raw_samples]),
        "write_mib_s": stat([s["bytes"] / s["write_s"] / 2**20 for s in raw_samples]),
        "read_mib_s": stat([s["bytes"] / s["read_s"] / 2**20 for s in raw_samples]),
        "bytes": raw_samples[0]["bytes"] if raw_samples else None,
    }
    out: dict[str, Any] = {"raw_disk": raw, "contenders": {}}
    for name, described in data["contenders"].items():
        ok = [r for r in runs if r["contender"] == name and r.get("ok")]
        failed = [r for r in runs if r["contender"] == name and not r.get("ok")]
        saves = [s for r in ok for s in r["saves"] if not s["warmup"]]
        overlap = [(o, o["baseline_step_s"]) for r in ok for o in r["overlap"]]
        state_bytes = ok[0]["state_bytes"] if ok else None
        entry: dict[str, Any] = {
            **described,
            "runs": len(ok),
            "failures": [r.get("error") for r in failed],
            "state_bytes": state_bytes,
            "blocked_s": stat([s["blocked_s"] for s in saves]),
            "staged_s": stat([s["staged_s"] for s in saves]),
            "durable_s": stat([s["durable_s"] for s in saves]),
            "write_mib_s": stat([s["bytes"] / s["durable_s"] / 2**20 for s in saves]),
            "bytes": stat([s["bytes"] for s in saves]),
            "load_s": stat([r["load_s"] for r in ok]),
            "load_verified": all(r["load_verified"] for r in ok) if ok else None,
            "stall_s": stat([o["stall_s"] for o, _ in overlap]) if overlap else None,
            "train_throughput": stat([(o["steps"] / o["elapsed_s"]) * base for o, base in overlap])
            if overlap
            else None,
            "overlap_steps": stat([o["steps"] for o, _ in overlap]) if overlap else None,
            "peak_extra_bytes": stat(
                [r["memory_peak"] - r["memory_baseline"] for r in ok if r.get("memory_peak") is not None]
            ),
        }
        # the loop's stall: with training running for background writers, the save call alone otherwise
        entry["loop_blocked_s"] = entry["stall_s"] if described["background"] else entry["blocked_s"]
        leak_runs = [r for r in ok if len(r["saves"]) == max(len(x["saves"]) for x in ok)]
        growth = [
            r["saves"][-1]["memory_after"] - r["saves"][1]["memory_after"] for r in leak_runs if len(r["saves"]) > 2
        ]
        entry["growth_bytes"] = stat(growth)
        entry["growth_saves"] = len(leak_runs[0]["saves"]) - 1 if leak_runs else 0
        out["contenders"][name] = entry
    _add_ratios(out)
    out["targets"] = targets(out)
    return out


def _add_ratios(summary: dict[str, Any]) -> None:
    raw = summary["raw_disk"]
    base = summary["contenders"].get(BASELINE, {})
    for entry in summary["contenders"].values():
        entry["ratios"] = {
            "blocked_vs_torch_save": _ratio(entry["blocked_s"], base.get("blocked_s")),
            "staged_vs_torch_save": _ratio(entry["staged_s"], base.get("blocked_s")),
            "loop_blocked_vs_torch_save": _ratio(entry["loop_blocked_s"], base.get("blocked_s")),
            "durable_vs_torch_save": _ratio(entry["durable_s"], base.get("durable_s")),
            "durable_vs_raw_write": _ratio(entry["durable_s"], raw["write_s"]),
            "load_vs_torch_load": _ratio(entry["load_s"], base.get("load_s")),
            "load_vs_raw_read": _ratio(entry["load_s"], raw["read_s"]),
            "peak_extra_vs_state": (
                entry["peak_extra_bytes"]["median"] / entry["state_bytes"]
                if entry["peak_extra_bytes"] and entry["state_bytes"]
                else None
            ),
        }


def targets(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets, checked for every dcp-plugin contender (guidance, not assertions)."""
    contenders = summary["contenders"]
    lightning_async = contenders.get(LIGHTNING_ASYNC, {}).get("loop_blocked_s")
    rows = []
    for name, e in contenders.items():
        if not name.startswith(PLUGIN_PREFIX):
            continue
        r = e["ratios"]
        growth = e["growth_bytes"]["median"] / e["state_bytes"] if e["growth_bytes"] and e["state_bytes"] else None
        checks = [
            ("loop blocked <= 2% of torch.save", r["loop_blocked_vs_torch_save"], 0.02),
            (
                "loop blocked <= 1/5 of Lightning AsyncCheckpointIO",
                _ratio(e["loop_blocked_s"], lightning_async),
                0.2,
            ),
            ("time to durable <= 1.25x raw write+fsync", r["durable_vs_raw_write"], 1.25),
            ("peak extra host memory <= 1.1x state", r["peak_extra_vs_state"], 1.1),
            (
                f"memory growth over {e['growth_saves']} saves <= {FLAT_GROWTH:.0%} of state",
                growth,
                FLAT_GROWTH,
            ),
        ]
        throughput = e["train_throughput"]["median"] if e["train_throughput"] else None
        for label, value, limit in checks:
            rows.append(
                {
                    "contender": name,
                    "target": label,
                    "value": value,
                    "limit": limit,
                    "met": None if value is None else value <= limit,
                }
            )
        rows.append(
            {
                "contender": name,
                "target": "training throughput while writing >= 95%",
                "value": throughput,
                "limit": 0.95,
                "met": None if throughput is None else throughput >= 0.95,
            }
        )
    return rows


# -- rendering -----------------------------------------------------------------------------------


def _fmt(s: dict | None, scale: float = 1.0, digits: int = 2) -> str:
    if not s:
        return "n/a"
    med, lo, hi = (s[k] * scale for k in ("median", "min", "max"))
    if s["n"] == 1:
        return f"{med:.{digits}f}"
    return f"{med:.{digits}f} ({lo:.{digits}f}–{hi:.{digits}f})"


def _x(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}×"


def _header(data: dict[str, Any], summary: dict[str, Any]) -> list[str]:
    m, s, raw = data["machine"], data["settings"], summary["raw_disk"]
    load = f"{m['load_average_start'][0]:.2f} at start, {m['load_average_end'][0]:.2f} at end"
    return [
        "## Results",
        "",
        f"State: {summary_state_mib(summary):.0f} MiB (fp32 parameters + AdamW moments); "
        f"{s['repeats']} interleaved repetition(s), {s['saves']} timed saves per run after a warm-up save "
        f"({s['leak_saves']} in the first repetition, for the memory-growth check); every run in a fresh "
        "process. Values: median (min–max).",
        "",
        f"Machine: {m['cpu']}, {m['nproc']} CPUs (torch threads {m['torch_threads']}), "
        f"{m['ram_gib']} GiB RAM, disk {m['disk']}; Python {m['python']}, torch {m['torch']}, "
        f"lightning {m['lightning']}, accelerate {m['accelerate']}; CUDA: {m['cuda']}. "
        f"Load average {load}; the run took {m['wall_s']:.0f} s.",
        "",
        f"Raw disk, same bytes ({(raw['bytes'] or 0) / 2**20:.0f} MiB): "
        f"write + fsync {_fmt(raw['write_s'])} s "
        f"({_fmt(raw['write_mib_s'], digits=0)} MiB/s); read after eviction {_fmt(raw['read_s'])} s "
        f"({_fmt(raw['read_mib_s'], digits=0)} MiB/s).",
    ]


def _saving_rows(summary: dict[str, Any]) -> list[str]:
    lines = [
        "| contender | blocked at save (ms) | blocked until staged (ms) | loop stall while training (ms) "
        "| loop stall / torch.save | time to durable (s) | durable / raw write | write MiB/s | fsync |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, e in summary["contenders"].items():
        r = e["ratios"]
        stall = _fmt(e["stall_s"], 1000, 0) if e["background"] else "= blocked"
        cells = [
            name,
            _fmt(e["blocked_s"], 1000, 0),
            _fmt(e["staged_s"], 1000, 0),
            stall,
            _x(r["loop_blocked_vs_torch_save"], 3),
            _fmt(e["durable_s"]),
            _x(r["durable_vs_raw_write"]),
            _fmt(e["write_mib_s"], digits=0),
            "yes" if e["fsyncs"] else "no",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _other_rows(summary: dict[str, Any]) -> list[str]:
    lines = [
        "| contender | load (s) | load / torch.load | load / raw read | verified | peak extra memory (MiB) "
        "| peak / state | growth over repeated saves (MiB) | training throughput while writing |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, e in summary["contenders"].items():
        r = e["ratios"]
        growth = f"{_fmt(e['growth_bytes'], 2**-20, 0)} over {e['growth_saves']}" if e["growth_bytes"] else "n/a"
        throughput = _fmt(e["train_throughput"], 100, 0) + " %" if e["train_throughput"] else "n/a (sync)"
        cells = [
            name,
            _fmt(e["load_s"]),
            _x(r["load_vs_torch_load"]),
            _x(r["load_vs_raw_read"]),
            "yes" if e["load_verified"] else "NO",
            _fmt(e["peak_extra_bytes"], 2**-20, 0),
            _x(r["peak_extra_vs_state"]),
            growth,
            throughput,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def markdown(data: dict[str, Any], summary: dict[str, Any]) -> str:
    """The results as markdown: header (machine, settings, raw disk), three tables, what was not measured."""
    lines = _header(data, summary)
    lines += ["", "### Saving", "", *_saving_rows(summary)]
    lines += ["", "### Loading, memory, training", "", *_other_rows(summary)]
    lines += [
        "",
        "### Targets (dcp-plugin)",
        "",
        "| contender | target | measured | met |",
        "|---|---|---|---|",
    ]
    for row in summary["targets"]:
        value = "n/a" if row["value"] is None else f"{row['value']:.3f}"
        met = {True: "yes", False: "**no**", None: "n/a"}[row["met"]]
        lines.append(f"| {row['contender']} | {row['target']} | {value} | {met} |")
    failures = {n: e["failures"] for n, e in summary["contenders"].items() if e["failures"]}
    if failures or data["skipped"]:
        lines += ["", "### Not measured", ""]
        lines += [f"- {n}: skipped ({why})" for n, why in data["skipped"].items()]
        lines += [f"- {n}: {len(errs)} failed run(s): {errs[0]}" for n, errs in failures.items()]
    return "\n".join(lines) + "\n"


def summary_state_mib(summary: dict[str, Any]) -> float:
    sizes = [e["state_bytes"] for e in summary["contenders"].values() if e["state_bytes"]]
    return (sizes[0] if sizes else summary["raw_disk"]["bytes"] or 0) / 2**20


def chart(summary: dict[str, Any], path: str) -> None:
    """Two panels: how long the loop is blocked, and time until durable (raw disk as a line)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summary["contenders"])
    entries = [summary["contenders"][n] for n in names]
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 0.45 * len(names) + 2), sharey=True)
    for axis, key, title, scale in (
        (left, "loop_blocked_s", "training loop blocked per save (ms, log)", 1000.0),
        (right, "durable_s", "time until the checkpoint is written (s)", 1.0),
    ):
        med = [(e[key] or {}).get("median", 0) * scale for e in entries]
        lo = [m - (e[key] or {}).get("min", 0) * scale for m, e in zip(med, entries)]
        hi = [(e[key] or {}).get("max", 0) * scale - m for m, e in zip(med, entries)]
        colors = ["tab:green" if n.startswith(PLUGIN_PREFIX) else "tab:gray" for n in names]
        bars = axis.barh(range(len(names)), med, xerr=[lo, hi], color=colors, capsize=3)
        if key == "durable_s":
            for bar, entry in zip(bars, entries):
                if not entry["fsyncs"]:
                    bar.set_hatch("//")
                    bar.set_label("written, not fsynced")
        axis.set_title(title)
        axis.grid(axis="x", alpha=0.3)
    left.set_xscale("log")
    left.set_yticks(range(len(names)), names)
    left.invert_yaxis()
    raw = summary["raw_disk"]["write_s"]
    if raw:
        right.axvline(raw["median"], color="tab:red", linestyle="--", label="raw write + fsync, same bytes")
    handles, labels = right.get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    if unique:
        fig.legend(unique.values(), unique.keys(), loc="lower center", ncol=len(unique), frameon=False)
    fig.suptitle(f"Checkpointing a {summary_state_mib(summary):.0f} MiB model + AdamW state (medians, min–max)")
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(data: dict[str, Any], prefix: str) -> dict[str, str]:
    """Write ``<prefix>.json`` (runs + summary), ``<prefix>.md`` and ``<prefix>.png``; returns the paths."""
    summary = summarize(data)
    directory = os.path.dirname(os.path.abspath(prefix))
    os.makedirs(directory, exist_ok=True)
    paths = {"json": prefix + ".json", "markdown": prefix + ".md", "chart": prefix + ".png"}
    with open(paths["json"], "w", encoding="utf-8") as handle:
        json.dump({**data, "summary": summary}, handle, indent=1)
    with open(paths["markdown"], "w", encoding="utf-8") as handle:
        handle.write(markdown(data, summary))
    chart(summary, paths["chart"])
    return paths
