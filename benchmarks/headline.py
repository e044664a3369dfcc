"""Regenerate the documentation's benchmark figures: measure, write the results file, redraw, rewrite the pages.

    python3 -m nox -s figures                     # the one command: everything below, in the nox environment
    python benchmarks/headline.py                 # measure (about an hour on a 2-core host), then write it all
    python benchmarks/headline.py --render        # charts and pages from benchmarks/results/headline.json only
    python benchmarks/headline.py --check         # exit 1 if a page or chart disagrees with the results file
    python benchmarks/headline.py --from saves=RUN.json goodput=GOODPUT.json goodput_rare=GOODPUT32.json \\
        --measured saves=2026-11-30 ...           # build the results file from runs made earlier, then render

Measuring runs ``benchmarks/run.py`` (stall and time to durable, key contenders) and ``benchmarks/goodput.py``
twice (a save every 8 and every 32 steps); their outputs are kept as ``benchmarks/results/headline-*.json`` and
named in the results file. A restore benchmark has no section yet: ``--from restore=FILE`` fills the slot the
pages already show, from a file whose ``summary`` maps contender names to ``{"restore_s": ...}``. Run it on a
quiet machine: the figures are medians of a few repetitions and only ratios measured in the same run compare.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import charts  # noqa: E402
from benchmarks.figures import (  # noqa: E402
    CONTENDERS,
    RESULTS,
    ROOT,
    goodput_section,
    machine_of,
    saves_section,
    stale_pages,
    write_pages,
)

KEY_CONTENDERS = [
    "torch.save",
    "Lightning AsyncCheckpointIO",
    "dcp.async_save",
    "dcp-plugin thread",
    "dcp-plugin thread+staging",
    "dcp-plugin process+staging",
]
GOODPUT_CONTENDERS = [
    "dcp.async_save process",
    "dcp.async_save",
    "dcp-plugin thread",
    "dcp-plugin thread+staging",
    "dcp-plugin process+staging",
]
MEASUREMENTS = {
    "saves": ["benchmarks/run.py", "--state-mib", "512", "--repeats", "2", "--saves", "2", "--leak-saves", "10"]
    + [arg for name in KEY_CONTENDERS for arg in ("--contender", name)],
    "goodput": ["benchmarks/goodput.py", "--repeats", "5"]
    + [arg for name in GOODPUT_CONTENDERS for arg in ("--contender", name)],
    "goodput_rare": ["benchmarks/goodput.py", "--repeats", "5", "--every", "32", "--steps", "96"]
    + [arg for name in GOODPUT_CONTENDERS for arg in ("--contender", name)],
}
"""What each section of the results file is measured with (``--out benchmarks/results/headline-<section>``)."""


def measure() -> dict[str, Path]:
    """Run every measurement; returns each section's output file."""
    outputs = {}
    for section, command in MEASUREMENTS.items():
        out = ROOT / "benchmarks" / "results" / f"headline-{section.replace('_', '-')}"
        print(f"== {section}: {' '.join(command)}", flush=True)
        subprocess.run([sys.executable, *command, "--out", str(out)], cwd=ROOT, check=True)
        outputs[section] = out.with_suffix(".json")
    return outputs


def build(sources: dict[str, Path], measured: dict[str, str]) -> dict[str, Any]:
    """The results file's content from benchmark outputs (``saves``, ``goodput``, ``goodput_rare``, ``restore``)."""
    today = time.strftime("%Y-%m-%d")

    def read(section: str) -> tuple[dict[str, Any], str, str]:
        path = sources[section]
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
        date = measured.get(section) or raw.get("machine", {}).get("date") or today
        return raw, os.path.relpath(path, ROOT), date

    saves_raw, source, date = read("saves")
    results: dict[str, Any] = {
        "about": "The benchmark figures the documentation quotes. Regenerate with `python3 -m nox -s figures`; "
        "see benchmarks/headline.py and benchmarks/figures.py (the definition of every figure).",
        "machine": machine_of(saves_raw),
        "saves": saves_section(saves_raw, source, date),
    }
    for section in ("goodput", "goodput_rare"):
        results[section] = goodput_section(*read(section))
    results["restore"] = restore_section(*read("restore")) if "restore" in sources else None
    return results


def restore_section(raw: dict[str, Any], source: str, measured: str) -> dict[str, Any]:
    """Restore times from a benchmark output whose ``summary`` maps contender names to ``{"restore_s": ...}``."""
    contenders = {
        CONTENDERS[name][0]: {"name": name, "restore_s": row["restore_s"]}
        for name, row in raw["summary"].items()
        if name in CONTENDERS and "restore_s" in row
    }
    return {"source": source, "measured": measured, "contenders": contenders}


def render(results: dict[str, Any]) -> None:
    """Draw the charts and rewrite the pages from ``results``."""
    for path in charts.draw_all(results):
        print(f"drew {os.path.relpath(path, ROOT)}")
    for page in write_pages(results):
        print(f"updated {os.path.relpath(page, ROOT)}")


def check(results: dict[str, Any]) -> list[str]:
    """What disagrees with the results file: pages and charts."""
    problems = [f"{os.path.relpath(p, ROOT)}: its figures differ from {RESULTS.name}" for p in stale_pages(results)]
    for name, data in charts.chart_data(results).items():
        path = charts.CHARTS / f"{name}.svg"
        if not path.exists() or charts.plotted(path) != json.loads(json.dumps(data)):
            problems.append(f"{os.path.relpath(path, ROOT)}: not drawn from {RESULTS.name}")
    return problems


def _pairs(values: list[str], flag: str) -> dict[str, str]:
    pairs = {}
    for value in values:
        key, sep, rest = value.partition("=")
        if not sep or not rest:
            raise SystemExit(f"{flag} takes SECTION=VALUE, e.g. saves=benchmarks/results/run.json (got {value!r})")
        pairs[key] = rest
    return pairs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    what = parser.add_mutually_exclusive_group()
    what.add_argument("--render", action="store_true", help="only redraw the charts and rewrite the pages")
    what.add_argument("--check", action="store_true", help="only check the pages and charts against the file")
    what.add_argument("--from", dest="sources", nargs="+", metavar="SECTION=FILE", help="build from earlier runs")
    parser.add_argument("--measured", nargs="+", default=[], metavar="SECTION=DATE", help="with --from: dates")
    args = parser.parse_args(argv)
    if args.check:
        problems = check(json.loads(RESULTS.read_text(encoding="utf-8")))
        print("\n".join(problems) or f"every page and chart agrees with {RESULTS.name}")
        return 1 if problems else 0
    if not args.render:
        sources = {k: Path(v) for k, v in _pairs(args.sources, "--from").items()} if args.sources else measure()
        missing = {"saves", "goodput", "goodput_rare"} - set(sources)
        if missing:
            parser.error(f"--from needs saves=, goodput= and goodput_rare= (missing: {', '.join(sorted(missing))})")
        results = build(sources, _pairs(args.measured, "--measured"))
        RESULTS.write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
        print(f"wrote {os.path.relpath(RESULTS, ROOT)}")
    render(json.loads(RESULTS.read_text(encoding="utf-8")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
