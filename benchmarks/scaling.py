"""The scaling benchmark: what saves and restores cost as jobs grow, a model fitted to it, and its projection to
1,000 and 10,000 ranks (docs/scaling.md).

    python benchmarks/scaling.py            # measure (1-8 ranks, a few minutes on a quiet 2-core host), fit, project,
                                            # write benchmarks/results/scaling.json and scaling-model.json, redraw
                                            # the charts and rewrite docs/scaling.md
    python benchmarks/scaling.py --quick    # smoke test: tiny states, 1-2 ranks, under a minute; writes
                                            # benchmarks/results/scaling-quick*.json only (or --out)
    python benchmarks/scaling.py --refit    # fit and project again from scaling.json (no measuring), then render
    python benchmarks/scaling.py --render   # charts and page from the two files only
    python benchmarks/scaling.py --check    # exit 1 if the model file, the charts or the page disagree with
                                            # scaling.json

How it measures: ``benchmarks/scaling_runs.py``; the model and its check against held-out measurements:
``benchmarks/scaling_model.py``; the cluster assumptions and projections: ``benchmarks/scaling_cluster.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import scaling_charts, scaling_cluster, scaling_model, scaling_page, scaling_runs  # noqa: E402
from benchmarks.charts import plotted  # noqa: E402
from benchmarks.figures import ROOT  # noqa: E402

MEASURED_DIGITS = 6
"""Significant digits kept of measured values (timers and CPU clocks say no more)."""
MODEL_DIGITS = 10
"""Significant digits kept of fitted values (``--check`` compares a refit within one part in a million)."""


def build_model(results: dict[str, Any]) -> dict[str, Any]:
    """The model file's content: the fit, its errors and the projections, from the results file's content."""
    fitted = scaling_model.fit(results)
    fitted["projections"] = scaling_cluster.project(fitted)
    return fitted


def write_json(path: Path, data: dict[str, Any], digits: int) -> None:
    """Write ``data`` with every float rounded to ``digits`` significant digits (smaller files, readable diffs)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_rounded(data, digits), indent=1, sort_keys=True) + "\n", encoding="utf-8")


def _rounded(value: Any, digits: int) -> Any:
    if isinstance(value, float):
        return float(f"{value:.{digits}g}")
    if isinstance(value, dict):
        return {key: _rounded(item, digits) for key, item in value.items()}
    if isinstance(value, list):
        return [_rounded(item, digits) for item in value]
    return value


def render(results: dict[str, Any], model: dict[str, Any]) -> None:
    """Redraw the charts and rewrite docs/scaling.md."""
    for path in scaling_charts.draw_all(results, model):
        print(f"drew {os.path.relpath(path, ROOT)}")
    if scaling_page.write(results, model):
        print(f"updated {os.path.relpath(scaling_page.PAGE, ROOT)}")


def check(results: dict[str, Any], model: dict[str, Any]) -> list[str]:
    """What disagrees with the results file: the model file, the charts, the page."""
    problems = []
    if not close(json.loads(json.dumps(build_model(results))), model):
        problems.append(f"{scaling_page.MODEL.name} is not what {scaling_page.RESULTS.name} gives: --refit")
    for name, data in scaling_charts.chart_data(results, model).items():
        path = scaling_charts.CHARTS / f"{name}.svg"
        if not path.exists() or plotted(path) != json.loads(json.dumps(data)):
            problems.append(f"{os.path.relpath(path, ROOT)}: not drawn from the scaling files: --render")
    if scaling_page.stale(results, model):
        problems.append(f"{os.path.relpath(scaling_page.PAGE, ROOT)}: its values differ from the files: --render")
    return problems


def close(a: Any, b: Any, rel: float = 1e-6) -> bool:
    """Whether two JSON values are equal, numbers within ``rel`` (a refit on another machine may differ in the last
    bits of a least-squares solution)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(close(a[k], b[k], rel) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(close(x, y, rel) for x, y in zip(a, b))
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return abs(a - b) <= rel * max(abs(a), abs(b), 1e-12)
    return a == b


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    what = parser.add_mutually_exclusive_group()
    what.add_argument("--quick", action="store_true", help="smoke test: tiny states, 1-2 ranks, one repetition")
    what.add_argument("--refit", action="store_true", help="fit and project from the results file, then render")
    what.add_argument("--render", action="store_true", help="only redraw the charts and rewrite the page")
    what.add_argument("--check", action="store_true", help="only check the model file, charts and page")
    parser.add_argument(
        "--out",
        type=Path,
        help="results file to write (default: benchmarks/results/scaling.json, or scaling-quick.json with --quick); "
        "the model goes beside it as <name>-model.json",
    )
    parser.add_argument("--dir", help="where checkpoints are written (default: the system's temporary directory)")
    args = parser.parse_args(argv)
    results_path = args.out or (scaling_page.RESULTS.with_name("scaling-quick.json") if args.quick else None)
    results_path = results_path or scaling_page.RESULTS
    model_path = results_path.with_name(results_path.stem + "-model.json")
    if args.check:
        problems = check(scaling_page.load(scaling_page.RESULTS), scaling_page.load(scaling_page.MODEL))
        print("\n".join(problems) or "the scaling model, charts and page agree with benchmarks/results/scaling.json")
        return 1 if problems else 0
    if not (args.refit or args.render):
        command = "python benchmarks/scaling.py" + (" --quick" if args.quick else "")
        results = scaling_runs.measure("quick" if args.quick else "full", args.dir, command=command)
        write_json(results_path, results, MEASURED_DIGITS)
        print(f"wrote {os.path.relpath(results_path.resolve(), ROOT)}")
    if not args.render:
        model = build_model(scaling_page.load(results_path))
        write_json(model_path, model, MODEL_DIGITS)
        print(f"wrote {os.path.relpath(model_path.resolve(), ROOT)}")
        summary = model["error_summary"]
        for key, entry in summary.items():
            if entry["median"] is not None:
                print(f"prediction error {key}: median {entry['median']:.0%}, max {entry['max']:.0%} (n={entry['n']})")
    if args.quick or results_path != scaling_page.RESULTS:
        return 0  # a smoke test or a side run never rewrites the documentation
    render(scaling_page.load(scaling_page.RESULTS), scaling_page.load(scaling_page.MODEL))
    return 0


if __name__ == "__main__":
    sys.exit(main())
