"""Forged sizes in a plain-DCP directory's ``.metadata`` and sparse data files. Every reader
refuses them with one project error naming the file before allocating anything; ``adopt`` refuses whatever a
load would refuse (a pickle with a payload in a byte item too) without hashing terabytes of holes; genuine
checkpoints holding zeros, even stored as holes, still load and adopt."""

from __future__ import annotations

import dataclasses
import io
import os
import pickle
import shutil
import subprocess

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from dcp_plugin import Checkpointer, CheckpointManager
from dcp_plugin.cli.main import main as cli
from dcp_plugin.errors import CheckpointCorruptError, UnsafeCheckpointError
from dcp_plugin.storage import CheckpointStorage, open_url
from tests.hostile import Exploit

TWO_TIB = 2 * 2**40


def _plain(directory: str) -> dict:
    state = {"a": torch.randn(4, 4), "b": torch.randn(8), "step": 3}
    dcp.save(state, checkpoint_id=directory, no_dist=True)
    return state


def _metadata(directory: str):
    with open(os.path.join(directory, ".metadata"), "rb") as handle:
        return pickle.load(handle)


def _save_metadata(directory: str, metadata) -> None:
    with open(os.path.join(directory, ".metadata"), "wb") as handle:
        pickle.dump(metadata, handle)


def _data_file(directory: str) -> str:
    return os.path.join(directory, next(f for f in os.listdir(directory) if f.endswith(".distcp")))


def _resize(item, size: torch.Size) -> None:
    item.size = size
    item.chunks[0] = dataclasses.replace(item.chunks[0], sizes=size)


def _cancelling_dimensions(directory: str) -> None:
    """The issue's case: a huge tensor, a negative dimension cancelling it in the sum, a 2 TiB sparse file."""
    metadata = _metadata(directory)
    _resize(metadata.state_dict_metadata["a"], torch.Size([2**20, 2**20]))
    _resize(metadata.state_dict_metadata["b"], torch.Size([-(2**20), 2**20]))
    for index, info in metadata.storage_data.items():
        if index.fqn == "a":
            metadata.storage_data[index] = dataclasses.replace(info, length=TWO_TIB - info.offset - 10)
    _save_metadata(directory, metadata)
    subprocess.run(["truncate", "-s", str(TWO_TIB), _data_file(directory)], check=True)


def _record_in_a_hole(directory: str) -> None:
    """A record moved into a sparse tail, declaring a size this machine could allocate."""
    metadata = _metadata(directory)
    _resize(metadata.state_dict_metadata["a"], torch.Size([256, 1024]))  # 1 MiB
    for index, info in metadata.storage_data.items():
        if index.fqn == "a":
            metadata.storage_data[index] = dataclasses.replace(info, offset=2**30, length=2**20 + 4096)
    _save_metadata(directory, metadata)
    subprocess.run(["truncate", "-s", str(TWO_TIB), _data_file(directory)], check=True)


def _chunk_larger_than_its_record(directory: str) -> None:
    metadata = _metadata(directory)
    _resize(metadata.state_dict_metadata["a"], torch.Size([64, 64]))
    _save_metadata(directory, metadata)


FORGERIES = {
    "cancelling-dimensions": _cancelling_dimensions,
    "record-in-a-hole": _record_in_a_hole,
    "chunk-larger-than-its-record": _chunk_larger_than_its_record,
}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("forgery", sorted(FORGERIES))
def test_forged_sizes_are_refused_by_every_reader_and_by_adopt(tmp_path, forgery, capsys):
    directory = str(tmp_path / "step-1")
    _plain(directory)
    FORGERIES[forgery](directory)
    metadata_file = os.path.join(directory, ".metadata")
    with pytest.raises(CheckpointCorruptError, match=metadata_file):
        Checkpointer().read(directory)
    with pytest.raises(CheckpointCorruptError, match=metadata_file):
        Checkpointer().load(directory, {"a": torch.zeros(4, 4), "b": torch.zeros(8), "step": 0})
    assert cli(["verify", directory]) == 1
    assert cli(["export", directory, str(tmp_path / "a.pt"), "--entry", "a", "--format", "torch"]) == 1
    storage, name = open_url(directory)
    with pytest.raises(CheckpointCorruptError):
        storage.adopt(name)  # refused before hashing the holes
    assert cli(["adopt", directory]) == 1
    assert "Traceback" not in capsys.readouterr().err
    assert not os.path.exists(os.path.join(directory, "dcp_plugin.json"))


