"""The direct read path (records read straight from local files into the tensors a load fills, each file hashed in
the same pass) under attack: forged record headers and offsets, a file shortened after its size was checked,
destinations it must leave to DCP's reader (non-contiguous, overlapping, another dtype). PyTorch's own
``dcp.load`` of the same directory is the oracle wherever it reads the checkpoint."""

from __future__ import annotations

import os
import pickle
import warnings

import pytest
import torch
import torch.distributed.checkpoint as dcp

from dcp_plugin import CheckpointConfig, Checkpointer
from dcp_plugin.errors import CheckpointCorruptError, CheckpointError
from dcp_plugin.storage import direct_load
from tests.forge import forge_manifest

pytestmark = pytest.mark.timeout(60)


def _tensors() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    return {
        "a": torch.randn(4, 8, generator=generator),
        "b": torch.randn(4, 8, generator=generator),
        "c": torch.arange(12, dtype=torch.int64),
    }


def _save(tmp_path, tensors: dict[str, torch.Tensor]) -> str:
    path = str(tmp_path / "ckpt")
    checkpointer = Checkpointer(CheckpointConfig(async_mode="sync", thread_count=1))
    checkpointer.save(path, {"w": tensors}, step=1)
    checkpointer.close()
    return path


def _load(path: str, targets: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    checkpointer = Checkpointer(CheckpointConfig(async_mode="sync"))
    try:
        state = {"w": targets}
        checkpointer.load(path, state)
        return state["w"]
    finally:
        checkpointer.close()


def _oracle(path: str, targets: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What PyTorch's ``dcp.load`` puts into the same targets."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load({"w": targets}, checkpoint_id=path, no_dist=True)
    return targets


def _forge_metadata(path: str, change) -> None:
    with open(os.path.join(path, ".metadata"), "rb") as handle:
        metadata = pickle.load(handle)
    change(metadata)
    with open(os.path.join(path, ".metadata"), "wb") as handle:
        pickle.dump(metadata, handle)
    forge_manifest(path)


def _record(metadata, fqn: str):
    return next(info for index, info in metadata.storage_data.items() if index.fqn == fqn)


def _data_file(path: str) -> str:
    return os.path.join(path, next(name for name in os.listdir(path) if name.endswith(".distcp")))


def test_a_record_header_that_disagrees_on_the_shape_is_refused_and_leaves_the_live_tensors(tmp_path):
    path = _save(tmp_path, _tensors())

    def transpose(metadata) -> None:
        item = metadata.state_dict_metadata["w.a"]
        item.size = torch.Size([8, 4])
        item.chunks[0] = type(item.chunks[0])(offsets=torch.Size([0, 0]), sizes=torch.Size([8, 4]))

    _forge_metadata(path, transpose)
    targets = {"a": torch.zeros(8, 4), "b": torch.zeros(4, 8), "c": torch.zeros(12, dtype=torch.int64)}
    with pytest.raises(CheckpointCorruptError, match=r"w\.a holds shape"):
        _load(path, targets)
    assert all(not value.any() for value in targets.values())  # the record is never read as an (8, 4) tensor
    with pytest.raises(BaseException):  # noqa: B017 - PyTorch's reader refuses it too (CheckpointException)
        _oracle(path, {"a": torch.zeros(8, 4), "b": torch.zeros(4, 8), "c": torch.zeros(12, dtype=torch.int64)})


def test_a_record_header_that_disagrees_on_the_dtype_loads_as_pytorch_loads_it(tmp_path):
    tensors = _tensors()
    path = _save(tmp_path, tensors)

    def as_int32(metadata) -> None:
        metadata.state_dict_metadata["w.a"].properties.dtype = torch.int32

    _forge_metadata(path, as_int32)

    def fresh() -> dict[str, torch.Tensor]:
        return {"a": torch.zeros(4, 8, dtype=torch.int32), "b": torch.zeros(4, 8), "c": torch.zeros(12).long()}

    ours, oracle = _load(path, fresh()), _oracle(path, fresh())
    for key in oracle:
        assert torch.equal(ours[key], oracle[key]), key
    assert torch.equal(ours["a"], tensors["a"].to(torch.int32))  # converted, never its bits reinterpreted


def test_an_offset_into_another_record_is_refused_without_hanging(tmp_path):
    path = _save(tmp_path, _tensors())

    def into_a(metadata) -> None:
        _record(metadata, "w.b").offset = _record(metadata, "w.a").offset + 100

    _forge_metadata(path, into_a)
    targets = {"a": torch.zeros(4, 8), "b": torch.zeros(4, 8), "c": torch.zeros(12, dtype=torch.int64)}
    with pytest.raises(CheckpointError):
        _load(path, targets)
    with pytest.raises(BaseException):  # noqa: B017 - PyTorch's reader cannot read it either
        _oracle(path, {key: torch.zeros_like(value) for key, value in targets.items()})


def test_an_offset_onto_another_record_reads_that_record_as_pytorch_does(tmp_path):
    path = _save(tmp_path, _tensors())

    def onto_a(metadata) -> None:
        _record(metadata, "w.b").offset = _record(metadata, "w.a").offset

    _forge_metadata(path, onto_a)

    def fresh() -> dict[str, torch.Tensor]:
        return {"a": torch.zeros(4, 8), "b": torch.zeros(4, 8), "c": torch.zeros(12, dtype=torch.int64)}

    ours, oracle = _load(path, fresh()), _oracle(path, fresh())
    for key in oracle:
        assert torch.equal(ours[key], oracle[key]), key
    assert torch.equal(ours["a"], ours["b"])


def test_a_file_shortened_after_its_size_was_checked_fails_naming_it(tmp_path, monkeypatch):
    path = _save(tmp_path, {f"t{i}": torch.randn(64, 64) for i in range(8)})
    data = _data_file(path)
    original = direct_load._first_read

    def shorten_then_read(reader, relative, records, verify, *args, **kwargs):
        read = original(reader, relative, records, verify, *args, **kwargs)  # opened, checked against its size
        if verify:  # the tensors' read (the skeleton's comes first)
            os.truncate(data, os.path.getsize(data) // 2)
        return read

    monkeypatch.setattr(direct_load, "_first_read", shorten_then_read)
    targets = {f"t{i}": torch.zeros(64, 64) for i in range(8)}
    with pytest.raises(CheckpointCorruptError, match=rf"{os.path.basename(data)} ends early"):
        _load(path, targets)
    assert all(not value.any() for value in targets.values())  # live tensors are written once the file verified


def test_views_are_filled_exactly_and_non_contiguous_ones_as_pytorch_fills_them(tmp_path):
    tensors = _tensors()
    path = _save(tmp_path, tensors)

    def fresh() -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        buffer = torch.full((10, 8), -1.0)
        transposed = torch.zeros(8, 4).t()  # (4, 8), not contiguous
        return {"a": transposed, "b": buffer[3:7], "c": torch.zeros(12, dtype=torch.int64)}, buffer

    (ours, buffer), (oracle, _) = fresh(), fresh()
    _load(path, ours)
    _oracle(path, oracle)
    for key in tensors:
        assert torch.equal(ours[key], tensors[key]) and torch.equal(ours[key], oracle[key]), key
    assert (buffer[:3] == -1).all() and (buffer[7:] == -1).all()  # not a byte outside the view


def test_overlapping_destinations_are_filled_as_pytorch_fills_them(tmp_path):
    tensors = {"a": torch.randn(8), "b": torch.randn(8)}
    path = _save(tmp_path, tensors)

    def fresh() -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        buffer = torch.zeros(12)
        return {"a": buffer[:8], "b": buffer[4:]}, buffer

    (ours, ours_buffer), (oracle, oracle_buffer) = fresh(), fresh()
    _load(path, ours)
    _oracle(path, oracle)
    assert torch.equal(ours_buffer, oracle_buffer)


def test_a_load_into_another_dtype_casts_as_pytorch_does(tmp_path):
    tensors = _tensors()
    path = _save(tmp_path, tensors)

    def fresh() -> dict[str, torch.Tensor]:
        return {"a": torch.zeros(4, 8, dtype=torch.bfloat16), "b": torch.zeros(4, 8), "c": torch.zeros(12).long()}

    with pytest.warns(UserWarning, match="cast to the live dtype"):
        ours = _load(path, fresh())
    oracle = _oracle(path, fresh())
    assert ours["a"].dtype == torch.bfloat16 and torch.equal(ours["a"], tensors["a"].to(torch.bfloat16))
    for key in oracle:
        assert torch.equal(ours[key], oracle[key]), key


def test_no_record_of_a_model_and_its_optimizer_goes_through_torch_load(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(8, 8) for _ in range(10)])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, 8)).sum().backward()
    optimizer.step()
    path = str(tmp_path / "ckpt")
    checkpointer = Checkpointer(CheckpointConfig(async_mode="sync"))
    checkpointer.save(path, {"model": model, "optim": optimizer}, step=1)
    calls = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *args, **kwargs: calls.append(1) or real_load(*args, **kwargs))
    fresh = torch.nn.Sequential(*[torch.nn.Linear(8, 8) for _ in range(10)])
    fresh_optimizer = torch.optim.AdamW(fresh.parameters(), lr=1e-3)
    checkpointer.load(path, {"model": fresh, "optim": fresh_optimizer})
    checkpointer.close()
    assert calls == []  # 20 parameters, 60 optimizer tensors and the skeleton: every record read directly
    for ours, theirs in zip(fresh.parameters(), model.parameters()):
        assert torch.equal(ours, theirs)
        for key, value in optimizer.state[theirs].items():
            assert torch.equal(fresh_optimizer.state[ours][key], value)


