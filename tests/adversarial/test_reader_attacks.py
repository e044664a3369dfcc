"""What can stand in a checkpoint directory in place of the link to a shared blob, and a
second process swapping that file while the checkpoint is loaded. Readers never follow, never block, and never
hand out bytes that do not match the committed checksums."""

from __future__ import annotations

import multiprocessing
import os
import shutil

import pytest
import torch

from dcp_plugin import CheckpointManager, ModelState
from dcp_plugin.errors import CheckpointCorruptError, CheckpointError
from dcp_plugin.storage import CheckpointStorage
from tests.adversarial.helpers import INCREMENTAL, blob_links, flip_a_tensor_byte, two_incremental_saves
from tests.models import make_lora


def _fifo(path: str, area_copy: str) -> None:
    os.mkfifo(path)


def _directory(path: str, area_copy: str) -> None:
    os.mkdir(path)


def _link_to_the_area(path: str, area_copy: str) -> None:
    os.symlink(area_copy, path)  # the very same bytes, through a link: still refused


STAND_INS = {"fifo": _fifo, "directory": _directory, "link-to-the-blob-area": _link_to_the_area}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("stand_in", sorted(STAND_INS))
def test_whatever_stands_in_for_a_blob_link_is_refused_without_blocking(ckpt_dir, stand_in):
    two_incremental_saves(ckpt_dir)
    directory = os.path.join(ckpt_dir, INCREMENTAL)
    name = blob_links(directory)[0]
    os.remove(os.path.join(directory, name))
    STAND_INS[stand_in](os.path.join(directory, name), os.path.join(ckpt_dir, ".dcp-plugin", "blobs", name))
    assert CheckpointStorage(ckpt_dir).verify(INCREMENTAL) != []
    with pytest.raises(CheckpointError, match=name):
        CheckpointManager(ckpt_dir).load({"model": ModelState(make_lora(1, width=128, layers=2))}, step=2)


def _swap_back_and_forth(path: str, good: str, bad: str, started, stop) -> None:
    started.set()
    while not stop.is_set():
        for source in (bad, good):
            shutil.copyfile(source, f"{path}.new")
            os.replace(f"{path}.new", path)


@pytest.mark.slow
def test_a_blob_link_swapped_during_loads_never_yields_other_bytes(ckpt_dir, tmp_path):
    model = two_incremental_saves(ckpt_dir)
    directory = os.path.join(ckpt_dir, INCREMENTAL)
    path = os.path.join(directory, blob_links(directory)[0])
    good, bad = str(tmp_path / "good"), str(tmp_path / "bad")
    shutil.copyfile(path, good)
    flip_a_tensor_byte(path)
    shutil.copyfile(path, bad)
    shutil.copyfile(good, path)
    context = multiprocessing.get_context("spawn")
    started, stop = context.Event(), context.Event()
    swapper = context.Process(target=_swap_back_and_forth, args=(path, good, bad, started, stop))
    swapper.start()
    started.wait(60)
    loaded = refused = 0
    try:
        for _ in range(30):
            fresh = make_lora(1, width=128, layers=2)
            try:
                CheckpointManager(ckpt_dir).load({"model": ModelState(fresh)}, step=2)
            except CheckpointCorruptError:
                refused += 1
                continue
            loaded += 1
            for key, value in model.state_dict().items():
                assert torch.equal(fresh.state_dict()[key], value), key
    finally:
        stop.set()
        swapper.join(10)
        if swapper.is_alive():
            swapper.kill()
    assert loaded + refused == 30 and refused > 0, (loaded, refused)
