"""Bounded-memory staging (``max_staging_bytes``): a fixed pool, waves, an exact and consistent snapshot."""

from __future__ import annotations

import threading

import lightning.pytorch as pl
import pytest
import torch
from torch.distributed.checkpoint import FileSystemWriter

import tests.faultyfs  # noqa: F401 - registers faulty://
from dcp_plugin import (
    CheckpointConfig,
    CheckpointManager,
    CheckpointSaveError,
    ConfigError,
    ModelState,
    OptimizerState,
    SaveStats,
)
from dcp_plugin.engine.checkpoint_engine import CheckpointEngine
from dcp_plugin.engine.staging.pool import StagingPool
from dcp_plugin.storage import record_writer
from dcp_plugin.storage.record_writer import RecordFile
from tests.lightning.helpers import TinyModule, full, loader
from tests.lightning.helpers import trainer as lightning_trainer
from tests.models import assert_same, make_training, snapshot, train_step
from tests.multiproc import run_ranks

BUDGET = 64 * 1024


def training_state(seed: int = 0) -> tuple[dict, torch.nn.Module, torch.optim.Optimizer]:
    """A trained model + AdamW (optimizer moments), 120 small tensors of mixed dtypes, one tensor larger than
    the budget, and an empty one: far more bytes than the pool holds."""
    model, optimizer, scheduler = make_training(seed)
    for _ in range(2):
        train_step(model, optimizer, scheduler)
    generator = torch.Generator().manual_seed(seed)
    dtypes = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.uint8, torch.bool]
    extra = {}
    for i in range(120):
        values = torch.randn(37 + 29 * i, generator=generator) * 100
        extra[f"t{i:03d}"] = values.to(dtypes[i % len(dtypes)])
    extra["larger_than_the_pool"] = torch.randn(3 * BUDGET // 4, generator=generator)  # 3x the budget in bytes
    extra["transposed"] = torch.randn(40, 30, generator=generator).t()  # not contiguous
    extra["empty"] = torch.empty(0, 7)
    state = {"model": model, "optim": optimizer, "extra": extra}
    return state, model, optimizer


def state_bytes(state: dict) -> tuple[int, int]:
    """Total and largest tensor bytes of the state as saved."""
    sizes = [t.nbytes for t in state["extra"].values()]
    sizes += [t.nbytes for t in state["model"].state_dict().values()]
    sizes += [v.nbytes for s in state["optim"].state_dict()["state"].values() for v in s.values() if torch.is_tensor(v)]
    return sum(sizes), max(sizes)


def pool_of(manager: CheckpointManager) -> StagingPool:
    pool = manager.engine._stagers._pool
    assert pool is not None, "the save did not go through the staging pool"
    return pool


@pytest.fixture()
def written_tensors(monkeypatch):
    """Every tensor the writer threads write (a spy on the per-tensor record; the write itself happens)."""
    seen: list[torch.Tensor] = []
    original = record_writer.tensor_record

    def spy(tensor):
        seen.append(tensor)
        return original(tensor)

    monkeypatch.setattr(record_writer, "tensor_record", spy)
    return seen


@pytest.mark.parametrize("thread_count", [1, 2])
def test_the_pool_never_exceeds_its_budget_and_the_round_trip_is_bit_exact(tmp_path, written_tensors, thread_count):
    state, model, optimizer = training_state()
    expected = snapshot(model, optimizer)
    expected_extra = {k: v.clone() for k, v in state["extra"].items()}
    total, largest = state_bytes(state)
    assert largest > BUDGET and total > 10 * BUDGET
    with CheckpointManager(str(tmp_path), max_staging_bytes=BUDGET, thread_count=thread_count) as manager:
        manager.save(1, state)
        manager.wait()
        pool = pool_of(manager)
        assert 0 < pool.peak_bytes <= BUDGET + largest
        assert pool.live_bytes == 0  # everything went back after the write
        arena = pool._arena
        assert arena is not None
        start, end = arena.data_ptr(), arena.data_ptr() + arena.nbytes()
        # every tensor DCP wrote came out of the pool: inside the arena, or (only when larger than the pool)
        # in a block of its own, never the live tensor itself
        live = {t.data_ptr() for t in state["extra"].values() if t.nbytes}
        for tensor in written_tensors:
            if tensor.nbytes == 0:
                continue
            if tensor.nbytes <= BUDGET:
                assert start <= tensor.data_ptr() and tensor.data_ptr() + tensor.nbytes <= end
            else:
                assert tensor.data_ptr() not in live and not start <= tensor.data_ptr() < end
        fresh_model, fresh_optimizer, _ = make_training(seed=5)
        fresh = {"model": fresh_model, "optim": fresh_optimizer, "extra": None}
        manager.load(fresh)
    assert_same(snapshot(fresh_model, fresh_optimizer), expected)
    assert_same(fresh["extra"], expected_extra)


def test_a_budget_larger_than_the_state_stages_everything_at_once(tmp_path):
    state, model, optimizer = training_state()
    total, _ = state_bytes(state)
    expected = snapshot(model, optimizer)
    with CheckpointManager(str(tmp_path), max_staging_bytes=4 * total) as manager:
        manager.save(1, state)
        manager.wait()
        assert pool_of(manager).peak_bytes <= 4 * total
        fresh_model, fresh_optimizer, _ = make_training(seed=5)
        manager.load({"model": fresh_model, "optim": fresh_optimizer, "extra": None})
    assert_same(snapshot(fresh_model, fresh_optimizer), expected)


@pytest.fixture()
def writes_on_hold(monkeypatch):
    """Data writes wait until the returned event is set (nothing is written before; nothing fails)."""
    gate = threading.Event()
    original = RecordFile.append

    def append(self, *buffers):
        assert gate.wait(120), "the test never let the writes through"
        return original(self, *buffers)

    monkeypatch.setattr(RecordFile, "append", append)
    return gate


def test_training_between_waves_gets_the_snapshot_of_the_save(tmp_path, writes_on_hold):
    state, model, optimizer = training_state()
    before = snapshot(model, optimizer)
    manager = CheckpointManager(str(tmp_path), max_staging_bytes=BUDGET, async_staging=True)
    try:
        stats = manager.save(1, state)  # returns at once: staging and writing continue in the background
        staging = manager.engine._in_flight.staging
        # nothing is written yet, so the pool cannot take the whole state: staging is not finished
        assert staging is not None and not staging.done()
        stepped = threading.Thread(target=train_step, args=(model, optimizer))
        stepped.start()  # forward/backward run now; optimizer.step() waits until every tensor is staged
        writes_on_hold.set()
        stepped.join(120)
        assert not stepped.is_alive()
        manager.wait()
        assert stats.error is None and staging.done()
        after = snapshot(model, optimizer)
        with pytest.raises(AssertionError):
            assert_same(after, before)  # training did change the parameters and moments
        fresh_model, fresh_optimizer, _ = make_training(seed=5)
        manager.load({"model": fresh_model, "optim": fresh_optimizer, "extra": None})
        assert_same(snapshot(fresh_model, fresh_optimizer), before)  # the checkpoint holds the values at save
    finally:
        writes_on_hold.set()
        manager.close()


def test_without_async_staging_save_returns_once_everything_is_staged(tmp_path):
    state, model, optimizer = training_state()
    before = snapshot(model, optimizer)
    with CheckpointManager(str(tmp_path), max_staging_bytes=BUDGET, async_staging=False) as manager:
        manager.save(1, state)
        flight = manager.engine._in_flight
        assert flight.staging.done()  # the live state may change right away
        with torch.no_grad():
            for tensor in list(model.parameters()) + list(state["extra"].values()):
                tensor.add_(1) if tensor.dtype != torch.bool else tensor.logical_not_()
        manager.wait()
        fresh_model, fresh_optimizer, _ = make_training(seed=5)
        manager.load({"model": fresh_model, "optim": fresh_optimizer, "extra": None})
    assert_same(snapshot(fresh_model, fresh_optimizer), before)


@pytest.mark.parametrize("thread_count", [1, 2])
def test_a_failing_wave_surfaces_and_keeps_the_earlier_checkpoint(tmp_path, thread_count):
    state, model, optimizer = training_state()
    first = snapshot(model, optimizer)
    manager = CheckpointManager(f"faulty://{tmp_path}/ckpts", max_staging_bytes=BUDGET, thread_count=thread_count)
    with manager:
        manager.save(1, state)
        manager.wait()
        train_step(model, optimizer)
        (tmp_path / ".fail-writes").touch()
        manager.save(2, state)
        with pytest.raises(CheckpointSaveError, match=r"step_000000002.*No space left on device"):
            manager.wait()
        assert pool_of(manager).live_bytes == 0  # the failed save gave the whole pool back
        assert manager.steps == [1]
        assert manager.storage.incomplete() == []
        fresh_model, fresh_optimizer, _ = make_training(seed=5)
        manager.load({"model": fresh_model, "optim": fresh_optimizer, "extra": None}, step=1)
        assert_same(snapshot(fresh_model, fresh_optimizer), first)
        (tmp_path / ".fail-writes").unlink()
        manager.save(3, state)  # the pool works again after a failure
        manager.wait()
        assert manager.steps == [1, 3]


def test_a_writer_that_cannot_read_the_pool_is_refused(tmp_path):
    engine = CheckpointEngine(CheckpointConfig(max_staging_bytes=BUDGET), distributed=False)
    stats = SaveStats(name="x", url=str(tmp_path / "x"), step=1, mode="thread", blocking_s=0.0)
    with pytest.raises(ConfigError, match="max_staging_bytes needs a dcp-plugin storage writer"):
        engine.save({"w": torch.ones(4)}, FileSystemWriter(str(tmp_path / "x")), stats=stats, started=0.0)
    engine.close()


def test_the_pool_waits_for_room_and_coalesces_what_comes_back():
    pool = StagingPool(1024)
    never = lambda: False  # noqa: E731
    a, b, c = (pool.allocate(300, never) for _ in range(3))
    assert pool.live_bytes == 900
    took: list = []
    waiter = threading.Thread(target=lambda: took.append(pool.allocate(600, never)))
    waiter.start()  # 124 bytes free: waits for room
    pool.release(a)  # 300 + 124 free, not adjacent: still no room for 600
    assert took == []
    pool.release(b)  # a and b merge into 600 contiguous bytes
    waiter.join(60)
    assert took and took[0] is not None and took[0].offset == 0
    assert pool.live_bytes == 900 and pool.peak_bytes == 900
    big = pool.allocate(5000, never)  # larger than the pool: beside it, one at a time
    assert big is not None and big.own is not None and pool.live_bytes == 5900
    second: list = []
    waiter = threading.Thread(target=lambda: second.append(pool.allocate(4000, never)))
    waiter.start()
    pool.release(big)
    waiter.join(60)
    assert second and second[0] is not None and pool.live_bytes == 4900
    assert pool.peak_bytes <= pool.budget + 5000
    for block in (c, took[0], second[0]):
        pool.release(block)
    assert pool.live_bytes == 0 and pool._free == [(0, 1024)]


# -- two ranks, sharded (FSDP2 DTensors) -----------------------------------------------------------------


def fsdp_save_bounded(rank, world_size, directory):
    from tests.test_distributed import _fsdp_training, _full_state

    model, optimizer = _fsdp_training(0)
    torch.manual_seed(11)
    for _ in range(2):
        train_step(model, optimizer)
    with CheckpointManager(directory, async_mode="thread") as manager:  # the budget comes from the environment
        assert manager.config.max_staging_bytes == 1024
        manager.save(2, {"model": ModelState(model), "optim": OptimizerState(model, optimizer)})
        manager.wait()
        pool = pool_of(manager)
        local_shards = sum(t.to_local().nbytes for t in model.state_dict().values())
    return {"full": _full_state(model, optimizer), "pool": (pool.peak_bytes, pool.largest_bytes), "local": local_shards}


@pytest.mark.slow
def test_two_sharded_ranks_stage_their_shards_through_the_pool_and_reshard_on_load(tmp_path, monkeypatch):
    from tests.test_distributed import fsdp_load

    directory = str(tmp_path / "ckpts")
    monkeypatch.setenv("DCP_PLUGIN_MAX_STAGING_BYTES", "1KiB")  # the spawned ranks inherit it
    saved = run_ranks(fsdp_save_bounded, directory)
    for rank in range(2):
        peak, largest = saved[rank]["pool"]
        assert 0 < peak <= 1024 + largest and peak < 3 * saved[rank]["local"]  # model + two AdamW moments
    monkeypatch.delenv("DCP_PLUGIN_MAX_STAGING_BYTES")
    loaded = run_ranks(fsdp_load, directory, "thread", world_size=1)
    assert_same(loaded[0]["full"], saved[0]["full"])


# -- Lightning ---------------------------------------------------------------------------------------------------


class _SnapshotAtSave(pl.Callback):
    """Copies the weights and optimizer state at every step, just before ModelCheckpoint saves them."""

    def __init__(self) -> None:
        self.at_step: dict[int, dict] = {}

    def on_train_batch_end(self, trainer: pl.Trainer, module: pl.LightningModule, *args: object) -> None:
        optimizer = trainer.optimizers[0]
        self.at_step[trainer.global_step] = {
            "weights": full({k: v.detach().clone() for k, v in module.state_dict().items()}),
            "optimizer": full(optimizer.state_dict()["state"]),
        }


def test_a_lightning_run_with_bounded_async_staging_saves_what_each_step_had(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    from dcp_plugin.lightning import DCPCheckpointIO

    plugin = DCPCheckpointIO(async_mode="thread", async_staging=True, max_staging_bytes=256)
    snapshots = _SnapshotAtSave()
    saves = ModelCheckpoint(dirpath=str(tmp_path / "ckpts"), every_n_train_steps=1, save_top_k=-1)
    run = lightning_trainer(str(tmp_path), plugin, max_epochs=1, callbacks=[snapshots, saves])
    run.fit(TinyModule(), loader())
    assert len(snapshots.at_step) > 2
    reader = DCPCheckpointIO()
    for step, expected in snapshots.at_step.items():
        (path,) = (tmp_path / "ckpts").glob(f"*step={step}.ckpt")
        checkpoint = reader.load_checkpoint(str(path))
        assert_same(full(checkpoint["state_dict"]), expected["weights"])
        assert_same(full(checkpoint["optimizer_states"][0]["state"]), expected["optimizer"])


def test_a_writer_that_writes_in_another_order_fails_the_save_instead_of_hanging(tmp_path, monkeypatch):
    from dcp_plugin.storage import dcp_io

    def reversed_files(self, plan):  # as if DCP's writer threads took a file's tensors in another order
        return [list(reversed(files)) for files in original(self, plan)]

    original = dcp_io._CommitOnFinish._files_in_writing_order
    monkeypatch.setattr(dcp_io._CommitOnFinish, "_files_in_writing_order", reversed_files)
    state = {"extra": {f"t{i}": torch.full((100,), float(i)) for i in range(4)}}  # each larger than the pool
    with CheckpointManager(str(tmp_path), max_staging_bytes=64, thread_count=1) as manager:
        manager.save(1, {"a": torch.ones(3)})  # the skeleton and one tensor: fine in either order
        manager.wait()
        manager.save(2, state)
        with pytest.raises(CheckpointSaveError, match="writes in another order than bounded staging expects"):
            manager.wait()
        assert manager.steps == [1]


class _NormModule(TinyModule):
    """Batch normalisation: its running statistics change in every forward pass, before any optimizer step."""

    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.BatchNorm1d(16), torch.nn.Linear(16, 1))


def test_a_lightning_run_never_saves_running_statistics_of_a_later_forward_pass(tmp_path, monkeypatch):
    """With the snapshot copied in the background (slowly here, so the copy outlasts the next forward pass), the
    forward pass waits for it, as the optimizer step does (Lightning runs forward inside the step only when it
    steps: not with gradient accumulation, not with manual optimization)."""
    import time

    from lightning.pytorch.callbacks import ModelCheckpoint
    from torch.distributed.checkpoint.staging import DefaultStager

    from dcp_plugin.lightning import DCPCheckpointIO

    original = DefaultStager._stage

    def slow_stage(self, *args, **kwargs):
        time.sleep(0.3)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(DefaultStager, "_stage", slow_stage)

    class SnapshotAtStep(_SnapshotAtSave):  # the batch that stepped (and saved), not the accumulating one after
        def on_train_batch_end(self, trainer: pl.Trainer, *args: object) -> None:
            if trainer.global_step not in self.at_step:
                super().on_train_batch_end(trainer, *args)

    plugin = DCPCheckpointIO(async_mode="thread", async_staging=True)
    snapshots = SnapshotAtStep()
    saves = ModelCheckpoint(dirpath=str(tmp_path / "ckpts"), every_n_train_steps=1, save_top_k=-1)
    run = lightning_trainer(
        str(tmp_path), plugin, max_epochs=1, max_steps=3, callbacks=[snapshots, saves], accumulate_grad_batches=2
    )  # the forward pass of a batch that does not step runs outside any optimizer step
    run.fit(_NormModule(), loader())
    reader = DCPCheckpointIO()
    del snapshots.at_step[0]  # no step, no save
    assert len(snapshots.at_step) >= 2
    for step, expected in snapshots.at_step.items():
        (path,) = (tmp_path / "ckpts").glob(f"*step={step}.ckpt")
        assert_same(full(reader.load_checkpoint(str(path))["state_dict"]), expected["weights"])
