"""Full against incremental saves of a LoRA-style fine-tune: bytes written and time to durable per save.

    python benchmarks/incremental.py [--base-mib 512] [--saves 4] [--mode thread]
    python benchmarks/incremental.py --every-step [--base-mib 192] [--steps 60] [--mode thread]

The model is a stack of frozen ``Linear`` layers (the base, about ``--base-mib`` MiB of float32 weights) with a
rank-8 trainable adapter on each, trained with AdamW between saves. Each save is made through a
``CheckpointManager`` with ``incremental=False`` (full) and with the default ``incremental=True``. Reported per
save: the bytes of the files the save added to the directory, and the time from ``save`` until it was durable
(committed).

``--every-step`` trains the same model (batch 8) and saves after every step, against the same steps without
checkpoints, in one process and alternating blocks of 10 steps (median block time per step); reported: the
extra training time, the bytes each save added, and the process CPU time each save adds (less sensitive than
wall time to other load on the host), and the CPU a plain ``dcp.save`` of only the trainable tensors and their
optimizer state costs, in the same process. The run pins glibc's malloc thresholds as ``benchmarks/goodput.py``
does (``--malloc-defaults`` leaves them adaptive) and takes ``--omp-wait-policy``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

STEADY_MALLOC = {"MALLOC_TRIM_THRESHOLD_": str(2**36), "MALLOC_MMAP_THRESHOLD_": str(32 * 2**20)}
"""As in ``benchmarks/goodput.py``: glibc keeps freed memory in the heap, so a training step does not fault its
freed gradients back in depending on where the heap's last block happens to lie (any save's allocation can flip
that, by 2x here)."""


def _files(directory: str) -> dict[tuple[int, int], int]:
    """File sizes by inode: the hard links an incremental checkpoint holds to shared data add no bytes."""
    found = {}
    for folder, _, names in os.walk(directory):
        for name in names:
            status = os.stat(os.path.join(folder, name))
            found[(status.st_dev, status.st_ino)] = status.st_size
    return found


def run(incremental: bool, base_mib: float, saves: int, mode: str) -> list[dict]:
    from dcp_plugin import CheckpointManager
    from tests.models import LoRALinear

    width, layers = 2048, max(1, round(base_mib * 2**20 / (2048 * 2048 * 4)))
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[LoRALinear(width, 8) for _ in range(layers)])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    rows = []
    with (
        tempfile.TemporaryDirectory() as directory,
        CheckpointManager(directory, async_mode=mode, incremental=incremental) as manager,
    ):
        for step in range(1, saves + 1):
            model(torch.randn(8, width)).pow(2).mean().backward()
            optimizer.step()
            optimizer.zero_grad()
            before = _files(directory)
            began = time.perf_counter()
            manager.save(step, {"model": model, "optim": optimizer})
            manager.wait()
            durable = time.perf_counter() - began
            after = _files(directory)
            written = sum(size for inode, size in after.items() if inode not in before)
            rows.append({"save": step, "bytes": written, "durable_s": durable})
    return rows


def every_step(base_mib: float, steps: int, mode: str, block: int = 10) -> dict:
    import statistics

    from dcp_plugin import CheckpointManager, KeepLast
    from tests.models import LoRALinear

    width, layers = 2048, max(1, round(base_mib * 2**20 / (2048 * 2048 * 4)))
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[LoRALinear(width, 8) for _ in range(layers)])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    batch = torch.randn(8, width)

    def step() -> None:
        model(batch).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()

    plain: list[float] = []
    saving: list[float] = []
    cpu_plain: list[float] = []
    cpu_saving: list[float] = []
    written: list[int] = []
    with (
        tempfile.TemporaryDirectory() as directory,
        CheckpointManager(directory, async_mode=mode, retention=KeepLast(2)) as manager,
    ):
        for _ in range(3):  # warm-up: the first save writes the base
            step()
        manager.save(0, {"model": model, "optim": optimizer})
        manager.wait()
        number = 0
        for _ in range(max(1, steps // (2 * block))):
            began, cpu = time.perf_counter(), time.process_time()
            for _ in range(block):
                step()
            plain.append((time.perf_counter() - began) / block)
            cpu_plain.append((time.process_time() - cpu) / block)
            began, cpu = time.perf_counter(), time.process_time()
            for _ in range(block):
                step()
                number += 1
                stats = manager.save(number, {"model": model, "optim": optimizer})
            manager.wait()
            saving.append((time.perf_counter() - began) / block)
            cpu_saving.append((time.process_time() - cpu) / block)
            written.append(stats.bytes_written)
        floor = _plain_dcp_cpu(model, optimizer, directory)
    base, with_saves = statistics.median(plain), statistics.median(saving)
    return {
        "mode": mode,
        "base_mib": layers * width * width * 4 / 2**20,
        "step_s": base,
        "step_with_save_s": with_saves,
        "extra": with_saves / base - 1,
        "bytes_per_save": statistics.median(written),
        "cpu_s_per_save": statistics.median(cpu_saving) - statistics.median(cpu_plain),
        "cpu_s_per_step": statistics.median(cpu_plain),
        "plain_dcp_cpu_s_per_save": floor,
    }


def _plain_dcp_cpu(model: torch.nn.Module, optimizer: torch.optim.Optimizer, directory: str, saves: int = 20) -> float:
    """Median process CPU seconds of a plain ``dcp.save`` (fsync on) of the trainable tensors alone and their
    optimizer state: what any DCP-based save of this fine-tune costs at the least."""
    import shutil
    import statistics
    import warnings

    import torch.distributed.checkpoint as dcp

    trainable = {name for name, parameter in model.named_parameters() if parameter.requires_grad}
    samples = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "torch.distributed is disabled"
        for number in range(saves):
            target = os.path.join(directory, f"plain-dcp-{number}")
            began = time.process_time()
            state = {name: value for name, value in model.state_dict().items() if name in trainable}
            dcp.save({"model": state, "optim": optimizer.state_dict()["state"]}, checkpoint_id=target, no_dist=True)
            samples.append(time.process_time() - began)
            shutil.rmtree(target)
    return statistics.median(samples)


def _steady_environment(args: argparse.Namespace) -> None:
    """Run again with the malloc thresholds pinned (and OMP_WAIT_POLICY set) unless they already are: glibc and
    OpenMP read them when the process starts."""
    wanted = {} if args.malloc_defaults else dict(STEADY_MALLOC)
    if args.omp_wait_policy:
        wanted["OMP_WAIT_POLICY"] = args.omp_wait_policy
    if any(os.environ.get(name) != value for name, value in wanted.items()):
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **wanted})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-mib", type=float, default=512)
    parser.add_argument("--saves", type=int, default=4)
    parser.add_argument("--mode", default="thread", choices=["sync", "thread", "process"])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--every-step", action="store_true", help="train and save after every step")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument(
        "--omp-wait-policy",
        choices=["ACTIVE", "PASSIVE"],
        help="--every-step: OMP_WAIT_POLICY for the run (default: inherited). On a busy host OpenMP's spinning makes "
        "a step's speed depend on how many OpenMP thread teams the process has, whatever a save costs",
    )
    parser.add_argument(
        "--malloc-defaults", action="store_true", help="--every-step: leave glibc's malloc thresholds adaptive"
    )
    args = parser.parse_args()
    if args.every_step:
        _steady_environment(args)
        result = every_step(args.base_mib, args.steps, args.mode)
        if args.json:
            print(json.dumps(result, indent=1))
            return
        print(
            f"{args.mode}: base {result['base_mib']:.0f} MiB frozen; {result['step_s'] * 1000:.1f} ms per step "
            f"without checkpoints, {result['step_with_save_s'] * 1000:.1f} ms with a save after each "
            f"({result['extra'] * 100:+.1f} %); {result['bytes_per_save'] / 1e6:.1f} MB written per save; CPU "
            f"{result['cpu_s_per_save'] * 1000:.1f} ms per save against {result['cpu_s_per_step'] * 1000:.1f} ms "
            "per training step; a plain dcp.save of the trainable tensors and their optimizer state alone: "
            f"{result['plain_dcp_cpu_s_per_save'] * 1000:.1f} ms of CPU"
        )
        return
    results = {
        kind: run(kind == "incremental", args.base_mib, args.saves, args.mode) for kind in ("full", "incremental")
    }
    if args.json:
        print(json.dumps(results, indent=1))
        return
    print("| save | full: MiB written | full: durable (s) | incremental: MiB written | incremental: durable (s) |")
    print("|---:|---:|---:|---:|---:|")
    for full, inc in zip(results["full"], results["incremental"]):
        print(
            f"| {full['save']} | {full['bytes'] / 2**20:.1f} | {full['durable_s']:.2f} | "
            f"{inc['bytes'] / 2**20:.1f} | {inc['durable_s']:.2f} |"
        )


if __name__ == "__main__":
    main()
