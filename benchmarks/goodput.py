"""Goodput: how much longer training takes because it checkpoints, for every contender side by side.

    python benchmarks/goodput.py                       # 400 MiB state, save every 8 steps, 48 steps, 3 reps
    python benchmarks/goodput.py --every 32 --steps 96 # the rarely-saving case
    python benchmarks/goodput.py --state-mib 8 --steps 8 --every 4 --repeats 1   # a quick look

Each (contender, repetition) runs the same loop in a fresh process (``python -m benchmarks.goodput_worker``):
an MLP + AdamW of ``--state-mib`` MiB, ``--steps`` training steps, a save after every ``--every``-th step. The
loop's wall time is compared with the same loop without checkpoints ("no checkpoints"), measured in the same
repetitions; the order of contenders rotates between repetitions. Reported: extra training time (median of the
repetitions, as a percentage of the baseline), the median stall per save (how long ``save`` plus any staging
wait kept the loop from stepping), and the time the last write needed after the loop ended. Every contender
takes one warm-up save before the timed loop (first-save costs such as starting a writer process are the
benchmark's other figure). Outputs ``<out>.json`` and ``<out>.md``.

Every run pins glibc's malloc thresholds (``--malloc-defaults`` leaves them adaptive): with the adaptive
defaults, a loop that frees large gradients and optimizer temporaries every step either keeps them in the heap
or gets them afresh from the kernel every step (tens of thousands of page faults, about 2x slower on a 2-core
host), depending on where the heap's last live block happens to lie. Any allocation, a save's included, can flip
that, so runs of one contender differed by 2x. The minor page faults per step of each run are reported.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import machine  # noqa: E402
from benchmarks.contenders import CONTENDERS  # noqa: E402

BASELINE = "no checkpoints"
DEFAULT_CONTENDERS = [
    "Lightning AsyncCheckpointIO",
    "dcp.async_save",
    "dcp.async_save process",
    "dcp-plugin thread",
    "dcp-plugin thread+staging",
    "dcp-plugin process+staging",
]


STEADY_MALLOC = {"MALLOC_TRIM_THRESHOLD_": str(2**36), "MALLOC_MMAP_THRESHOLD_": str(32 * 2**20)}
"""glibc malloc settings for every run: freed memory stays in the heap, blocks up to 32 MiB come from it."""


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--state-mib", type=float, default=400.0)
    parser.add_argument("--steps", type=int, default=48)
    parser.add_argument("--every", type=int, default=8, help="save after every N-th step")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--contender", action="append", dest="contenders", help="repeatable; default: the key ones")
    parser.add_argument(
        "--omp-wait-policy",
        choices=["ACTIVE", "PASSIVE"],
        help="OMP_WAIT_POLICY for every run (default: inherited). On a busy host, OpenMP's spin-waiting makes the "
        "loop's speed depend on how many OpenMP thread teams the process has (a background staging thread adds one "
        "and throttles the spinning): PASSIVE gives every contender the same footing",
    )
    parser.add_argument(
        "--malloc-defaults",
        action="store_true",
        help="leave glibc's malloc thresholds to adapt as they do by default. Without this flag every run (the "
        "baseline too) pins them (MALLOC_TRIM_THRESHOLD_, MALLOC_MMAP_THRESHOLD_): with the adaptive defaults, "
        "whether a training step faults its freed gradients and optimizer temporaries back in (about 2x slower "
        "here) depends on where the heap's last live block happens to be, and any allocation, a save's included, "
        "can flip it; runs then differ by 2x for reasons that are not the checkpoint's cost",
    )
    parser.add_argument("--dir", help="where checkpoints are written (default: a temporary directory)")
    parser.add_argument("--out", default="benchmarks/results/goodput")
    args = parser.parse_args(argv)
    unknown = [c for c in args.contenders or [] if c not in CONTENDERS]
    if unknown:
        parser.error(f"unknown contender(s) {unknown}; choose from: {', '.join(CONTENDERS)}")
    if args.steps < 1 or args.every < 1 or args.repeats < 1 or args.state_mib <= 0:
        parser.error("--steps, --every and --repeats must be >= 1 and --state-mib > 0")
    return args


def run_once(name: str, args: argparse.Namespace, directory: str) -> dict[str, Any]:
    spec = {
        "contender": None if name == BASELINE else name,
        "state_bytes": int(args.state_mib * 2**20),
        "steps": args.steps,
        "every": args.every,
        "directory": directory,
    }
    os.makedirs(directory, exist_ok=True)
    env = dict(os.environ)
    if args.omp_wait_policy:
        env["OMP_WAIT_POLICY"] = args.omp_wait_policy
    if not args.malloc_defaults:
        env.update(STEADY_MALLOC)
    try:
        done = subprocess.run(
            [sys.executable, "-m", "benchmarks.goodput_worker", json.dumps(spec)],
            capture_output=True,
            text=True,
            timeout=3600,
            env=env,
            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        )
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    if done.returncode != 0:
        return {"error": (done.stderr or done.stdout).strip().splitlines()[-1:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def summarise(runs: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    ok = {name: [r for r in results if "error" not in r] for name, results in runs.items()}
    base = statistics.median(r["train_s"] for r in ok[BASELINE]) if ok[BASELINE] else None
    fastest_base = min(r["train_s"] for r in ok[BASELINE]) if ok[BASELINE] else None
    summary = {}
    for name, results in ok.items():
        if not results:
            summary[name] = {"error": runs[name][0].get("error")}
            continue
        train = statistics.median(r["train_s"] for r in results)
        stalls = [s for r in results for s in r["stalls_s"]]
        summary[name] = {
            "train_s": train,
            "train_range_s": [min(r["train_s"] for r in results), max(r["train_s"] for r in results)],
            "extra": (train / base - 1.0) if base else None,
            # A shared host only ever slows a run down: the fastest runs are the least disturbed ones.
            "extra_fastest": (min(r["train_s"] for r in results) / fastest_base - 1.0) if fastest_base else None,
            "stall_per_save_s": statistics.median(stalls) if stalls else 0.0,
            "drain_s": statistics.median(r["drain_s"] for r in results),
            "faults_per_step": statistics.median(r.get("faults_per_step", 0) for r in results),
            "saves": results[0]["saves"],
        }
    return summary


def markdown(args: argparse.Namespace, summary: dict[str, dict[str, Any]]) -> str:
    lines = [
        f"State {args.state_mib:g} MiB (MLP + AdamW), {args.steps} steps, a save every {args.every} steps, "
        f"{args.repeats} interleaved repetition(s), each run in a fresh process"
        + (f", OMP_WAIT_POLICY={args.omp_wait_policy}" if args.omp_wait_policy else "")
        + (", glibc's adaptive malloc thresholds" if args.malloc_defaults else ", malloc thresholds pinned")
        + ". Median (min–max); 'extra, fastest runs' compares the fastest run of each (a shared host only ever "
        "slows a run down).",
        "",
        "| contender | training time (s) | extra training time | extra, fastest runs | stall per save (ms) "
        "| last write after the loop (s) | page faults per step |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, row in summary.items():
        if "error" in row:
            lines.append(f"| {name} | failed: {row['error']} | | | | | |")
            continue
        low, high = row["train_range_s"]
        extra = "baseline" if name == BASELINE else f"{row['extra'] * 100:+.1f} %"
        fastest = "baseline" if name == BASELINE else f"{row['extra_fastest'] * 100:+.1f} %"
        lines.append(
            f"| {name} | {row['train_s']:.2f} ({low:.2f}–{high:.2f}) | {extra} | {fastest} | "
            f"{row['stall_per_save_s'] * 1000:.0f} | {row['drain_s']:.2f} | {row['faults_per_step']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    names = [BASELINE, *(args.contenders or DEFAULT_CONTENDERS)]
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    base_dir = args.dir or tempfile.mkdtemp(prefix="goodput-")
    started = time.monotonic()
    for rep in range(args.repeats):
        order = names[rep % len(names) :] + names[: rep % len(names)]
        for name in order:
            result = run_once(name, args, os.path.join(base_dir, f"run-{rep}"))
            runs[name].append(result)
            shown = result.get("error") or f"{result['train_s']:.2f} s"
            print(f"[{time.monotonic() - started:6.0f}s] rep {rep + 1}/{args.repeats} {name}: {shown}", flush=True)
    summary = summarise(runs)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(f"{args.out}.json", "w") as handle:
        described = machine.describe(base_dir)
        json.dump({"settings": vars(args), "machine": described, "runs": runs, "summary": summary}, handle, indent=1)
    text = markdown(args, summary)
    with open(f"{args.out}.md", "w") as handle:
        handle.write(text)
    print(text)
    print(f"wrote {args.out}.json and {args.out}.md")
    return 0 if all("error" not in row for row in summary.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