def test_a_plain_dcp_directory_is_read_directly_and_as_pytorch_reads_it(tmp_path, monkeypatch):
    tensors = _tensors()
    path = str(tmp_path / "plain")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"w": tensors}, checkpoint_id=path, no_dist=True)  # torch.save's records, with crc32
    calls = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *args, **kwargs: calls.append(1) or real_load(*args, **kwargs))
    ours = _load(path, {key: torch.zeros_like(value) for key, value in tensors.items()})
    assert calls == []
    oracle = _oracle(path, {key: torch.zeros_like(value) for key, value in tensors.items()})
    for key in tensors:
        assert torch.equal(ours[key], oracle[key]) and torch.equal(ours[key], tensors[key]), key


def test_tied_weights_read_back_tied_and_into_untied_ones(tmp_path):
    class Tied(torch.nn.Module):
        def __init__(self, tie: bool) -> None:
            super().__init__()
            self.embed = torch.nn.Embedding(16, 8)
            self.head = torch.nn.Linear(8, 16, bias=False)
            if tie:
                self.head.weight = self.embed.weight

    torch.manual_seed(1)
    saved = Tied(tie=True)
    path = str(tmp_path / "ckpt")
    checkpointer = Checkpointer(CheckpointConfig(async_mode="sync"))
    checkpointer.save(path, {"model": saved}, step=1)
    tied, untied = Tied(tie=True), Tied(tie=False)
    checkpointer.load(path, {"model": tied})
    checkpointer.load(path, {"model": untied})
    read = checkpointer.read(path)["model"]
    checkpointer.close()
    assert tied.head.weight is tied.embed.weight and torch.equal(tied.embed.weight, saved.embed.weight)
    assert torch.equal(untied.head.weight, saved.embed.weight) and torch.equal(untied.embed.weight, saved.embed.weight)
    assert read["head.weight"].data_ptr() == read["embed.weight"].data_ptr()
    assert not hasattr(read["head.weight"], "_dcp_plugin_placeholder")
