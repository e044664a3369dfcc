"""The figures the documentation quotes: one results file, one definition for each figure, and the pages rendered
from it.

``benchmarks/results/headline.json`` holds the measured medians of one benchmark run per question (how long a save
stalls the loop, how much longer training takes, when the checkpoint is durable, how fast a run restores) and where
each came from. Everything derived from them (ratios, percentages, rounding) is defined once here, in
:func:`figures`. Pages carry the figures between markers that this module rewrites and the docs test checks:

- inline: ``<!-- fig goodput.plugin.extra -->+23.8 %<!-- /fig -->``
- a block (tables): ``<!-- figures table:stall -->``, a blank line, the generated markdown, a blank line,
  ``<!-- /figures -->``.

``python benchmarks/headline.py`` measures and regenerates everything; see its docstring.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "headline.json"
PAGES = [*sorted((ROOT / "docs").glob("*.md")), ROOT / "README.md"]
CHARTS = ROOT / "docs" / "figures"

CONTENDERS = {
    "torch.save": ("torch_save", "torch.save"),
    "Lightning AsyncCheckpointIO": ("lightning_async", "Lightning AsyncCheckpointIO"),
    "dcp.async_save": ("dcp_async", "dcp.async_save"),
    "dcp.async_save process": ("dcp_async_process", "dcp.async_save, writer process"),
    "dcp-plugin thread+staging": ("plugin", "dcp-plugin (defaults)"),
    "dcp-plugin thread": ("plugin_no_staging", "dcp-plugin, async_staging=False"),
    "dcp-plugin process+staging": ("plugin_process", "dcp-plugin, process mode"),
}
"""Benchmark contender name -> (id used in figure keys, label shown to readers)."""
LABELS = {key: label for key, label in CONTENDERS.values()}
BASELINE = "torch_save"
"""The contender stalls are compared with (the same run)."""

DEFINITIONS = {
    "stall": (
        "**Stall per save**: how long one save keeps the training loop from stepping (the `save` call, plus, with "
        "asynchronous staging, the wait for the snapshot copy before the next optimizer step), measured while "
        "training continues; median over the timed saves of every repetition. `/ torch.save`: against `torch.save` "
        "of the same state in the same run."
    ),
    "goodput": (
        "**Extra training time**: how much longer the same training loop takes with checkpoints than without them, "
        "as a percentage of the loop without checkpoints; medians of interleaved repetitions, every run in a fresh "
        "process."
    ),
    "durable": (
        "**Time to durable**: from the `save` call until the checkpoint is completely written, fsynced where the "
        "contender fsyncs (`torch.save` and Lightning stop at the page cache); median. `/ raw write`: against a "
        "plain write + fsync of the same bytes in the same run."
    ),
    "restore": (
        "**Time to restore**: from a fresh process with the checkpoint's pages out of the cache until the end of "
        "the first training step after loading (a load that defers its reads pays them in that step)."
    ),
}
"""One definition per figure, shown on the benchmarks page."""


# -- the results file: built from the benchmarks' own outputs ----------------------------------------------------


def saves_section(raw: dict[str, Any], source: str, measured: str) -> dict[str, Any]:
    """The stall and durability medians of one ``benchmarks/run.py`` output."""
    summary, settings = raw["summary"], raw["settings"]
    contenders = {}
    for name, entry in summary["contenders"].items():
        if name not in CONTENDERS or not entry.get("loop_blocked_s"):
            continue
        contenders[CONTENDERS[name][0]] = {
            "name": name,
            "stall_s": entry["loop_blocked_s"]["median"],
            "durable_s": entry["durable_s"]["median"],
            "fsync": bool(entry["fsyncs"]),
        }
    names = " ".join(f'--contender "{n}"' for n in settings["contenders"])
    return {
        "source": source,
        "measured": measured,
        "command": f"python benchmarks/run.py --state-mib {settings['state_mib']:g} --repeats {settings['repeats']} "
        f"--saves {settings['saves']} --leak-saves {settings['leak_saves']} {names}",
        "state_mib": settings["state_mib"],
        "repeats": settings["repeats"],
        "raw_write_s": summary["raw_disk"]["write_s"]["median"],
        "contenders": contenders,
    }


def goodput_section(raw: dict[str, Any], source: str, measured: str) -> dict[str, Any]:
    """The training times of one ``benchmarks/goodput.py`` output (the loop without checkpoints as the base)."""
    settings, summary = raw["settings"], raw["summary"]
    contenders = {
        CONTENDERS[name][0]: {"name": name, "train_s": row["train_s"]}
        for name, row in summary.items()
        if name in CONTENDERS and "train_s" in row
    }
    names = " ".join(f'--contender "{n}"' for n in settings["contenders"] or [])
    return {
        "source": source,
        "measured": measured,
        "command": f"python benchmarks/goodput.py --state-mib {settings['state_mib']:g} --steps {settings['steps']} "
        f"--every {settings['every']} --repeats {settings['repeats']} {names}".rstrip(),
        "state_mib": settings["state_mib"],
        "steps": settings["steps"],
        "every": settings["every"],
        "repeats": settings["repeats"],
        "baseline_s": summary["no checkpoints"]["train_s"],
        "contenders": contenders,
    }


def machine_of(raw: dict[str, Any]) -> dict[str, Any]:
    """What the results file says about the machine, from a ``benchmarks/run.py`` output."""
    m = raw["machine"]
    disk = re.sub(r", [^,]* free\)$", ")", str(m.get("disk", "unknown")))
    keep = ("cpu", "nproc", "ram_gib", "python", "torch", "lightning", "accelerate", "cuda")
    return {**{key: m.get(key) for key in keep}, "disk": disk}


def load(path: Path = RESULTS) -> dict[str, Any]:
    """The results file."""
    return json.loads(path.read_text(encoding="utf-8"))


# -- every figure, defined once ------------------------------------------------------------------------------------


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms"


def _times(ratio: float) -> str:
    return f"{ratio:.2f}×"


def _percent(fraction: float) -> str:
    return f"{fraction * 100:+.1f} %"


def figures(results: dict[str, Any]) -> dict[str, str]:
    """Every figure a page may quote, by key, formatted as pages show it (the one definition of each)."""
    out: dict[str, str] = {}
    m = results["machine"]
    gpu = "a CUDA GPU" if m.get("cuda") else "no GPU"
    out["machine"] = (
        f"{m['cpu']}, {m['nproc']} CPUs, {m['ram_gib']} GiB RAM, {gpu}, disk {m['disk']}; Python {m['python']}, "
        f"torch {m['torch']}, Lightning {m['lightning']}, Accelerate {m['accelerate']}"
    )
    saves = results["saves"]
    out["saves.measured"] = saves["measured"]
    out["saves.state"] = f"{saves['state_mib']:g} MiB"
    out["saves.repeats"] = str(saves["repeats"])
    base = saves["contenders"][BASELINE]["stall_s"]
    for key, entry in saves["contenders"].items():
        out[f"saves.{key}.stall"] = _ms(entry["stall_s"])
        out[f"saves.{key}.stall_vs_torch_save"] = _times(entry["stall_s"] / base)
        out[f"saves.{key}.durable"] = f"{entry['durable_s']:.2f} s"
        out[f"saves.{key}.durable_vs_raw_write"] = _times(entry["durable_s"] / saves["raw_write_s"])
    out["saves.raw_write"] = f"{saves['raw_write_s']:.2f} s"
    for section in ("goodput", "goodput_rare"):
        goodput = results[section]
        out[f"{section}.measured"] = goodput["measured"]
        out[f"{section}.state"] = f"{goodput['state_mib']:g} MiB"
        out[f"{section}.every"] = str(goodput["every"])
        out[f"{section}.steps"] = str(goodput["steps"])
        out[f"{section}.repeats"] = str(goodput["repeats"])
        for key in goodput["contenders"]:
            out[f"{section}.{key}.extra"] = _percent(extra(goodput, key))
    out["restore.status"] = (
        "not measured yet" if results.get("restore") is None else f"measured {results['restore']['measured']}"
    )
    return out


def extra(goodput: dict[str, Any], key: str) -> float:
    """Extra training time of one contender of a goodput section, as a fraction of the loop without checkpoints."""
    return goodput["contenders"][key]["train_s"] / goodput["baseline_s"] - 1.0


def tables(results: dict[str, Any]) -> dict[str, str]:
    """The generated markdown blocks, by key (``table:...``)."""
    values = figures(results)
    saves = results["saves"]
    stall = ["| contender | stall per save | / torch.save |", "|---|---:|---:|"]
    durable = ["| contender | time to durable | / raw write + fsync | fsynced |", "|---|---:|---:|---|"]
    for key in sorted(saves["contenders"], key=lambda k: saves["contenders"][k]["stall_s"]):
        ratio = values[f"saves.{key}.stall_vs_torch_save"]
        stall.append(f"| {LABELS[key]} | {values[f'saves.{key}.stall']} | {ratio} |")
    for key, entry in sorted(saves["contenders"].items(), key=lambda item: item[1]["durable_s"]):
        fsynced = "yes" if entry["fsync"] else "no"
        durable.append(
            f"| {LABELS[key]} | {values[f'saves.{key}.durable']} | {values[f'saves.{key}.durable_vs_raw_write']} "
            f"| {fsynced} |"
        )
    blocks = {"table:stall": "\n".join(stall), "table:durable": "\n".join(durable)}
    goodput = ["| contender | every " + values["goodput.every"] + " steps | every " + values["goodput_rare.every"]
               + " steps |", "|---|---:|---:|"]  # fmt: skip
    keys = sorted(results["goodput"]["contenders"], key=lambda k: extra(results["goodput"], k))
    keys += [k for k in results["goodput_rare"]["contenders"] if k not in keys]
    for key in keys:
        cells = [values.get(f"{section}.{key}.extra", "not run") for section in ("goodput", "goodput_rare")]
        goodput.append(f"| {LABELS[key]} | {cells[0]} | {cells[1]} |")
    blocks["table:goodput"] = "\n".join(goodput)
    restore = results.get("restore")
    if restore is None:
        blocks["table:restore"] = (
            "*Not measured yet.* `benchmarks/results/headline.json` has no restore section; the page fills this "
            "slot from it once a restore benchmark has written one (`python benchmarks/headline.py --from "
            "restore=FILE`)."
        )
    else:
        rows = ["| contender | time to restore |", "|---|---:|"]
        rows += [f"| {LABELS[k]} | {e['restore_s']:.2f} s |" for k, e in restore["contenders"].items()]
        blocks["table:restore"] = "\n".join(rows)
    contenders = {
        key
        for section in ("saves", "goodput", "goodput_rare", "restore")
        for key in (results.get(section) or {}).get("contenders", {})
    }
    described = ["| contender | what it is |", "|---|---|"]
    described += [f"| {LABELS[key]} | {DESCRIPTIONS[key]} |" for key in LABELS if key in contenders]
    blocks["table:contenders"] = "\n".join(described)
    blocks["definitions"] = "\n".join(f"- {text}" for text in DEFINITIONS.values())
    blocks["commands"] = "\n".join(
        f"    {results[section]['command']}" for section in ("saves", "goodput", "goodput_rare") if results.get(section)
    )
    return blocks


DESCRIPTIONS = {
    "torch_save": "`torch.save` of the model's and optimizer's state dicts, into the page cache (no fsync)",
    "lightning_async": "Lightning's `AsyncCheckpointIO` around its default plugin: clones the state, writes in a "
    "thread",
    "dcp_async": "`torch.distributed.checkpoint.async_save` with its defaults (a thread, a new staging copy each save)",
    "dcp_async_process": "`dcp.async_save` in DCP's writer process with one reused shared-memory stager: plain "
    "DCP's best recipe",
    "plugin": "`CheckpointManager(dir)`: a writer thread, the snapshot copied in the background into reused buffers",
    "plugin_no_staging": "`CheckpointManager(dir, async_staging=False)`: the snapshot copied before `save` returns",
    "plugin_process": '`CheckpointManager(dir, async_mode="process")`: the write in a background process',
}
"""What each contender is, in the terms a user would write it."""


# -- pages ---------------------------------------------------------------------------------------------------------

INLINE = re.compile(r"<!-- fig (?P<key>[\w.:-]+) -->(?P<value>.*?)<!-- /fig -->")
BLOCK = re.compile(r"<!-- figures (?P<key>[\w.:-]+) -->\n(?P<body>.*?)\n<!-- /figures -->", re.S)


class UnknownFigure(KeyError):
    """A page names a figure the results file does not define."""


def render(text: str, results: dict[str, Any]) -> str:
    """``text`` with every marked figure and block rewritten from ``results``."""
    values, blocks = figures(results), tables(results)

    def inline(match: re.Match[str]) -> str:
        key = match["key"]
        if key not in values:
            raise UnknownFigure(f"no figure {key!r} in {RESULTS.name}; known: {', '.join(sorted(values))}")
        return f"<!-- fig {key} -->{values[key]}<!-- /fig -->"

    def block(match: re.Match[str]) -> str:
        key = match["key"]
        if key not in blocks:
            raise UnknownFigure(f"no block {key!r}; known: {', '.join(sorted(blocks))}")
        return f"<!-- figures {key} -->\n\n{blocks[key]}\n\n<!-- /figures -->"

    return INLINE.sub(inline, BLOCK.sub(block, text))


def stale_pages(results: dict[str, Any], pages: list[Path] = PAGES) -> list[Path]:
    """The pages whose marked figures differ from what ``results`` gives."""
    return [page for page in pages if render(page.read_text(encoding="utf-8"), results) != page.read_text("utf-8")]


def write_pages(results: dict[str, Any], pages: list[Path] = PAGES) -> list[Path]:
    """Rewrite the marked figures of every page; returns the pages that changed."""
    changed = stale_pages(results, pages)
    for page in changed:
        page.write_text(render(page.read_text(encoding="utf-8"), results), encoding="utf-8")
    return changed


__all__ = [
    "CHARTS",
    "DEFINITIONS",
    "LABELS",
    "RESULTS",
    "figures",
    "goodput_section",
    "load",
    "machine_of",
    "render",
    "saves_section",
    "stale_pages",
    "tables",
    "write_pages",
]
