"""ModelParallelStrategy (FSDP2) on 2 CPU ranks: async sharded saves, exact resume, resharding to 1 rank."""

from __future__ import annotations

import os

import pytest

from dcp_plugin.lightning import DCPCheckpointIO, DCPModelParallelStrategy
from tests.lightning.helpers import ShardedModule, full, loader, resume_run, seed_all, trainer
from tests.models import assert_same
from tests.multiproc import run_ranks

pytestmark = pytest.mark.slow


def _fsdp2(world_size: int) -> DCPModelParallelStrategy:
    return DCPModelParallelStrategy(data_parallel_size=world_size, tensor_parallel_size=1)


def _resume(rank: int, world_size: int, root: str, mode: str) -> tuple[dict, dict, list[str]]:
    expected, resumed = resume_run(
        root,
        lambda: DCPCheckpointIO(async_mode=mode),
        strategy_factory=lambda: _fsdp2(world_size),
        devices=world_size,
        module_factory=ShardedModule,
    )
    files = sorted(os.listdir(os.path.join(root, "ckpts", "epoch=0-step=2.ckpt")))
    return expected, resumed, files


@pytest.mark.parametrize("mode", ["thread", "process"])
def test_fsdp2_async_sharded_save_and_exact_resume(tmp_path, mode):
    results = run_ranks(_resume, str(tmp_path), mode, world_size=2)
    for expected, resumed, _files in results:
        assert resumed.pop("hook_key") == {"steps": 2, 7: (1, 2), "empty": []}
        for key in expected:
            assert_same(expected[key], resumed[key], key)
    # every rank wrote its own shard file
    writers = {f.split("_")[2] for f in results[0][2] if f.endswith(".distcp")}  # __<rank>_<thread>.distcp
    assert writers == {"0", "1"}
    assert "dcp_plugin.json" in results[0][2]


def _train_two_ranks(rank: int, world_size: int, root: str) -> None:
    from tests.lightning.helpers import every_epoch_checkpoint

    seed_all(0)
    module = ShardedModule()
    run = trainer(
        root,
        DCPCheckpointIO(async_mode="thread"),
        max_epochs=1,
        callbacks=[every_epoch_checkpoint(os.path.join(root, "ckpts"), 2)],
        strategy=_fsdp2(world_size),
        devices=world_size,
    )
    run.fit(module, loader())


def _resume_one_rank(rank: int, world_size: int, root: str) -> dict:
    import lightning.pytorch as pl

    captured: dict = {}

    class Capture(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            optimizer = trainer.optimizers[0]
            captured["weights"] = full({k: v.detach().clone() for k, v in pl_module.state_dict().items()})
            captured["optimizer"] = full(optimizer.state_dict())
            captured["global_step"] = trainer.global_step

    seed_all(5)
    module = ShardedModule()
    run = trainer(root, DCPCheckpointIO(), max_epochs=2, callbacks=[Capture()], strategy=_fsdp2(1), devices=1)
    run.fit(module, loader(), ckpt_path=os.path.join(root, "ckpts", "epoch=0-step=2.ckpt"))
    captured["final_step"] = run.global_step
    return captured


def test_fsdp2_checkpoint_of_two_ranks_loads_on_one(tmp_path):
    root = str(tmp_path)
    run_ranks(_train_two_ranks, root, world_size=2)
    (loaded,) = run_ranks(_resume_one_rank, root, world_size=1)

    saved = DCPCheckpointIO().load_checkpoint(os.path.join(root, "ckpts", "epoch=0-step=2.ckpt"))
    assert loaded["global_step"] == saved["global_step"] == 2
    assert_same(saved["state_dict"], loaded["weights"], "weights")
    assert_same(saved["optimizer_states"][0], loaded["optimizer"], "optimizer")
    assert loaded["final_step"] > 2  # training went on from the resharded state
