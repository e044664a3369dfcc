"""Two tiers on two ranks: each rank uploads the files it wrote; rank 0 commits only when all are checked."""

from __future__ import annotations

import shutil

import pytest

from dcp_plugin import CheckpointManager
from tests.models import assert_same

pytestmark = [pytest.mark.s3, pytest.mark.slow]


def _save_two_ranks_replicated(rank, world_size, local, url, options):
    import torch.distributed as dist

    from dcp_plugin import ModelState, OptimizerState
    from tests.models import train_step
    from tests.test_distributed import _fsdp_training, _full_state

    model, optimizer = _fsdp_training(0)
    uploaded = []
    with CheckpointManager(local, async_mode="thread", remote=url, remote_storage_options=options) as manager:
        for step in (1, 2):
            train_step(model, optimizer)
            manager.save(step, {"model": ModelState(model), "optim": OptimizerState(model, optimizer)})
            manager.wait()
            manager.tiers.replicator.wait()
            uploaded.append(sorted(manager.tiers.ranks.uploaded))
        dist.barrier()
        where = manager.locations()
    return {"uploaded": uploaded, "where": where, "full": _full_state(model, optimizer)}


def _load_from_remote(rank, world_size, fresh, url, options):
    from dcp_plugin import ModelState, OptimizerState
    from tests.test_distributed import _full_state, _plain_training

    model, optimizer = _plain_training(9)
    with CheckpointManager(fresh, async_mode="sync", remote=url, remote_storage_options=options) as manager:
        where = manager.locations()
        info = manager.load({"model": ModelState(model), "optim": OptimizerState(model, optimizer)})
    return {"where": where, "step": info.step, "full": _full_state(model, optimizer)}


def test_each_rank_uploads_its_own_files_and_one_process_resumes_from_s3(tmp_path, s3_url):
    from tests.multiproc import run_ranks

    url, options = s3_url
    saved = run_ranks(_save_two_ranks_replicated, str(tmp_path / "local"), url, options)
    for files in saved[0]["uploaded"]:  # rank 0: the data files it wrote and the metadata
        assert files[0] == ".metadata" and files[1:] and all(f.startswith("__0_") for f in files[1:])
    for files in saved[1]["uploaded"]:  # rank 1: the data files it wrote, not funnelled through rank 0
        assert files and all(f.startswith("__1_") for f in files)
    assert len(saved[1]["uploaded"]) == 2
    assert saved[0]["where"] == {f"step_00000000{s}": ("local", "remote") for s in (1, 2)}
    shutil.rmtree(tmp_path / "local")  # the job's disk is gone
    [loaded] = run_ranks(_load_from_remote, str(tmp_path / "fresh"), url, options, world_size=1)
    assert loaded["where"] == {f"step_00000000{s}": ("remote",) for s in (1, 2)}
    assert loaded["step"] == 2
    assert_same(loaded["full"]["model"], saved[0]["full"]["model"])
    assert_same(loaded["full"]["optim"], saved[0]["full"]["optim"])


def _rank_one_file_damaged(rank, world_size, local, url, options):
    import os

    import torch.distributed as dist

    from dcp_plugin import ModelState, OptimizerState
    from dcp_plugin.tiers.replication import ReplicationError
    from tests.models import train_step
    from tests.test_distributed import _fsdp_training

    model, optimizer = _fsdp_training(0)
    train_step(model, optimizer)
    manager = CheckpointManager(local, async_mode="sync", remote=url, remote_storage_options=options)
    manager.save(1, {"model": ModelState(model), "optim": OptimizerState(model, optimizer)})
    if rank == 1:  # this rank's file is damaged on disk after the save committed, before it is uploaded
        path = os.path.join(local, "step_000000001", "__1_0.distcp")
        with open(path, "r+b") as file:
            file.seek(-100, os.SEEK_END)
            byte = file.read(1)
            file.seek(-100, os.SEEK_END)
            file.write(bytes([byte[0] ^ 0xFF]))
    dist.barrier()
    manager.wait()  # hands the committed checkpoint to the replicators
    error = None
    try:
        manager.close()
    except ReplicationError as err:
        error = str(err)
    return {"error": error, "uploaded": sorted(manager.tiers.ranks.uploaded)}


def test_a_rank_whose_upload_fails_keeps_the_checkpoint_off_the_remote_tier(tmp_path, s3_url):
    from tests.multiproc import run_ranks

    url, options = s3_url
    results = run_ranks(_rank_one_file_damaged, str(tmp_path / "local"), url, options)
    assert results[1]["error"] is None  # rank 0 raises it
    assert "rank 1" in results[0]["error"] and "__1_0.distcp" in results[0]["error"]
    assert "__1_0.distcp" in results[1]["uploaded"]
    with CheckpointManager(url, async_mode="sync", storage_options=options) as remote:
        assert remote.list() == []  # not committed without every rank's files
