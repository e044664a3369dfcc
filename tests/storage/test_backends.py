"""The same save/load behaviour on local disk, memory:// and s3:// (a real S3 server on 127.0.0.1)."""

from __future__ import annotations

import os

import pytest
import torch

from dcp_plugin import CheckpointManager, CheckpointNotFoundError, RNGState
from tests.models import assert_same, make_training, snapshot, train_step


@pytest.fixture(params=["local", "memory", pytest.param("s3", marks=pytest.mark.s3)])
def location(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "ckpts"), {}
    if request.param == "memory":
        return request.getfixturevalue("memory_url"), {}
    return request.getfixturevalue("s3_url")


@pytest.mark.parametrize("mode", ["sync", "thread"])
def test_roundtrip_listing_and_overwrite(location, mode):
    url, options = location
    model, optimizer, scheduler = make_training()
    train_step(model, optimizer, scheduler)
    with CheckpointManager(url, async_mode=mode, storage_options=options) as manager:
        manager.save(1, {"model": model, "optim": optimizer, "sched": scheduler, "rng": RNGState()})
        expected = snapshot(model, optimizer)
        train_step(model, optimizer, scheduler)
        manager.save(2, {"model": model, "optim": optimizer, "sched": scheduler, "rng": RNGState()})
        manager.wait()
        assert manager.steps == [1, 2]
        # replacing a committed checkpoint keeps it loadable until the new one is committed
        manager.save(2, {"model": model, "optim": optimizer}, overwrite=True)
        manager.wait()
        assert manager.steps == [1, 2]
        assert manager.storage.incomplete() == []

    model2, optimizer2, scheduler2 = make_training(seed=42)
    with CheckpointManager(url, async_mode=mode, storage_options=options) as manager:
        manager.load({"model": model2, "optim": optimizer2, "sched": scheduler2}, step=1)
        assert_same(snapshot(model2, optimizer2), expected)
        manager.delete(1)
        assert manager.steps == [2]
        with pytest.raises(CheckpointNotFoundError):
            manager.load({"model": model2}, step=1)


@pytest.mark.s3
@pytest.mark.slow
def test_process_mode_writes_to_s3(s3_url):
    url, options = s3_url
    model, optimizer, _ = make_training()
    with CheckpointManager(url, async_mode="process", storage_options=options) as manager:
        manager.save(7, {"model": model, "optim": optimizer})
        expected = snapshot(model, optimizer)
        manager.wait_for_staging()  # an edit outside the optimizer waits for the background copy itself
        with torch.no_grad():
            model[0].weight.zero_()
        manager.wait()
        model2, optimizer2, _ = make_training(seed=5)
        manager.load({"model": model2, "optim": optimizer2})
    assert_same(snapshot(model2, optimizer2), expected)


@pytest.mark.s3
def test_uncommitted_data_on_s3_is_never_listed_and_purge_removes_only_it(s3_url):
    """A crash on an object store leaves data without a commit marker: never listed, removed by purge."""
    url, options = s3_url
    model, _, _ = make_training()
    with CheckpointManager(url, async_mode="sync", storage_options=options) as manager:
        manager.save(1, {"model": model})
        fs = manager.storage.fs
        root = manager.storage.root
        leftover = ".dcp-plugin/objects/step_000000002.0123456789ab"
        fs.pipe(f"{root}/{leftover}/__0_0.distcp", b"partial")
        assert manager.steps == [1]
        assert manager.storage.incomplete() == [leftover]
        assert manager.storage.purge() == [leftover]
        assert manager.steps == [1]
        restored = make_training(seed=3)[0]
        manager.load({"model": restored}, step=1)
        assert_same(restored.state_dict(), model.state_dict())
        manager.save(2, {"model": model})
        assert manager.steps == [1, 2]


def test_interrupted_two_step_replacement_is_listed_under_its_name_and_restored_by_the_next_write(tmp_path):
    """Without an atomic exchange a local replacement moves the old copy aside first; a crash right then leaves
    the name empty. The copy set aside is still that checkpoint: listed and loaded by its name, moved back by the
    next writer of that name."""
    url = str(tmp_path / "ckpts")
    model, _, _ = make_training()
    with CheckpointManager(url, async_mode="sync") as manager:
        manager.save(3, {"model": model})
        storage = manager.storage
        name = "step_000000003"
        aside = tmp_path / "ckpts" / ".dcp-plugin" / "replaced" / f"{name}.0123456789ab"
        aside.parent.mkdir(parents=True)
        os.rename(tmp_path / "ckpts" / name, aside)  # the crash left only the copy set aside

        assert manager.steps == [3]
        assert storage.info(name).url == str(aside)
        restored = make_training(seed=3)[0]
        manager.load({"model": restored}, step=3)
        assert_same(restored.state_dict(), model.state_dict())
        assert storage.incomplete() == []  # it is committed data: purge leaves it alone

        storage.abort(storage.begin_write(name, overwrite=True))  # the writer side moves it back into place
        assert (tmp_path / "ckpts" / name / "dcp_plugin.json").exists()
        assert not aside.exists()
        assert manager.steps == [3]
