"""Saves written without DCP (engine/repeat.py) against changes made right after such a save: each change either
sends the next save back through DCP (anything ``.metadata`` records, anything that decides where bytes go) or
is one a repeat save writes correctly (values, memory moved without changing the layout). Every checkpoint is read
back in a fresh process by dcp-plugin and by PyTorch's ``dcp_to_torch_save``, and a repeat save's files by
``dcp.load`` into tensors laid out from a plain ``dcp.save`` of the same state: bit for bit, with the same
``.metadata`` as DCP writes."""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from dcp_plugin import CheckpointManager, ModelState, OptimizerState
from dcp_plugin.format import packing
from dcp_plugin.format.state import wrap_state
from tests.fresh import read_fresh
from tests.models import MixedSizes

MODES = ["sync", "thread"]


class Net(MixedSizes):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("a", torch.arange(8, dtype=torch.float32))
        self.register_buffer("b", torch.arange(4, dtype=torch.float32) + 100)


def _made(mode: str) -> tuple[Net, torch.optim.Optimizer]:
    model = Net()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    optimizer.param_groups[0]["note"] = "n"
    optimizer.param_groups[0]["big"] = 1
    model.loss().backward()
    optimizer.step()
    optimizer.zero_grad()
    return model, optimizer


def _state(model: Net, optimizer: torch.optim.Optimizer) -> dict:
    return {"model": ModelState(model), "optim": OptimizerState(model, optimizer)}


def _touch(model: Net, optimizer: torch.optim.Optimizer) -> None:
    """Every saved tensor changes its values (not its layout)."""
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            tensor.add_(1)
        for state in optimizer.state.values():
            for value in state.values():
                if isinstance(value, torch.Tensor):
                    value.add_(1)


def _expected(model: Net, optimizer: torch.optim.Optimizer) -> dict:
    names = {id(p): n for n, p in model.named_parameters()}
    optim = {
        names[id(p)]: {k: v.detach().clone() for k, v in s.items() if isinstance(v, torch.Tensor)}
        for p, s in optimizer.state.items()
        if id(p) in names
    }
    group = {k: v for k, v in optimizer.param_groups[0].items() if k in ("note", "big", "lr")}
    return {"model": {k: v.detach().clone() for k, v in model.state_dict().items()}, "optim": optim, "group": group}


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))


def _delete(model: Net, name: str) -> None:
    delattr(model, name)


def _optimizer_dtype(model: Net, optimizer: torch.optim.Optimizer) -> None:
    state = optimizer.state[model.small.weight]
    state["exp_avg"] = state["exp_avg"].to(torch.float64)


def _swap(model: Net, optimizer: torch.optim.Optimizer) -> None:
    model.small.weight.data, model.head.weight.data = model.head.weight.data, model.small.weight.data


Change = Callable[[Net, torch.optim.Optimizer], None]
CHANGES: list[tuple[str, Change, bool | None]] = [
    # (what, the change, whether the save after it must go through DCP: None = either is right)
    ("values only", lambda m, o: None, False),
    ("an optimizer state's dtype", _optimizer_dtype, True),
    ("a buffer's dtype", lambda m, o: setattr(m, "count", m.count.to(torch.int32)), True),
    ("an added key", lambda m, o: m.register_buffer("extra", torch.ones(3)), True),
    ("a removed key", lambda m, o: _delete(m, "extra"), True),
    ("a renamed key", lambda m, o: m.register_buffer("renamed", m._buffers.pop("count")), True),
    ("a tensor becomes tied", lambda m, o: setattr(m, "b", m.a), True),  # same shape as a: now stored once
    ("untied again", lambda m, o: setattr(m, "b", m.a.clone()), True),
    ("a shape change", lambda m, o: setattr(m, "b", torch.randn(4)), True),
    ("a view into another tensor", lambda m, o: setattr(m, "b", m.a[2:6]), False),  # overlaps, not tied
    ("a strided view", lambda m, o: setattr(m, "b", torch.randn(8)[::2]), False),
    ("two parameters swap their memory", _swap, False),
    ("a plain value grows past any padding", lambda m, o: o.param_groups[0].__setitem__("note", "x" * 300_000), None),
    ("an integer grows", lambda m, o: o.param_groups[0].__setitem__("big", 10**4000), None),
    ("a plain value's type", lambda m, o: o.param_groups[0].__setitem__("big", 1.0), True),
    (
        "the large tensor moves off its alignment",
        lambda m, o: setattr(m.large, "data", torch.randn(2048, 1024)[3:1027]),
        None,
    ),
]


