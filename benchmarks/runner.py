"""Runs every contender in a fresh process, interleaved across repetitions, sampling host memory."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

from benchmarks import diskio, machine
from benchmarks.contenders import CONTENDERS, RAW_DISK
from benchmarks.memory import Sampler
from benchmarks.settings import BenchSettings, SettingsError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def select(settings: BenchSettings) -> tuple[list[str], dict[str, str]]:
    """(contenders to run, {skipped contender: reason})."""
    unknown = [name for name in settings.contenders if name not in CONTENDERS]
    if unknown:
        raise SettingsError(f"Unknown contender(s) {unknown}; known: {', '.join(CONTENDERS)}.")
    wanted = settings.contenders or list(CONTENDERS)
    chosen, skipped = [], {}
    for name in wanted:
        reason = CONTENDERS[name].unavailable()
        if reason:
            skipped[name] = reason
        else:
            chosen.append(name)
    return chosen, skipped


def run(
    settings: BenchSettings,
    log: Callable[[str], None] = print,
    after_repetition: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Measure everything; returns the raw data the report is built from.

    ``after_repetition`` receives the data so far after each repetition (to write interim results).
    """
    names, skipped = select(settings)
    for name, reason in skipped.items():
        log(f"skipping {name}: {reason}")
    parent = settings.directory or tempfile.gettempdir()
    os.makedirs(parent, exist_ok=True)
    root = tempfile.mkdtemp(prefix="dcp-bench-", dir=parent)
    info = machine.describe(root)
    order = [RAW_DISK, *names]
    runs: list[dict[str, Any]] = []
    started = time.monotonic()
    try:
        for rep in range(settings.repeats):
            shift = rep % len(order)
            for name in order[shift:] + order[:shift]:
                saves = settings.leak_saves if rep == 0 and name != RAW_DISK else settings.saves
                result = _run_one(settings, name, rep, saves, root)
                runs.append(result)
                status = "ok" if result.get("ok") else f"FAILED: {result.get('error')}"
                log(f"[{time.monotonic() - started:6.0f}s] rep {rep + 1}/{settings.repeats} {name}: {status}")
            if after_repetition is not None and rep + 1 < settings.repeats:
                after_repetition(_data(settings, info, names, skipped, runs, started, rep + 1))
    finally:
        diskio.remove(root)
    return _data(settings, info, names, skipped, runs, started, settings.repeats)


def _data(
    settings: BenchSettings,
    info: dict[str, Any],
    names: list[str],
    skipped: dict[str, str],
    runs: list[dict[str, Any]],
    started: float,
    repeats_done: int,
) -> dict[str, Any]:
    info = dict(info, load_average_end=list(os.getloadavg()), wall_s=round(time.monotonic() - started, 1))
    return {
        "settings": dict(vars(settings), repeats=repeats_done),
        "machine": info,
        "contenders": {n: _describe_contender(n) for n in names},
        "skipped": skipped,
        "runs": list(runs),
    }


def _describe_contender(name: str) -> dict[str, Any]:
    info = CONTENDERS[name]
    return {"description": info.description, "background": info.background, "fsyncs": info.fsyncs}


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower()


def _run_one(settings: BenchSettings, name: str, rep: int, saves: int, root: str) -> dict[str, Any]:
    directory = os.path.join(root, f"{rep}-{_slug(name)}")
    os.makedirs(directory)
    spec = {
        "contender": name,
        "raw": name == RAW_DISK,
        "state_bytes": settings.state_bytes,
        "saves": saves,
        "train_steps": settings.train_steps,
        "overlap_saves": settings.overlap_saves,
        "directory": directory,
    }
    spec_path, result_path, log_path = (
        os.path.join(root, f"{rep}-{_slug(name)}.{ext}") for ext in ("spec", "json", "log")
    )
    with open(spec_path, "w", encoding="utf-8") as handle:
        json.dump(spec, handle)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")])))
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.worker", spec_path, result_path],
            cwd=REPO,
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        with Sampler(proc.pid, settings.sample_interval_s) as sampler:
            try:
                proc.wait(timeout=settings.worker_timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    result: dict[str, Any]
    try:
        with open(result_path, encoding="utf-8") as handle:
            result = json.load(handle)
    except (OSError, ValueError):
        result = {"ok": False, "error": f"worker exited with code {proc.returncode} and no result"}
    if not result.get("ok"):
        with open(log_path, encoding="utf-8", errors="replace") as handle:
            result["log_tail"] = handle.read()[-4000:]
    windows = [tuple(w) for w in result.pop("windows", [])]
    if windows:
        result["memory_peak"] = sampler.peak_between(windows)
    result.update(contender=name, rep=rep)
    diskio.remove(directory)
    return result
