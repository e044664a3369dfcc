"""The pieces of a save written without DCP: the ``.metadata`` rendered from parts pickled once, and the files laid
out once and written from their images (and, in ``sync`` mode, from the tensors' own memory)."""

from __future__ import annotations

import ctypes
import dataclasses
import io
import pickle
from pathlib import PurePosixPath

import pytest
import torch
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)

from dcp_plugin.storage.layout import Image, RankLayout, Slot
from dcp_plugin.storage.metadata_file import MetadataFile
from dcp_plugin.storage.safety import loads_metadata


def _metadata(count: int) -> Metadata:
    size = torch.Size([3, 4])
    tensors = {
        f"model.w{i}": TensorStorageMetadata(
            TensorProperties(dtype=torch.bfloat16), size, [ChunkStorageMetadata(torch.Size([0, 0]), size)]
        )
        for i in range(count)
    }
    storage = {MetadataIndex(f"model.w{i}", [0, 0]): _StorageInfo("__0_0.distcp", 100 * i, 90) for i in range(count)}
    tensors["optim.param_groups.0.lr"] = BytesStorageMetadata()
    storage[MetadataIndex("optim.param_groups.0.lr")] = _StorageInfo("__0_0.distcp", 100 * count, 7)
    planner = {key: tuple(key.split(".")) for key in tensors}
    return Metadata(tensors, planner, storage, StorageMeta("old", "old"), version="1.0.0")


@pytest.mark.parametrize("count", [0, 3, 2500])  # 2500: more than pickle's batch of 1000 dict items
def test_rendered_metadata_unpickles_to_the_save_s_metadata(count):
    baseline = _metadata(count)
    file = MetadataFile(baseline)
    changed = {
        MetadataIndex("optim.param_groups.0.lr"): _StorageInfo("__0_0.distcp", 100 * count, 11),
        MetadataIndex("model.w0", [0, 0]): _StorageInfo("blob_0123456789ab_r0_0.distcp", 0, 90),
    }
    if count == 0:
        changed.pop(MetadataIndex("model.w0", [0, 0]))
    meta = StorageMeta(PurePosixPath("/ckpts/.dcp-plugin/staging/step_1.x"), "abc")
    expected = dataclasses.replace(baseline, storage_data={**baseline.storage_data, **changed}, storage_meta=meta)
    data = file.render(meta, changed)
    for read in (pickle.loads(data), loads_metadata(data)):
        assert read == expected
        assert list(vars(read)) == list(vars(expected))
    assert file.render(meta, {}) == file.render(meta, {})
    assert pickle.loads(file.render(meta, {})).storage_data == baseline.storage_data


def test_a_part_never_refers_to_another_part_s_objects():
    """Each part is pickled alone, so its memo references are its own: an object shared by two parts comes back
    as two equal objects, and nothing of one part leaks into another."""
    baseline = _metadata(2)
    shared = baseline.storage_data[MetadataIndex("model.w1", [0, 0])]
    baseline.planner_data = {"shared": shared}
    data = MetadataFile(baseline).render(StorageMeta(), {})
    read = pickle.loads(data)
    assert read.planner_data["shared"] == read.storage_data[MetadataIndex("model.w1", [0, 0])]


def _file_bytes(layout: RankLayout, sources: list[torch.Tensor]) -> dict[str, bytes]:
    files = {}
    for file in layout.files:
        data = bytearray()
        for segment in file.segments:
            assert len(data) == segment.offset, "segments tile the file"
            if isinstance(segment, Image):
                data += segment.buffer[: segment.length]
            else:
                source = sources[segment.source]
                data += ctypes.string_at(source.data_ptr() + segment.skip, segment.length)
        files[file.name] = bytes(data)
    return files


def _sources() -> list[torch.Tensor]:
    torch.manual_seed(0)
    big = torch.randn(3_000_000)
    return [
        torch.randn(10),
        torch.randn(700_000),  # large: from its own memory in sync mode
        torch.arange(7, dtype=torch.int64),
        torch.randn(5, 4).t(),  # not contiguous: copied
        torch.zeros(0),
        torch.tensor(2.5, dtype=torch.float64),
        big[17:1_400_017],  # large, at an address that is not block-aligned
        torch.ones(3, dtype=torch.bool),
        torch.randn(300_000, dtype=torch.bfloat16),
    ]


@pytest.mark.parametrize("from_memory", [False, True], ids=["staged", "from-memory"])
@pytest.mark.parametrize("files", [1, 3])
def test_every_record_of_a_laid_out_file_loads_as_its_tensor(from_memory, files):
    sources = _sources()
    slots = [
        Slot(f"t{i}", i, t.dtype, tuple(t.shape), t.data_ptr() if from_memory and t.is_contiguous() else None)
        for i, t in enumerate(sources)
    ]
    layout = RankLayout.build(slots, files, "__0_", len(sources))
    assert any(layout.direct_sources()) == from_memory
    for save in range(2):  # the images are reused: the second save's bytes replace the first's
        with torch.no_grad():
            for source in sources:
                if source.numel() and source.dtype != torch.bool:
                    source.add_(save)
        targets, values = layout.targets(sources)
        with torch.no_grad():
            torch._foreach_copy_(targets, values)
        plain = layout.place_bytes([("lr", b"x" * (save + 1) * 3000), ("step", b"1")])
        written = _file_bytes(layout, sources)
        for index, info in {**layout.entries, **plain}.items():
            record = written[info.relative_path][info.offset : info.offset + info.length]
            if index in ("lr", "step"):
                assert record == dict([("lr", b"x" * (save + 1) * 3000), ("step", b"1")])[index]
                continue
            expected = sources[int(index[1:])]
            loaded = torch.load(io.BytesIO(record), weights_only=True)
            assert loaded.dtype == expected.dtype and torch.equal(loaded, expected), index


def test_byte_items_grow_the_last_image_without_moving_records():
    sources = [torch.randn(100), torch.randn(50)]
    layout = RankLayout.build([Slot(f"t{i}", i, t.dtype, tuple(t.shape)) for i, t in enumerate(sources)], 1, "x", 2)
    before = dict(layout.entries)
    targets, values = layout.targets(sources)
    layout.place_bytes([("big", b"y" * 100_000)])  # more than the image has room for: it grows
    targets2, _ = layout.targets(sources)
    assert layout.entries == before
    with torch.no_grad():
        torch._foreach_copy_(targets2, values)
    data = _file_bytes(layout, sources)["x0.distcp"]
    for index, info in before.items():
        loaded = torch.load(io.BytesIO(data[info.offset : info.offset + info.length]), weights_only=True)
        assert torch.equal(loaded, sources[int(index[1:])])
