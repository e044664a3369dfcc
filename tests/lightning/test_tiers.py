"""DCPCheckpoint with a remote tier: a real Trainer replicates to S3 (moto), a fresh machine resumes from it."""

from __future__ import annotations

import json
import shutil

import lightning.pytorch as pl
import pytest
import torch

from dcp_plugin import CheckpointStorage
from dcp_plugin.lightning import DCPCheckpoint, DCPCheckpointIO
from tests.lightning.helpers import TinyModule, loader, seed_all, trainer

pytestmark = pytest.mark.s3


def _weights(module: TinyModule) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_checkpoints_are_replicated_and_a_fresh_machine_resumes_from_s3(tmp_path, s3_url, monkeypatch):
    url, options = s3_url
    local = str(tmp_path / "local")
    seed_all(0)
    first_module = TinyModule()
    callback = DCPCheckpoint(local, every_n_train_steps=2, remote=url, remote_storage_options=options)
    first = trainer(str(tmp_path), DCPCheckpointIO(), max_epochs=1, callbacks=[callback])
    first.fit(first_module, loader())
    assert first.global_step == 4
    # fit returns once the copies are committed remotely
    assert [i.step for i in CheckpointStorage(url, options).list()] == [2, 4]
    shutil.rmtree(local)  # a new machine: the local tier is empty

    # configured through the environment only, as a launcher would
    monkeypatch.setenv("DCP_PLUGIN_REMOTE", url)
    monkeypatch.setenv("DCP_PLUGIN_REMOTE_STORAGE_OPTIONS", json.dumps(options))
    seed_all(99)
    second_module = TinyModule()
    resumed = DCPCheckpoint(local, every_n_train_steps=2)
    second = trainer(str(tmp_path), DCPCheckpointIO(), max_epochs=1, callbacks=[resumed])
    second.fit(second_module, loader())  # auto-resume: nothing left to train after step 4
    assert second.ckpt_path == CheckpointStorage(local).url("step_000000004")  # copied back to the local tier
    assert second.global_step == 4
    assert resumed.run_id == callback.run_id
    for key, value in _weights(first_module).items():
        assert torch.equal(_weights(second_module)[key], value), key


def test_replicate_every_n_steps_and_remote_keep_last(tmp_path, s3_url):
    url, options = s3_url
    local = str(tmp_path / "local")
    callback = DCPCheckpoint(
        local,
        every_n_train_steps=1,
        keep_last=1,
        remote=url,
        remote_storage_options=options,
        replicate_every_n_steps=2,
        remote_keep_last=1,
        auto_resume=False,
    )
    trainer(str(tmp_path), DCPCheckpointIO(), max_epochs=1, callbacks=[callback]).fit(TinyModule(), loader())
    assert [i.step for i in CheckpointStorage(local).list()] == [4]
    assert [i.step for i in CheckpointStorage(url, options).list()] == [4]


class _KeepRanks(pl.Callback):
    """Holds on to the callback's per-rank replication exchange, to read what this rank uploaded after fit."""

    def __init__(self, callback: DCPCheckpoint) -> None:
        self.callback, self.ranks = callback, None

    def on_train_start(self, *args) -> None:
        self.ranks = self.callback.tiers.tiers.ranks


def _fit_replicated(rank: int, world_size: int, root: str, sharded: bool) -> dict:
    import os

    from lightning.pytorch.strategies import DDPStrategy

    from dcp_plugin.lightning import DCPModelParallelStrategy
    from tests.lightning.helpers import ShardedModule, dataset

    local, remote = os.path.join(root, "local"), os.path.join(root, "remote")
    callback = DCPCheckpoint(local, every_n_train_steps=1, remote=remote, auto_resume=False)
    keep = _KeepRanks(callback)
    strategy = DCPModelParallelStrategy(data_parallel_size=world_size, tensor_parallel_size=1) if sharded else None
    seed_all(0)
    fit = trainer(
        root,
        DCPCheckpointIO(async_mode="thread"),
        max_epochs=1,
        callbacks=[callback, keep],
        strategy=strategy or DDPStrategy(),
        devices=world_size,
    )
    data = torch.utils.data.DataLoader(dataset(n=8 * world_size), batch_size=4)
    fit.fit(ShardedModule() if sharded else TinyModule(), data)
    return {"uploaded": keep.ranks.uploaded, "remote": [i.step for i in CheckpointStorage(remote).list()]}


@pytest.mark.slow
@pytest.mark.parametrize("sharded", [False, True], ids=["ddp", "fsdp2"])
def test_two_ranks_replicate_every_checkpoint_and_fit_returns_once_copied(tmp_path, sharded):
    from tests.multiproc import run_ranks

    results = run_ranks(_fit_replicated, str(tmp_path), sharded, world_size=2)
    assert results[0]["remote"] == [1, 2]
    rank0, rank1 = results[0]["uploaded"], results[1]["uploaded"]
    assert ".metadata" in rank0 and all(f.startswith("__0_") for f in rank0 if f != ".metadata")
    if sharded:  # every rank wrote its shards, and uploads them
        assert rank1 and all(f.startswith("__1_") for f in rank1)
    else:  # DDP: rank 0 wrote the checkpoint alone, and uploads it all
        assert rank1 == []
