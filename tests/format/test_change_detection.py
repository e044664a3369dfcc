"""Change detection as an adversary: every shortcut that skips work (unchanged tensors trusted to the kernel's
write-watch, blobs referred to instead of written, cached save plans) against every way of changing what it trusts.

Each test changes the live state between saves in a way some shortcut could miss, saves again, and reads the
checkpoint back in a fresh process with dcp-plugin and with PyTorch's own ``dcp_to_torch_save``: both must hold
exactly the live values at the moment of the save.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest
import torch

from dcp_plugin import CheckpointManager, KeepLast, ModelState, OptimizerState
from dcp_plugin.export import export_checkpoint
from dcp_plugin.format import write_watch
from tests import kernel_writes
from tests.fresh import read_fresh
from tests.models import lora_step, make_lora
from tests.paths import REPO, SCRIPTS

watched = pytest.mark.skipif(not write_watch.available(), reason="the kernel offers no write tracking here")


class Tied(torch.nn.Module):
    """An embedding and an output layer sharing one frozen weight (GPT-2's ``wte`` / ``lm_head``)."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.emb = torch.nn.Embedding(2048, 256)  # 2 MiB: watched by the kernel
        self.head = torch.nn.Linear(256, 2048, bias=False)
        self.head.weight = self.emb.weight
        self.emb.weight.requires_grad_(False)
        self.adapter = torch.nn.Linear(256, 256)


def _edit_through_data(weight: torch.Tensor) -> None:
    weight.data[100:1900] += 1.0  # whole middle pages, no version counter


def _edit_through_numpy(weight: torch.Tensor) -> None:
    weight.detach().numpy()[100:1900] *= -1.0


EDITS = {"data": _edit_through_data, "numpy": _edit_through_numpy}


def _saved(result: dict, *keys: str) -> dict[str, torch.Tensor]:
    """The model tensors one fresh-process reader returned (failing with its error text if it refused)."""
    out = {}
    for reader in ("plugin", "torch"):
        model = result[reader]
        assert not isinstance(model, str), f"{reader}: {model}"
        for key in keys:
            out[f"{reader}:{key}"] = model["model"][key]
    return out


@watched
def test_tied_frozen_weights_edited_between_saves_are_saved_under_both_names(ckpt_dir):
    model = Tied()
    live = {}
    with CheckpointManager(ckpt_dir, async_mode="thread") as manager:
        manager.save(1, {"model": ModelState(model)})
        manager.save(2, {"model": ModelState(model)})  # unchanged: trusted to the watch
        for step, edit in enumerate(sorted(EDITS), start=3):
            EDITS[edit](model.emb.weight)
            live[step] = model.emb.weight.detach().clone()
            manager.save(step, {"model": ModelState(model)})
            manager.wait()
            read = manager.read(step)["model"]
            assert torch.equal(read["emb.weight"], live[step]) and torch.equal(read["head.weight"], live[step])
            fresh = Tied(seed=5)
            manager.load({"model": ModelState(fresh)}, step=step)
            assert torch.equal(fresh.emb.weight, live[step]) and fresh.head.weight is fresh.emb.weight
    paths = {step: f"{ckpt_dir}/step_{step:09d}" for step in live}
    results = read_fresh(*paths.values())
    for step, path in paths.items():
        for name, tensor in _saved(results[path], "emb.weight", "head.weight").items():
            assert torch.equal(tensor, live[step]), (step, name)


@watched
def test_another_key_holding_the_same_frozen_tensor_sees_every_edit(ckpt_dir):
    """An EMA copy or a frozen reference model that shares the base by reference, saved beside the model."""
    model = make_lora()
    base = model[0].base.weight
    with CheckpointManager(ckpt_dir, async_mode="sync") as manager:
        state = {"model": ModelState(model), "reference": {"base": base}}
        manager.save(1, state)
        manager.save(2, state)
        _edit_through_numpy(base)
        live = base.detach().clone()
        manager.save(3, state)
        read = manager.read(3)
        assert torch.equal(read["reference"]["base"], live)
        assert torch.equal(read["model"]["0.base.weight"], live)


@watched
def test_two_managers_of_one_model_each_see_every_edit(tmp_path):
    """Frequent local saves and "best" saves of the same model in two directories."""
    model = Tied()
    frequent = CheckpointManager(tmp_path / "frequent", async_mode="sync")
    best = CheckpointManager(tmp_path / "best", async_mode="sync")
    live = {}
    try:
        for step in (1, 2):
            frequent.save(step, {"model": ModelState(model)})
            best.save(step, {"model": ModelState(model)})
        for step, edit in enumerate(sorted(EDITS), start=3):
            EDITS[edit](model.emb.weight)
            live[step] = model.emb.weight.detach().clone()
            first, second = (best, frequent) if step % 2 else (frequent, best)
            first.save(step, {"model": ModelState(model)})  # reads the kernel's marks first
            second.save(step, {"model": ModelState(model)})
            assert second.storage.verify(f"step_{step:09d}") == []
    finally:
        frequent.close()
        best.close()
    paths = {(run, step): f"{tmp_path}/{run}/step_{step:09d}" for run in ("frequent", "best") for step in live}
    results = read_fresh(*paths.values())
    for (run, step), path in paths.items():
        for name, tensor in _saved(results[path], "emb.weight", "head.weight").items():
            assert torch.equal(tensor, live[step]), (run, step, name)


def _aligned_offset(tensor: torch.Tensor, pages_in: int) -> int:
    """A byte offset into ``tensor`` at the start of its ``pages_in``-th whole page."""
    first = (tensor.data_ptr() + 4095) & ~4095
    return first - tensor.data_ptr() + 4096 * pages_in


KERNEL_WRITES = {
    "proc_self_mem": lambda t, d: kernel_writes.proc_mem_write(t, _aligned_offset(t, 3), b"\x01" * 64),
    "process_vm_writev": lambda t, d: kernel_writes.write_from_child(t, _aligned_offset(t, 5), b"\x02" * 64),
    "madvise_dontneed": lambda t, d: kernel_writes.dont_need(t),
    "o_direct_read": lambda t, d: kernel_writes.direct_read_into(t, _aligned_offset(t, 2), b"\x03" * 8192, d),
    "io_uring_read": lambda t, d: kernel_writes.io_uring_read(t, _aligned_offset(t, 4), b"\x04" * 8192),
    "mmap_fixed_over": lambda t, d: kernel_writes.map_over(t, _aligned_offset(t, 6), 4 * 4096),
}


@watched
def test_memory_changed_past_torch_is_saved_as_it_is_now(ckpt_dir, tmp_path):
    """Writes by the kernel on the process's behalf, by another process, and pages dropped or mapped over (they
    read back as zeros): one frozen layer changed each way, all after a save that trusted them to the watch."""
    ways = sorted(KERNEL_WRITES)
    if kernel_writes.io_uring_available() is not None:
        ways.remove("io_uring_read")
    model = make_lora(layers=len(ways) + 1)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    with CheckpointManager(ckpt_dir, async_mode="thread") as manager:
        state = {"model": ModelState(model), "optim": OptimizerState(model, optimizer)}
        manager.save(1, state)
        lora_step(model, optimizer)
        manager.save(2, state)
        manager.wait()
        for layer, how in enumerate(ways):
            weight = model[layer].base.weight
            before = weight.detach().clone()
            KERNEL_WRITES[how](weight, str(tmp_path))
            assert not torch.equal(weight, before), how
        live = {key: value.clone() for key, value in model.state_dict().items()}
        manager.save(3, state)
    path = f"{ckpt_dir}/step_000000003"
    result = read_fresh(path)[path]
    for layer, how in enumerate([*ways, "untouched"]):
        key = f"{layer}.base.weight"
        for name, tensor in _saved(result, key).items():
            assert torch.equal(tensor, live[key]), (how, name)


def test_pages_the_kernel_fills_through_a_pin_are_never_trusted_to_the_watch(tmp_path):
    """An io_uring fixed buffer filled with READ_FIXED is written past the page tables (as RDMA is): no page is
    ever marked written. Run in a process of its own: once memory is pinned, nothing in it is trusted again."""
    why = kernel_writes.io_uring_available()
    if why is not None:
        pytest.skip(why)
    done = subprocess.run(
        [sys.executable, os.path.join(SCRIPTS, "pinned_writes.py"), str(tmp_path / "ckpts")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=240,
        env=dict(os.environ, PYTHONPATH=REPO),
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    live = torch.load(tmp_path / "ckpts" / "live.pt")
    result = read_fresh(f"{tmp_path}/ckpts/step_000000003")[f"{tmp_path}/ckpts/step_000000003"]
    for name, tensor in _saved(result, "1.base.weight").items():
        assert torch.equal(tensor, live), name


@pytest.mark.parametrize("incremental", [True, False])
def test_a_dtype_change_between_saves_is_recorded(ckpt_dir, tmp_path, incremental):
    from safetensors.torch import load_file

    model = make_lora()
    live = {}
    with CheckpointManager(ckpt_dir, async_mode="sync", incremental=incremental) as manager:
        manager.save(1, {"model": ModelState(model)})
        manager.save(2, {"model": ModelState(model)})  # a cached plan from here on
        for step, dtype in enumerate((torch.float16, torch.float64, torch.bfloat16), start=3):
            model.to(dtype)
            live[step] = {key: value.clone() for key, value in model.state_dict().items()}
            manager.save(step, {"model": ModelState(model)})
    paths = {step: f"{ckpt_dir}/step_{step:09d}" for step in live}
    results = read_fresh(*paths.values())
    for step, path in paths.items():
        exported = load_file(export_checkpoint(path, tmp_path / f"{step}.safetensors").output)
        for key, value in live[step].items():
            for name, tensor in {"export": exported[key], **_saved(results[path], key)}.items():
                assert tensor.dtype == value.dtype and torch.equal(tensor, value), (step, key, name, tensor.dtype)


def _flip_one_byte(path: str, keep_mtime: bool) -> None:
    status = os.stat(path)
    with open(path, "r+b") as handle:
        handle.seek(status.st_size // 2)
        byte = handle.read(1)
        handle.seek(status.st_size // 2)
        handle.write(bytes([byte[0] ^ 0x10]))
    if keep_mtime:  # as a bit flip on the disk would: nothing about the file says it changed
        os.utime(path, ns=(status.st_atime_ns, status.st_mtime_ns))


@pytest.mark.parametrize("keep_mtime", [False, True], ids=["edited", "silently_damaged"])
def test_a_damaged_shared_file_is_never_built_upon(ckpt_dir, caplog, keep_mtime):
    """Every later checkpoint stays loadable: the next save writes the tensors afresh from the live model."""
    model = make_lora()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    state = {"model": ModelState(model), "optim": OptimizerState(model, optimizer)}
    interval = 0.0 if keep_mtime else 3600.0  # a silent flip is found by the periodic check
    with CheckpointManager(
        ckpt_dir, async_mode="thread", retention=KeepLast(2), blob_check_interval=interval
    ) as manager:
        manager.save(1, state)
        manager.wait()
        (damaged,) = manager.storage.read_manifest("step_000000001")["blobs"]
        _flip_one_byte(os.path.join(manager.storage.blob_area, damaged), keep_mtime)
        with caplog.at_level(logging.WARNING):
            for step in (2, 3, 4):
                lora_step(model, optimizer)
                manager.save(step, state)
                manager.wait()
        assert any(damaged in record.getMessage() for record in caplog.records)
        for step in (3, 4):
            name = f"step_{step:09d}"
            assert damaged not in manager.storage.read_manifest(name)["blobs"]
            assert manager.storage.verify(name) == []
        live = {key: value.clone() for key, value in model.state_dict().items()}
    result = read_fresh(f"{ckpt_dir}/step_000000004")[f"{ckpt_dir}/step_000000004"]
    for key, value in live.items():
        for name, tensor in _saved(result, key).items():
            assert torch.equal(tensor, value), (key, name)
