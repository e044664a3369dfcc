"""A real small filesystem that fills up. A failed save leaves nothing behind (its partial
blob included), so freeing the space is enough for the next save. Skipped, saying why, where a loop device cannot be
mounted. (A directory in host memory is checked for room before anything is written: tests/tiers/test_nodes.py.)"""

from __future__ import annotations

import os

import pytest
import torch

from dcp_plugin import CheckpointManager, ModelState
from dcp_plugin.errors import CheckpointSaveError
from tests.adversarial.helpers import small_disk
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
    with small_disk(str(tmp_path / "disk"), size_mib=8) as disk:
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


def test_an_aborted_write_on_s3_removes_its_partial_blobs_and_no_others(s3_url):
    """The marker-commit path (object stores), on a real S3 server: what a failed write created in the shared
    blob area goes with it; blobs of other writes stay."""
    from dcp_plugin.storage import CheckpointStorage
    from dcp_plugin.storage.blobs import blob_name, write_id_of_entry

    url, options = s3_url
    storage = CheckpointStorage(url, options)
    pending = storage.begin_write("step_000000001")
    pending.manifest["save_id"] = "0" * 32
    mine = f"{storage.blob_area}/{blob_name(write_id_of_entry(pending.write_name), 0, 0)}"
    other = f"{storage.blob_area}/{blob_name('abcdefabcdef', 0, 0)}"
    storage.fs.pipe_file(mine, b"partial")
    storage.fs.pipe_file(other, b"someone else's")
    storage.abort(pending)
    storage.fs.invalidate_cache()
    assert not storage.fs.exists(mine) and storage.fs.exists(other)


def test_an_abort_reported_after_the_commit_point_leaves_the_checkpoint_alone(s3_url):
    """A failure reported after a write committed (its marker is there) must not remove what the marker names."""
    from dcp_plugin.storage import CheckpointStorage, PendingWrite

    url, options = s3_url
    model = make_lora(width=128, layers=2)
    with CheckpointManager(url, async_mode="sync", storage_options=options) as manager:
        manager.save(1, {"model": ModelState(model)})
    storage = CheckpointStorage(url, options)
    manifest = storage.read_manifest("step_000000001")
    directory = f"{storage.root}/{manifest['location']}"
    storage.abort(PendingWrite("step_000000001", directory, False, {"save_id": manifest["save_id"]}))
    assert storage.verify("step_000000001") == []
