"""Local checkpoint files bypass the page cache (O_DIRECT) where the filesystem allows it, and fall back to the
page cache, reported in SaveStats and logged once, where it refuses; either way the files are exact."""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import subprocess
import sys

import numpy
import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from dcp_plugin import CheckpointManager
from dcp_plugin.storage import record_writer
from tests.paths import REPO, SCRIPTS

O_DIRECT = getattr(os, "O_DIRECT", 0)
linux_only = pytest.mark.skipif(not O_DIRECT, reason="O_DIRECT is Linux's")


def _accepts_direct_io(directory) -> bool:
    probe = os.path.join(directory, ".direct-io-probe")
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | O_DIRECT, 0o600)
    except OSError:
        return False
    os.close(fd)
    os.unlink(probe)
    return True


def _state() -> dict[str, torch.Tensor]:
    torch.manual_seed(3)
    return {
        # larger than the O_DIRECT buffer, and sizes that are not multiples of the disk's block
        "big": torch.randn(record_writer.DIRECT_BUFFER // 4 + 1001),
        "odd": torch.randn(3, 7),
        "half": torch.randn(5, dtype=torch.float16),
        "empty": torch.zeros(0),
    }


def _check_checkpoint(manager: CheckpointManager, state: dict[str, torch.Tensor], tmp_path) -> None:
    latest = manager.latest()
    path = latest.url
    assert manager.storage.verify(latest) == []  # sizes and xxh3-128 digests as recorded while writing
    with open(os.path.join(path, ".metadata"), "rb") as handle:
        assert b"direct_io" not in handle.read()  # SaveStats' report does not end up in DCP's file
    fresh = {key: torch.empty_like(value) for key, value in state.items()}
    dcp.load(fresh, checkpoint_id=path)  # PyTorch's own reader, on the byte ranges we wrote
    assert all(torch.equal(fresh[key], value) for key, value in state.items())
    dcp_to_torch_save(path, tmp_path / "full.pt")
    full = torch.load(tmp_path / "full.pt", weights_only=True)
    assert all(torch.equal(full[key], value) for key, value in state.items())


@linux_only
@pytest.mark.parametrize("mode", ["sync", "thread", "process"])
def test_files_on_a_local_disk_bypass_the_page_cache_and_are_exact(tmp_path, mode):
    if not _accepts_direct_io(tmp_path):
        pytest.skip(f"the filesystem of {tmp_path} refuses O_DIRECT")
    state = _state()
    with CheckpointManager(str(tmp_path / "ckpt"), async_mode=mode) as manager:
        stats = manager.save(1, state)
        manager.wait()
        assert stats.direct_io is True and stats.error is None
        _check_checkpoint(manager, state, tmp_path)


def test_o_direct_turned_off_writes_through_the_page_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DCP_PLUGIN_DIRECT_IO", "0")
    state = _state()
    with CheckpointManager(str(tmp_path / "ckpt"), async_mode="sync") as manager:
        assert manager.checkpointer.config.direct_io is False
        stats = manager.save(1, state)
        assert stats.direct_io is False and stats.error is None
        _check_checkpoint(manager, state, tmp_path)


@pytest.fixture(params=["open", "write"])
def refusing(request, monkeypatch):
    """A filesystem that refuses O_DIRECT: with EINVAL on open (tmpfs before Linux 6.6) or on the first write
    (some network filesystems). Injected where the machine has no such filesystem."""
    if request.param == "open":
        real_open = os.open

        def refusing_open(path, flags, *args, **kwargs):
            if flags & O_DIRECT:
                raise OSError(errno.EINVAL, "Invalid argument (O_DIRECT refused, injected)", path)
            return real_open(path, flags, *args, **kwargs)

        monkeypatch.setattr(os, "open", refusing_open)
    else:
        real_pwrite = os.pwrite

        def refusing_pwrite(fd, data, offset):
            if fcntl.fcntl(fd, fcntl.F_GETFL) & O_DIRECT:
                raise OSError(errno.EINVAL, "Invalid argument (O_DIRECT write refused, injected)")
            return real_pwrite(fd, data, offset)

        monkeypatch.setattr(os, "pwrite", refusing_pwrite)
    monkeypatch.setattr(record_writer, "_REFUSED_LOGGED", set())
    return request.param


@linux_only
def test_a_filesystem_that_refuses_o_direct_gets_the_page_cache_reported_and_logged_once(tmp_path, refusing, caplog):
    state = _state()
    caplog.set_level(logging.INFO, logger=record_writer.__name__)
    with CheckpointManager(str(tmp_path / "ckpt"), async_mode="thread") as manager:
        for step in (1, 2):
            stats = manager.save(step, state)
            manager.wait()
            assert stats.direct_io is False and stats.error is None
        _check_checkpoint(manager, state, tmp_path)
    refusals = [r.getMessage() for r in caplog.records if "refuses O_DIRECT" in r.getMessage()]
    assert len(refusals) == 1 and f"EINVAL on {refusing}" in refusals[0], refusals


@linux_only
@pytest.mark.parametrize("misalignment", [0, 64, 1000])
def test_a_large_tensor_goes_to_the_disk_from_its_own_memory_wherever_it_lies(tmp_path, misalignment, monkeypatch):
    """The record of a large tensor is placed so that its data can be written with O_DIRECT straight from the
    tensor's memory, at any address (the disk wants 512- or 4096-byte alignment, torch gives 64): one large write
    whose memory is the tensor's, and every byte still where PyTorch's readers look for it."""
    if not _accepts_direct_io(tmp_path):
        pytest.skip(f"the filesystem of {tmp_path} refuses O_DIRECT")
    size = 3 * record_writer.DIRECT_FROM_MEMORY + 12  # bytes, not a multiple of the block
    backing = bytearray(size + 4096 + misalignment)
    start = (-_address(backing)) % 4096 + misalignment  # the tensor's first byte lies `misalignment` past a page
    big = torch.frombuffer(backing, dtype=torch.uint8, offset=start, count=size)
    big.copy_(torch.randint(0, 256, (size,), dtype=torch.uint8, generator=torch.Generator().manual_seed(5)))
    assert big.untyped_storage().data_ptr() % 4096 == misalignment
    state = {"small": torch.randn(3, 5), "big": big, "after": torch.randn(2 * record_writer.DIRECT_FROM_MEMORY // 4)}

    addresses: list[tuple[int, int]] = []
    real_pwrite = os.pwrite

    def watching_pwrite(fd, data, offset):
        view = memoryview(data)
        if len(view) >= record_writer.DIRECT_FROM_MEMORY:
            addresses.append((_address(view), len(view)))
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", watching_pwrite)
    with CheckpointManager(str(tmp_path / "ckpt"), async_mode="sync") as manager:
        stats = manager.save(1, state)
        assert stats.direct_io is True and stats.error is None
        big_address = big.untyped_storage().data_ptr()
        from_memory = [length for address, length in addresses if big_address <= address < big_address + 4096]
        assert from_memory and from_memory[0] >= size - 8192
        _check_checkpoint(manager, state, tmp_path)


def _address(buffer) -> int:
    return int(numpy.frombuffer(buffer, dtype=numpy.uint8).ctypes.data)


@linux_only
def test_processes_forked_after_a_save_write_their_own_bytes(tmp_path):
    """A process that has saved keeps page-aligned buffers for its next save. Two processes forked from it (as
    ``notebook_launcher`` or fork-started ranks are) that save at the same time each get their own bytes back from
    every checkpoint, and every checkpoint verifies against its digests."""
    env = {**os.environ, "PYTHONPATH": REPO}
    done = subprocess.run(
        [sys.executable, os.path.join(SCRIPTS, "fork_writers.py"), str(tmp_path), "10"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-4000:]