@pytest.mark.timeout(120)
def test_adopt_refuses_a_data_file_made_sparse_to_look_larger(tmp_path):
    directory = str(tmp_path / "step-1")
    state = _plain(directory)
    subprocess.run(["truncate", "-s", str(TWO_TIB), _data_file(directory)], check=True)
    storage, name = open_url(directory)
    with pytest.raises(CheckpointCorruptError, match="cover"):
        storage.adopt(name)
    assert not os.path.exists(os.path.join(directory, "dcp_plugin.json"))
    read = Checkpointer().read(directory)  # its records are intact: an unverified read gives their values
    assert torch.equal(read["a"], state["a"])


def test_adopt_refuses_a_value_that_is_a_pickle_with_a_payload(tmp_path):
    directory = str(tmp_path / "step-1")
    _plain(directory)
    marker = tmp_path / "pwned"
    buffer = io.BytesIO()
    torch.save(Exploit(str(marker)), buffer)
    payload = buffer.getvalue()
    path = _data_file(directory)
    metadata = _metadata(directory)
    offset = os.path.getsize(path)
    with open(path, "ab") as handle:
        handle.write(payload)
    index = next(i for i in metadata.storage_data if i.fqn == "step")
    metadata.storage_data[index] = dataclasses.replace(
        metadata.storage_data[index], relative_path=os.path.basename(path), offset=offset, length=len(payload)
    )
    _save_metadata(directory, metadata)
    with pytest.raises(UnsafeCheckpointError, match="step"):
        Checkpointer().read(directory)
    storage, name = open_url(directory)
    with pytest.raises(UnsafeCheckpointError, match="step"):
        storage.adopt(name)
    assert not os.path.exists(os.path.join(directory, "dcp_plugin.json"))
    assert not marker.exists()


def _dig_holes(path: str) -> None:
    done = subprocess.run(["fallocate", "--dig-holes", path], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot punch holes here: {done.stderr.strip()}")
    if os.stat(path).st_blocks * 512 >= os.path.getsize(path):
        pytest.skip("the filesystem kept the zeros allocated")


def test_zeros_stored_as_holes_still_load_verify_and_adopt(tmp_path, ckpt_dir):
    zeros = torch.zeros(1024, 1024)  # 4 MiB of zeros: whole pages of them become holes
    directory = str(tmp_path / "step-1")
    dcp.save({"z": zeros, "r": torch.randn(64)}, checkpoint_id=directory, no_dist=True)
    _dig_holes(_data_file(directory))  # as rsync --sparse or cp --sparse=always leave it
    storage, name = open_url(directory)
    storage.adopt(name)
    assert storage.verify(name) == []
    assert torch.equal(Checkpointer().read(directory)["z"], zeros)
    # a checkpoint dcp-plugin wrote, copied sparsely: the same
    with CheckpointManager(ckpt_dir, async_mode="sync") as manager:
        manager.save(1, {"z": zeros.clone()})
    own = os.path.join(ckpt_dir, "step_000000001")
    for file in os.listdir(own):
        if file.endswith(".distcp"):
            _dig_holes(os.path.join(own, file))
    assert CheckpointStorage(ckpt_dir).verify("step_000000001") == []
    state = {"z": torch.ones(1024, 1024)}
    CheckpointManager(ckpt_dir).load(state)
    assert torch.equal(state["z"], zeros)
    out = str(tmp_path / "oracle.pt")
    dcp_to_torch_save(own, out)
    assert torch.equal(torch.load(out, weights_only=True)["z"], zeros)
    shutil.rmtree(directory)
