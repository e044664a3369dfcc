"""Which staging mode keeps a GPU training loop fastest (run on a CUDA host).

Three measurements, each contender in a fresh process:

1. copy: device-to-host bandwidth into pageable vs page-locked memory, and how much a device-to-host copy on a
   side stream slows matrix products running at the same time (copy-engine overlap).
2. loop: a GPU MLP + AdamW, a save every ``--save-every`` steps, each contender's extra training time against
   the same loop without checkpoints, its per-save stall, and an exact reload check.
3. nccl: an NCCL default group plus the gloo side group that asynchronous saves use, save and reload.

    python benchmarks/gpu_staging.py --out results.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: a smoke run of the script only

CONTENDERS = {
    "none": {},
    "sync": {"async_mode": "sync"},
    "thread": {"async_mode": "thread"},
    "thread+async_staging": {"async_mode": "thread", "async_staging": True},
    "process": {"async_mode": "process"},
    "process+async_staging": {"async_mode": "process", "async_staging": True},
    "dcp.async_save": {},
}


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def build(hidden: int, layers: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(hidden, hidden) for _ in range(layers)]).to(DEVICE)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-4)


def train_step(model: torch.nn.Module, optim: torch.optim.Optimizer, batch: torch.Tensor) -> None:
    loss = model(batch).float().pow(2).mean()
    loss.backward()
    optim.step()
    optim.zero_grad(set_to_none=True)


def copy_probe(gib: float) -> dict[str, float]:
    n = int(gib * 2**30) // 4
    src = torch.randn(n, device="cuda")
    pageable = torch.empty(n)
    pinned = torch.empty(n, pin_memory=True)
    out: dict[str, float] = {}
    for name, dst in (("pageable", pageable), ("pinned", pinned)):
        dst.copy_(src)
        torch.cuda.synchronize()
        began = time.perf_counter()
        for _ in range(3):
            dst.copy_(src, non_blocking=True)
        torch.cuda.synchronize()
        out[f"d2h_{name}_GBps"] = 3 * n * 4 / (time.perf_counter() - began) / 1e9
    a = torch.randn(8192, 8192, device="cuda")

    def matmuls() -> float:
        torch.cuda.synchronize()
        began = time.perf_counter()
        for _ in range(40):
            a @ a
        torch.cuda.synchronize()
        return time.perf_counter() - began

    matmuls()
    alone = matmuls()
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        for _ in range(4):
            pinned.copy_(src, non_blocking=True)
    together = matmuls()
    torch.cuda.synchronize()
    out["matmul_slowdown_during_pinned_copy"] = together / alone - 1
    return out


def run_loop(contender: str, args: argparse.Namespace) -> dict[str, Any]:
    from dcp_plugin import CheckpointManager

    torch.backends.cuda.matmul.allow_tf32 = False
    model, optim = build(args.hidden, args.layers)
    batch = torch.randn(args.batch, args.hidden, device=DEVICE)
    for _ in range(3):
        train_step(model, optim, batch)
    sync()
    state_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    state_bytes += sum(
        v.numel() * v.element_size() for s in optim.state.values() for v in s.values() if torch.is_tensor(v)
    )
    directory = tempfile.mkdtemp(prefix=f"gpu-{contender}-", dir=args.dir)
    manager = None
    raw_future = None
    if contender not in ("none", "dcp.async_save"):
        manager = CheckpointManager(directory, **CONTENDERS[contender])
    stalls: list[float] = []
    began = time.perf_counter()
    for step in range(1, args.steps + 1):
        train_step(model, optim, batch)
        if step % args.save_every == 0 and contender != "none":
            sync()
            t0 = time.perf_counter()
            if manager is not None:
                manager.save(step, {"model": model, "optim": optim})
            else:
                import torch.distributed.checkpoint as dcp

                if raw_future is not None:
                    raw_future.result()
                state = {"model": model.state_dict(), "optim": optim.state_dict()}
                raw_future = dcp.async_save(state, checkpoint_id=f"{directory}/step_{step}")
            stalls.append(time.perf_counter() - t0)
    if manager is not None:
        manager.wait()
    if raw_future is not None:
        raw_future.result()
    sync()
    wall = time.perf_counter() - began
    exact = None
    if manager is not None:
        fresh, fresh_optim = build(args.hidden, args.layers)
        train_step(fresh, fresh_optim, batch)
        manager.load({"model": fresh, "optim": fresh_optim})
        exact = all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), fresh.state_dict().values()))
        manager.close()
    return {
        "contender": contender,
        "wall_s": wall,
        "stall_ms": [round(s * 1000, 1) for s in stalls],
        "state_GiB": state_bytes / 2**30,
        "exact_reload": exact,
    }


def nccl_probe(directory: str) -> dict[str, Any]:
    import torch.distributed as dist

    from dcp_plugin import CheckpointManager

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    dist.init_process_group("nccl" if DEVICE == "cuda" else "gloo", rank=0, world_size=1)
    model, optim = build(1024, 4)
    batch = torch.randn(256, 1024, device=DEVICE)
    train_step(model, optim, batch)
    out: dict[str, Any] = {"backend": dist.get_backend()}
    for mode in ("thread", "process"):
        manager = CheckpointManager(f"{directory}/{mode}", async_mode=mode)
        stats = manager.save(1, {"model": model, "optim": optim})
        manager.wait()
        fresh, fresh_optim = build(1024, 4)
        train_step(fresh, fresh_optim, batch)
        manager.load({"model": fresh, "optim": fresh_optim})
        out[mode] = {
            "blocking_ms": round(stats.blocking_s * 1000, 1),
            "exact": all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), fresh.state_dict().values())),
        }
        manager.close()
    dist.destroy_process_group()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--role", default="driver")
    parser.add_argument("--contender", default="none")
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--batch", type=int, default=16384)
    parser.add_argument("--steps", type=int, default=48)
    parser.add_argument("--save-every", type=int, default=8)
    parser.add_argument("--copy-gib", type=float, default=2.0)
    parser.add_argument("--dir", default=tempfile.gettempdir())
    parser.add_argument("--out", default="")
    parser.add_argument("--only", default="", help="comma-separated contenders and probes (copy, nccl) to run")
    args = parser.parse_args()
    if args.role == "copy":
        print(json.dumps(copy_probe(args.copy_gib)))
        return
    if args.role == "loop":
        print(json.dumps(run_loop(args.contender, args)))
        return
    if args.role == "nccl":
        print(json.dumps(nccl_probe(tempfile.mkdtemp(dir=args.dir))))
        return
    skipped = ("role", "contender", "out", "only")
    passthrough = [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k not in skipped]
    chosen = set(args.only.split(",")) if args.only else {*CONTENDERS, "copy", "nccl"}
    results: dict[str, Any] = {
        "device": torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu",
        "torch": torch.__version__,
        "loop": [],
    }

    def child(*extra: str) -> Any:
        proc = subprocess.run(
            [sys.executable, __file__, *passthrough, *extra], capture_output=True, text=True, timeout=300
        )
        if proc.returncode != 0:
            return {"error": proc.stderr[-3000:]}
        return json.loads(proc.stdout.strip().splitlines()[-1])

    results["copy"] = child("--role=copy") if DEVICE == "cuda" and "copy" in chosen else {}
    print(json.dumps(results["copy"]), flush=True)
    for contender in [name for name in CONTENDERS if name in chosen]:
        row = child("--role=loop", f"--contender={contender}")
        results["loop"].append(row)
        print(json.dumps(row), flush=True)
    base = next((r["wall_s"] for r in results["loop"] if r.get("contender") == "none"), None)
    for row in results["loop"]:
        if base and "wall_s" in row:
            row["extra_time_pct"] = round(100 * (row["wall_s"] / base - 1), 1)
    results["nccl"] = child("--role=nccl") if "nccl" in chosen else {}
    print(json.dumps(results["nccl"]), flush=True)
    text = json.dumps(results, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
