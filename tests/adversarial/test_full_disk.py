"""Issue 27, item 10: a real small filesystem that fills up. A failed save leaves nothing behind (its partial
blob included), so freeing the space is enough for the next save. Skipped, saying why, where a tmpfs cannot be
mounted."""

from __future__ import annotations

import os

import pytest
import torch

from dcp_plugin import CheckpointManager, ModelState
from dcp_plugin.errors import CheckpointSaveError
from tests.adversarial.helpers import small_tmpfs
from tests.models import make_lora


def _files_under(path: str) -> list[str]:
    return sorted(os.path.relpath(os.path.join(d, f), path) for d, _, files in os.walk(path) for f in files)


def _fill(disk: str, leave: int) -> str:
    """A file that leaves about ``leave`` bytes free on ``disk``."""
    filler = os.path.join(disk, "filler")
    status = os.statvfs(disk)
    free = status.f_bavail * status.f_frsize
    with open(filler, "wb") as handle:
        handle.write(b"\1" * max(0, free - leave))
    return filler


@pytest.mark.parametrize("mode", ["sync", "thread"])
def test_a_save_that_fills_the_disk_leaves_no_partial_blob_and_the_next_save_works(tmp_path, mode):
    with small_tmpfs(str(tmp_path / "disk"), size="6m") as disk:
        root = os.path.join(disk, "run")
        model = make_lora(width=384, layers=4)  # a frozen base of about 2.4 MB: written to shared blobs
        frozen = sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)
        filler = _fill(disk, leave=frozen // 2)
        with CheckpointManager(root, async_mode=mode) as manager:
            with pytest.raises(CheckpointSaveError, match="No space left"):
                manager.save(1, {"model": ModelState(model)})
                manager.wait()
            assert _files_under(root) == [], "a failed save left files behind"
            os.remove(filler)  # freeing what filled the disk is enough
            manager.save(2, {"model": ModelState(model)})
            manager.wait()
            assert manager.steps == [2]
        fresh = make_lora(3, width=384, layers=4)
        CheckpointManager(root).load({"model": ModelState(fresh)})
        assert all(torch.equal(fresh.state_dict()[k], v) for k, v in model.state_dict().items())
