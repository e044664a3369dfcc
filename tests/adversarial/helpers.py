"""What the adversarial tests share: a committed incremental checkpoint, PyTorch's own readers as oracles, a
small real tmpfs."""

from __future__ import annotations

import contextlib
import os
import subprocess
import uuid
from collections.abc import Iterator

import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from dcp_plugin import CheckpointManager, ModelState
from tests.hostile import load_metadata
from tests.models import make_lora

INCREMENTAL = "step_000000002"


def two_incremental_saves(root: str) -> torch.nn.Module:
    """Two saves of a LoRA-style model: the second refers to the first's shared blob (linked into its directory)."""
    model = make_lora(width=128, layers=2)
    with CheckpointManager(root, async_mode="sync") as manager:
        manager.save(1, {"model": ModelState(model)})
        manager.save(2, {"model": ModelState(model)})
    return model


def blob_links(directory: str) -> list[str]:
    return sorted(name for name in os.listdir(directory) if name.startswith("blob_"))


def torch_oracle(directory: str, scratch: str) -> dict:
    """What PyTorch's own reader makes of a checkpoint directory (``dcp_to_torch_save``)."""
    out = os.path.join(scratch, f"oracle-{uuid.uuid4().hex[:8]}.pt")
    dcp_to_torch_save(directory, out)
    return torch.load(out, weights_only=True)


def flip_a_tensor_byte(path: str) -> None:
    """Replace data file ``path`` by a copy with one byte of its largest tensor changed (as editors and copy tools
    do: a new inode, the old one untouched)."""
    metadata = load_metadata(os.path.dirname(path))
    name = os.path.basename(path)
    largest = max((i for i in metadata.storage_data.values() if i.relative_path == name), key=lambda i: i.length)
    with open(path, "rb") as handle:
        data = bytearray(handle.read())
    data[largest.offset + largest.length // 2] ^= 0xFF
    os.remove(path)
    with open(path, "wb") as handle:
        handle.write(data)


@contextlib.contextmanager
def small_tmpfs(where: str, size: str = "4m", options: str = "") -> Iterator[str]:
    """A real tmpfs of ``size`` mounted at ``where`` (root only; skips saying why otherwise); always unmounted."""
    os.makedirs(where, exist_ok=True)
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    opts = f"size={size}" + (f",{options}" if options else "")
    with _mounted(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", where], "a tmpfs"):
        yield where


@contextlib.contextmanager
def small_disk(where: str, size_mib: int = 8) -> Iterator[str]:
    """A real ext4 filesystem of ``size_mib`` on a loop device, mounted at ``where`` (root, ``mkfs.ext4`` and loop
    devices needed; skips saying why otherwise); always unmounted. Unlike tmpfs, a disk's free space is not checked
    before a save, so a write that fills it fails halfway, as on a real full disk."""
    os.makedirs(where, exist_ok=True)
    if os.geteuid() != 0:
        pytest.skip("mounting a small disk image needs root")
    image = where.rstrip("/") + ".img"
    with open(image, "wb") as handle:
        handle.truncate(size_mib * 2**20)
    made = subprocess.run(["mkfs.ext4", "-q", "-F", "-m", "0", image], capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"cannot make an ext4 image here: {made.stderr.strip() or made.returncode}")
    try:
        with _mounted(["mount", "-o", "loop", image, where], "a loop device"):
            yield where
    finally:
        os.remove(image)


@contextlib.contextmanager
def _mounted(command: list[str], what: str) -> Iterator[None]:
    """Run a ``mount`` command (skipping the test, saying why, if it fails); unmount its last argument after."""
    mounted = subprocess.run(command, capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount {what} here: {mounted.stderr.strip() or mounted.returncode}")
    try:
        yield
    finally:
        subprocess.run(["umount", "-l", command[-1]], check=False)
