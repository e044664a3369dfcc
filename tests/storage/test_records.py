"""Tensor records are written without crc32, without touching the user's torch.save setting, in DCP's format."""

from __future__ import annotations

import io
import os
import pickle
import threading
import zipfile

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
from torch.utils.serialization import config as serialization_config

from dcp_plugin import CheckpointManager
from dcp_plugin.storage.records import tensor_record

TENSORS = {
    "fp32": torch.randn(64, 33),
    "bf16": torch.randn(17, dtype=torch.bfloat16),
    "int64": torch.arange(11),
    "bool": torch.rand(9) > 0.5,
    "scalar": torch.tensor(2.5),
    "empty": torch.zeros(0, 4),
    "transposed": torch.randn(5, 7).t(),  # strides DCP keeps: the record must say so
}


def _torch_save_without_crc32(tensor: torch.Tensor) -> bytes:
    buffer = io.BytesIO()
    writer = torch._C.PyTorchFileWriter(buffer, False, 64)
    torch.serialization._save(tensor, writer, pickle, torch.serialization.DEFAULT_PROTOCOL, False)
    writer.write_end_of_file()
    del writer
    return buffer.getvalue()


@pytest.mark.parametrize("name", sorted(TENSORS))
def test_a_record_is_torch_saves_bytes_without_crc32_and_torch_load_reads_it(name):
    tensor = TENSORS[name]
    for _ in range(2):  # the second time from the cached framing
        head, data, tail = tensor_record(tensor)
        record = head + bytes(data) + tail
        assert record == _torch_save_without_crc32(tensor)
        loaded = torch.load(io.BytesIO(record), weights_only=True)
        assert loaded.dtype == tensor.dtype and loaded.stride() == tensor.stride() and torch.equal(loaded, tensor)
    assert all(info.CRC == 0 for info in zipfile.ZipFile(io.BytesIO(record)).infolist())


def _distcp_records(directory: str) -> list[bytes]:
    """The tensor records of a checkpoint, by the byte ranges in its ``.metadata``."""
    reader = dcp.FileSystemReader(directory)
    records = []
    for info in reader.read_metadata().storage_data.values():
        with open(os.path.join(directory, info.relative_path), "rb") as handle:
            handle.seek(info.offset)
            records.append(handle.read(info.length))
    return records


@pytest.mark.parametrize("user_setting", [True, False])
def test_a_thread_mode_save_leaves_the_users_crc32_setting_alone(tmp_path, user_setting):
    state = {f"w{i}": torch.randn(2**20) for i in range(16)}  # 64 MiB: the save takes a while
    seen: set[bool] = set()
    user_records: list[bytes] = []
    saving = threading.Event()
    done = threading.Event()

    def user_code() -> None:  # polls the setting and saves with torch.save while the save runs
        serialization_config.save.compute_crc32 = user_setting  # torch keeps this setting per thread
        saving.wait(60)
        while not done.is_set():
            seen.add(serialization_config.save.compute_crc32)
            buffer = io.BytesIO()
            torch.save(torch.ones(1024), buffer)
            user_records.append(buffer.getvalue())

    previous = serialization_config.save.compute_crc32
    serialization_config.save.compute_crc32 = user_setting
    poller = threading.Thread(target=user_code)
    poller.start()
    try:
        with CheckpointManager(str(tmp_path), async_mode="thread") as manager:
            saving.set()
            manager.save(1, state)
            manager.wait()
            done.set()
            poller.join()
            assert serialization_config.save.compute_crc32 is user_setting
            path = manager.latest().url
    finally:
        done.set()
        saving.set()
        poller.join()
        serialization_config.save.compute_crc32 = previous
    assert seen == {user_setting} and user_records
    # the user's own torch.save followed the user's setting; our records never carry crc32
    user_crcs = {info.CRC for info in zipfile.ZipFile(io.BytesIO(user_records[-1])).infolist()}
    assert (user_crcs != {0}) is user_setting
    for record in _distcp_records(path):
        if record[:2] == b"PK":
            assert {info.CRC for info in zipfile.ZipFile(io.BytesIO(record)).infolist()} == {0}


def test_pytorchs_own_dcp_load_and_dcp_to_torch_save_read_what_we_write_bit_exactly(tmp_path):
    big = torch.randn(64, 64)
    state = {**TENSORS, "view": big[8:24], "nested": {"a": torch.randn(3, 3), "b": torch.ones(2, dtype=torch.int8)}}
    with CheckpointManager(str(tmp_path / "ckpt"), async_mode="sync") as manager:
        manager.save(1, state)
        path = manager.latest().url

    fresh = {
        key: torch.empty_strided(value.shape, value.stride(), dtype=value.dtype)
        for key, value in state.items()
        if torch.is_tensor(value)
    }
    fresh["nested"] = {"a": torch.zeros(3, 3), "b": torch.zeros(2, dtype=torch.int8)}
    dcp.load(fresh, checkpoint_id=path)
    for key, value in state.items():
        if torch.is_tensor(value):
            assert torch.equal(fresh[key], value), key
    assert torch.equal(fresh["nested"]["a"], state["nested"]["a"])
    assert torch.equal(fresh["nested"]["b"], state["nested"]["b"])

    dcp_to_torch_save(path, tmp_path / "full.pt")
    full = torch.load(tmp_path / "full.pt", weights_only=True)
    for key, value in state.items():
        if torch.is_tensor(value):
            assert full[key].dtype == value.dtype and torch.equal(full[key], value), key
    assert torch.equal(full["nested"]["a"], state["nested"]["a"])
