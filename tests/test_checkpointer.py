"""Checkpointer: one checkpoint at a path or URL — save, load, read, per-call storage options, consistency."""

from __future__ import annotations

import os

import pytest
import torch

from dcp_plugin import CheckpointConfig, Checkpointer, CheckpointManager, CheckpointNotFoundError, ConfigError, loading
from dcp_plugin.storage import CheckpointStorage
from tests.models import assert_same, make_model


def test_save_load_and_read_by_path(tmp_path):
    path = str(tmp_path / "run" / "best")
    model = make_model(seed=1)
    checkpointer = Checkpointer(CheckpointConfig(async_mode="thread"))
    stats = checkpointer.save(path, {"model": model, "epoch": 3}, step=7, metadata={"score": 0.5}, run_id="r1")
    assert checkpointer.last_stats is stats and stats.url == path
    checkpointer.wait()
    assert stats.durable_s is not None
    target = make_model(seed=2)
    state = {"model": target, "epoch": 0}
    info = checkpointer.load(path, state)
    assert info.step == 7 and info.metadata == {"score": 0.5} and info.manifest["run_id"] == "r1"
    assert state["epoch"] == 3
    assert_same(target.state_dict(), model.state_dict())
    values = checkpointer.read(path, entries=["epoch"])
    assert values == {"epoch": 3}
    with pytest.raises(CheckpointNotFoundError, match="no entries"):
        checkpointer.read(path, entries=["missing"])
    checkpointer.close()


def test_a_storage_and_name_reference_and_per_call_storage_options(memory_url):
    checkpointer = Checkpointer(CheckpointConfig(async_mode="sync"))
    storage = CheckpointStorage(memory_url)
    checkpointer.save((storage, "first"), {"x": torch.arange(3)}, step=1)
    assert [info.name for info in storage.list()] == ["first"]
    located, name = checkpointer.locate(f"{memory_url}/second", {"skip_instance_cache": True})
    assert name == "second" and located.storage_options == {"skip_instance_cache": True}
    assert checkpointer.config.storage_options == {}  # per-call options never change the configuration
    with pytest.raises(TypeError, match="storage_options must be a mapping"):
        checkpointer.locate(f"{memory_url}/third", "s3")
    checkpointer.close()


def test_process_mode_refuses_memory_storage(memory_url):
    checkpointer = Checkpointer(CheckpointConfig(async_mode="process"))
    with pytest.raises(ConfigError, match="memory://"):
        checkpointer.save(f"{memory_url}/a", {"x": 1}, step=1)
    checkpointer.close()


def test_a_shared_engine_is_not_closed_and_config_and_engine_exclude_each_other(tmp_path):
    owner = Checkpointer(CheckpointConfig(async_mode="sync"))
    borrower = Checkpointer(engine=owner.engine)
    borrower.save(str(tmp_path / "a"), {"x": 1}, step=1)
    borrower.close()
    owner.save(str(tmp_path / "b"), {"x": 2}, step=2)  # still usable
    owner.close()
    with pytest.raises(ConfigError, match="not both"):
        Checkpointer(CheckpointConfig(), engine=owner.engine)


class ReplaceDuringLoad:
    """Wraps the reads of a load (``loading._read_tensors``: the skeleton, then the tensors): after its ``at``-th
    call, another writer replaces the checkpoint (synchronously, so the replacement lands exactly between two reads
    of the same load)."""

    def __init__(self, monkeypatch, replace, at: int) -> None:
        self.replace, self.at, self.calls = replace, at, 0
        self.original = loading._read_tensors
        monkeypatch.setattr(loading, "_read_tensors", self)

    def __call__(self, *args, **kwargs):
        self.original(*args, **kwargs)
        self.calls += 1
        if self.calls == self.at:
            self.replace()


@pytest.mark.parametrize("at", [1, 2])  # after reading the skeleton, after reading the tensors
def test_a_load_never_hands_out_a_mix_when_the_checkpoint_is_replaced_while_read(ckpt_dir, at, monkeypatch):
    weights = torch.nn.ParameterDict({"w": torch.nn.Parameter(torch.zeros(2**12))})
    writer = CheckpointManager(ckpt_dir, async_mode="sync")
    versions = iter(range(1, 100))

    def replace() -> None:
        version = next(versions)
        with torch.no_grad():
            weights["w"].fill_(version)
        writer.save(1, {"model": weights, "version": version}, overwrite=True)

    writer.save(1, {"model": weights, "version": 0})
    reader = CheckpointManager(ckpt_dir, async_mode="sync")
    hook = ReplaceDuringLoad(monkeypatch, replace, at)
    target = torch.nn.ParameterDict({"w": torch.nn.Parameter(torch.full((2**12,), -1.0))})
    state = {"model": target, "version": -1}
    reader.load(state, step=1)
    values = target["w"].detach().unique()
    assert values.numel() == 1 and values.item() == state["version"] == 1  # the whole new checkpoint
    assert hook.calls > 2  # the load started over after the replacement
    writer.close()
    reader.close()
    assert sorted(os.listdir(ckpt_dir)) == ["step_000000001"]
