"""DCP metadata is unpickled with an allow-list: real metadata loads, anything else is refused unexecuted."""

from __future__ import annotations

import io
import os
import pickle

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.metadata import Metadata

from dcp_plugin.errors import UnsafeCheckpointError
from dcp_plugin.storage.safety import load_metadata, loads_metadata


def test_real_dcp_metadata_loads(tmp_path):
    dcp.save({"w": torch.ones(3, dtype=torch.bfloat16)}, storage_writer=FileSystemWriter(str(tmp_path)), no_dist=True)
    with open(tmp_path / ".metadata", "rb") as handle:
        metadata = load_metadata(handle)
    assert isinstance(metadata, Metadata) and "w" in metadata.state_dict_metadata


def test_a_pickle_payload_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    with pytest.raises(UnsafeCheckpointError, match=r"(posix|os)\.system"):
        loads_metadata(pickle.dumps(Exploit()))
    assert not marker.exists()


@pytest.mark.parametrize("payload", [print, eval, io.BytesIO])
def test_anything_outside_the_allow_list_is_refused(payload):
    with pytest.raises(UnsafeCheckpointError, match="never needs"):
        loads_metadata(pickle.dumps(payload))


def test_dtypes_sizes_and_plain_containers_are_allowed():
    value = {"dtype": torch.float16, "size": torch.Size([2, 3]), "set": {1, 2}}
    assert loads_metadata(pickle.dumps(value)) == value
