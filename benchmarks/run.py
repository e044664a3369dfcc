"""Benchmark dcp-plugin side by side with torch.save, Lightning, Accelerate and plain DCP.

    python benchmarks/run.py            # default: 1 GiB state, 3 interleaved repetitions (tens of minutes)
    python benchmarks/run.py --quick    # 128 MiB, one repetition (a couple of minutes)

Writes <out>.json, <out>.md and <out>.png (default benchmarks/results/latest.*).
"""

from __future__ import annotations

import argparse
import os
import sys

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import report, runner  # noqa: E402
from benchmarks.contenders import CONTENDERS  # noqa: E402
from benchmarks.settings import QUICK, BenchSettings, SettingsError  # noqa: E402


def parse(argv: list[str] | None = None) -> BenchSettings:
    defaults = BenchSettings()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small state, one repetition: " + str(QUICK))
    parser.add_argument("--state-mib", type=float, help=f"state size in MiB (default {defaults.state_mib:g})")
    parser.add_argument("--repeats", type=int, help=f"interleaved repetitions (default {defaults.repeats})")
    parser.add_argument("--saves", type=int, help=f"timed saves per run (default {defaults.saves})")
    parser.add_argument(
        "--leak-saves",
        type=int,
        help=f"saves per run in the first repetition (default {defaults.leak_saves})",
    )
    parser.add_argument("--train-steps", type=int, help=f"baseline training steps (default {defaults.train_steps})")
    parser.add_argument(
        "--overlap-saves", type=int, help=f"saves overlapped with training (default {defaults.overlap_saves})"
    )
    parser.add_argument(
        "--contender",
        action="append",
        dest="contenders",
        metavar="NAME",
        help="run only this contender (repeatable); --list shows the names",
    )
    parser.add_argument("--dir", dest="directory", help="where to write checkpoints (default: the temp directory)")
    parser.add_argument("--out", help=f"output prefix (default {defaults.out})")
    parser.add_argument("--list", action="store_true", help="list the contenders and exit")
    args = parser.parse_args(argv)
    if args.list:
        for name, info in CONTENDERS.items():
            reason = info.unavailable()
            print(f"{name:30s} {info.description}" + (f"  [unavailable: {reason}]" if reason else ""))
        raise SystemExit(0)
    unknown = [name for name in args.contenders or [] if name not in CONTENDERS]
    if unknown:
        parser.error(f"unknown contender(s) {unknown}; choose from: {', '.join(CONTENDERS)}")
    values = dict(QUICK) if args.quick else {}
    for key in (
        "state_mib",
        "repeats",
        "saves",
        "leak_saves",
        "train_steps",
        "overlap_saves",
        "contenders",
        "directory",
        "out",
    ):
        if getattr(args, key) is not None:
            values[key] = getattr(args, key)
    if args.quick and args.leak_saves is None and "saves" in values:
        values["leak_saves"] = max(values["leak_saves"], values["saves"])
    try:
        return BenchSettings(**values)
    except SettingsError as err:
        parser.error(str(err))
        raise


def main(argv: list[str] | None = None) -> int:
    settings = parse(argv)
    try:
        data = runner.run(
            settings,
            log=lambda line: print(line, flush=True),
            after_repetition=lambda partial: report.write_outputs(partial, settings.out),
        )
    except SettingsError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    paths = report.write_outputs(data, settings.out)
    with open(paths["markdown"], encoding="utf-8") as handle:
        print(handle.read())
    print("wrote " + ", ".join(paths.values()))
    failed = [r for r in data["runs"] if not r.get("ok")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
