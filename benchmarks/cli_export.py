"""The dcp-plugin command's start time, and the peak memory of a streaming export.

    python benchmarks/cli_export.py [--state-mib 256] [--tensors 8] [--runs 5]

Start time: wall time of ``dcp-plugin --help`` and ``dcp-plugin ls DIR`` in fresh interpreters (median of
``--runs``), and whether torch was imported. Export: a checkpoint of ``--state-mib`` float32 weights in
``--tensors`` equal tensors is exported in a fresh process per case; the process's memory growth during the
export is reported twice: peak RSS (``VmHWM``, includes the pages of the checkpoint files mapped while they are
read) and peak anonymous memory (``RssAnon``, sampled every 2 ms: what the export itself allocates). Every module
the export uses is imported (a tiny export runs first) before the baseline. The target (safetensors) is
peak <= 1.2 x the largest tensor + 64 MiB; ``torch`` is shown for contrast (torch.save needs the whole entry).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _status(field: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def child_export(checkpoint: str, output: str, fmt: str, dtype: str | None) -> dict:
    from dcp_plugin.export.exporter import export_checkpoint

    warm = tempfile.mkdtemp(dir=os.path.dirname(output))
    tiny, _ = make_checkpoint(warm, 1, 1)  # every module the export uses is imported before the baseline
    export_checkpoint(tiny, os.path.join(warm, "out"), format=fmt, dtype=dtype)

    peak_anon = [_status("RssAnon")]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak_anon[0] = max(peak_anon[0], _status("RssAnon"))
            time.sleep(0.002)

    base_rss, base_anon = _status("VmRSS"), _status("RssAnon")
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    began = time.perf_counter()
    export_checkpoint(checkpoint, output, format=fmt, dtype=dtype)
    seconds = time.perf_counter() - began
    done.set()
    sampler.join()
    return {
        "seconds": seconds,
        "peak_rss_growth": _status("VmHWM") - base_rss,
        "peak_anon_growth": peak_anon[0] - base_anon,
    }


def make_checkpoint(directory: str, state_mib: int, tensors: int) -> tuple[str, int]:
    import torch

    from dcp_plugin import CheckpointManager

    elements = state_mib * 2**20 // 4 // tensors
    weights = {f"layers.{i}.weight": torch.randn(elements // 1024, 1024) for i in range(tensors)}
    with CheckpointManager(directory, async_mode="sync") as manager:
        manager.save(1, {"model": weights})
    largest = max(t.numel() * t.element_size() for t in weights.values())
    return os.path.join(directory, "step_000000001"), largest


def start_times(directory: str, runs: int) -> dict:
    env = {**os.environ, "PYTHONPATH": REPO}
    out = {}
    for name, argv in {"help": ["--help"], "ls": ["ls", directory]}.items():
        times = []
        for _ in range(runs):
            began = time.perf_counter()
            subprocess.run([sys.executable, "-m", "dcp_plugin.cli", *argv], env=env, check=True, capture_output=True)
            times.append(time.perf_counter() - began)
        out[f"{name}_s"] = statistics.median(times)
    probe = "import sys; from dcp_plugin.cli import main; main(['--help']); print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
    out["torch_imported"] = done.stdout.strip().endswith("True")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--state-mib", type=int, default=256)
    parser.add_argument("--tensors", type=int, default=8)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        checkpoint, output, fmt, dtype = args.child
        print(json.dumps(child_export(checkpoint, output, fmt, None if dtype == "-" else dtype)))
        return
    with tempfile.TemporaryDirectory() as directory:
        checkpoint, largest = make_checkpoint(os.path.join(directory, "run"), args.state_mib, args.tensors)
        report: dict = {"state_mib": args.state_mib, "largest_tensor_mib": largest / 2**20}
        report["start"] = start_times(os.path.join(directory, "run"), args.runs)
        target = 1.2 * largest + 64 * 2**20
        report["target_mib"] = target / 2**20
        cases = [("safetensors", "-"), ("safetensors", "bfloat16"), ("torch", "bfloat16")]
        for fmt, dtype in cases:
            output = os.path.join(directory, f"out.{fmt}")
            done = subprocess.run(
                [sys.executable, __file__, "--child", checkpoint, output, fmt, dtype],
                env={**os.environ, "PYTHONPATH": REPO},
                capture_output=True,
                text=True,
                check=True,
            )
            result = json.loads(done.stdout.strip().splitlines()[-1])
            row = {key: value / 2**20 if key.startswith("peak") else value for key, value in result.items()}
            row["within_target"] = max(result["peak_rss_growth"], result["peak_anon_growth"]) <= target
            report[f"{fmt}/{dtype}"] = row
            os.remove(output)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
