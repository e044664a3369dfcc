"""Run scripts the way users do: ``python script.py``, ``torchrun --nproc-per-node N script.py`` or
``accelerate launch --multi_gpu --num_processes N script.py`` (on CPU: the script asks for ``Accelerator(cpu=True)``;
``--cpu --num_processes N`` would quietly run one process)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = Path(__file__).with_name("train_script.py")
TORCHRUN = Path(sys.executable).with_name("torchrun")
ACCELERATE = Path(sys.executable).with_name("accelerate")


def script_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DCP_PLUGIN_")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["OMP_NUM_THREADS"] = "1"
    env.update(extra or {})
    return env


def launch(
    args: list[str],
    *,
    nproc: int = 1,
    env: dict[str, str] | None = None,
    script: Path = SCRIPT,
    timeout: float = 300,
    launcher: str = "torchrun",
) -> subprocess.CompletedProcess:
    """Run ``script`` on ``nproc`` processes (``launcher``: ``torchrun`` or ``accelerate``); fail with its output
    if it does not succeed."""
    from tests.multiproc import free_port

    if nproc == 1:
        command = [sys.executable, str(script), *args]
    elif launcher == "accelerate":
        command = [
            str(ACCELERATE),
            "launch",
            "--multi_gpu",
            f"--num_processes={nproc}",
            "--num_machines=1",
            "--mixed_precision=no",
            "--dynamo_backend=no",
            f"--main_process_port={free_port()}",
            str(script),
            *args,
        ]
    else:
        command = [
            str(TORCHRUN),
            f"--nproc-per-node={nproc}",
            f"--master-port={free_port()}",
            str(script),
            *args,
        ]
    process = subprocess.Popen(
        command, env=script_env(env), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        stacks = _stop_tree(process.pid)
        stdout, stderr = process.communicate()
        raise AssertionError(
            f"{' '.join(command)} did not finish in {timeout:.0f} s\n--- stacks\n{stacks}\n"
            f"--- stdout\n{stdout[-4000:]}\n--- stderr\n{stderr[-8000:]}"
        ) from None
    result = subprocess.CompletedProcess(command, process.returncode, stdout, stderr)
    if result.returncode != 0:
        raise AssertionError(
            f"{' '.join(command)} exited with {result.returncode}\n--- stdout\n{result.stdout[-4000:]}\n"
            f"--- stderr\n{result.stderr[-8000:]}"
        )
    return result


def _stop_tree(pid: int) -> str:
    """Kill a hung launch and every process under it (the ranks outlive a killed launcher otherwise); return the
    stacks of each, native frames included, as py-spy saw them just before."""
    import psutil

    root = psutil.Process(pid)
    processes = [root, *root.children(recursive=True)]
    py_spy = Path(sys.executable).with_name("py-spy")
    stacks = []
    for process in processes:
        try:
            dump = subprocess.run(
                [str(py_spy), "dump", "--native", "--pid", str(process.pid)], capture_output=True, text=True, timeout=60
            )
            stacks.append(dump.stdout + dump.stderr)
        except (OSError, subprocess.TimeoutExpired) as error:
            stacks.append(f"pid {process.pid}: no stack ({error})")
    for process in processes:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(processes, timeout=30)
    return "\n".join(stacks)


def records(prefix: str, tag: str, world_size: int) -> list[dict]:
    return [torch.load(f"{prefix}_{tag}_rank{r}.pt", weights_only=False) for r in range(world_size)]