@pytest.mark.parametrize("mode", MODES)
def test_each_change_after_a_repeat_save_is_detected_or_written_right(ckpt_dir, mode, monkeypatch):
    through_dcp: list[int] = []
    original, original_async = dcp.save, dcp.state_dict_saver.async_save
    monkeypatch.setattr(dcp, "save", lambda *a, **k: through_dcp.append(1) or original(*a, **k))
    monkeypatch.setattr(dcp, "async_save", lambda *a, **k: through_dcp.append(1) or original_async(*a, **k))
    model, optimizer = _made(mode)
    expected: dict[int, dict] = {}
    step = 0
    with CheckpointManager(ckpt_dir, async_mode=mode) as manager:

        def save() -> int:
            nonlocal step
            step += 1
            manager.wait_for_staging()
            _touch(model, optimizer)
            before = len(through_dcp)
            manager.save(step, _state(model, optimizer))
            expected[step] = _expected(model, optimizer)
            manager.wait()  # the next change is made to state no save is still reading
            return len(through_dcp) - before

        save()
        assert save() == 0, "the second save of a structure is written without DCP"
        for what, change, dcp_needed in CHANGES:
            manager.wait_for_staging()
            change(model, optimizer)
            used = save()
            if dcp_needed is not None:
                assert used == int(dcp_needed), f"{what}: the save after it {'skipped' if used == 0 else 'used'} DCP"
            assert save() == 0, f"{what}: the save after the next is written without DCP again"
    paths = {s: os.path.join(ckpt_dir, f"step_{s:09d}") for s in expected}
    read = read_fresh(*paths.values())
    for s, want in expected.items():
        for reader in ("plugin", "torch"):
            got = read[paths[s]][reader]
            assert not isinstance(got, str), f"{reader} refused step {s}: {got}"
            assert set(got["model"]) == set(want["model"]), (reader, s)
            for key, value in want["model"].items():
                assert _same_bits(got["model"][key], value), f"{reader}, step {s}: model {key}"
            for name, state in want["optim"].items():
                for key, value in state.items():
                    assert _same_bits(got["optim"]["state"][name][key], value), f"{reader}, step {s}: {name}.{key}"
            group = got["optim"]["param_groups"][0]
            for key, value in want["group"].items():
                assert type(group[key]) is type(value) and group[key] == value, f"{reader}, step {s}: group {key}"


@pytest.mark.parametrize("mode", MODES)
def test_a_repeat_save_is_what_dcp_writes_bit_for_bit(ckpt_dir, tmp_path, mode):
    """The ``.metadata`` of a save written without DCP records what a plain ``dcp.save`` of the same state records,
    and ``dcp.load`` (FileSystemReader) reads every entry of it back bit for bit."""
    model, optimizer = _made(mode)
    with CheckpointManager(ckpt_dir, async_mode=mode) as manager:
        for step in (1, 2, 3):
            manager.wait_for_staging()
            _touch(model, optimizer)
            manager.save(step, _state(model, optimizer))
            manager.wait()
        assert manager.engine.repeats.ready() is not None
    packed = packing.pack(wrap_state(_state(model, optimizer)), rank=0, world_size=1, allow_pickle=False)
    reference = str(tmp_path / "reference")
    dcp.save(packed.state_dict, checkpoint_id=reference, no_dist=True)
    ours = FileSystemReader(os.path.join(ckpt_dir, "step_000000003")).read_metadata()
    theirs = FileSystemReader(reference).read_metadata()
    assert ours.state_dict_metadata == theirs.state_dict_metadata
    assert ours.planner_data == theirs.planner_data
    assert set(ours.storage_data) == set(theirs.storage_data)
    for path, metadata in ((reference, theirs), (os.path.join(ckpt_dir, "step_000000003"), ours)):
        target = {
            key: torch.full(entry.size, 7, dtype=entry.properties.dtype)
            for key, entry in metadata.state_dict_metadata.items()
            if isinstance(entry, TensorStorageMetadata)
        }
        dcp.load(target, storage_reader=FileSystemReader(path), no_dist=True)
        for key, value in packed.tensors.items():
            assert _same_bits(target[key], value), f"{path}: {key}"
