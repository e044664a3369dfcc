"""Copying a committed checkpoint between storages: exact, checked, committed by the target's protocol."""

from __future__ import annotations

import os

import pytest

from dcp_plugin import CheckpointCorruptError, CheckpointExistsError, CheckpointManager
from dcp_plugin.storage import CheckpointStorage, copy_checkpoint
from tests.models import assert_same, make_training, snapshot

NAME = "step_000000003"


def saved(url: str, options: dict, seed: int = 0):
    model, optimizer, _ = make_training(seed=seed)
    with CheckpointManager(url, async_mode="sync", storage_options=options) as manager:
        manager.save(3, {"model": model, "optim": optimizer, "note": "hello"})
    return snapshot(model, optimizer)


def loads_exactly(url: str, options: dict, expected, name: str = NAME) -> None:
    model, optimizer, _ = make_training(seed=9)
    state = {"model": model, "optim": optimizer, "note": None}
    with CheckpointManager(url, async_mode="sync", storage_options=options) as manager:
        manager.load(state, name=name)
        assert manager.storage.verify(name) == []
    assert_same(snapshot(model, optimizer), expected)
    assert state["note"] == "hello"


@pytest.mark.s3
@pytest.mark.parametrize("direction", ["local-to-s3", "s3-to-local"])
def test_copy_between_local_disk_and_s3_loads_exactly(direction, tmp_path, s3_url):
    s3, options = s3_url
    local = str(tmp_path / "local")
    (src, src_opts), (dst, dst_opts) = ((local, {}), (s3, options))
    if direction == "s3-to-local":
        (src, src_opts), (dst, dst_opts) = (dst, dst_opts), (src, src_opts)
    expected = saved(src, src_opts)
    copied_bytes = []
    info = copy_checkpoint(
        CheckpointStorage(src, src_opts), NAME, CheckpointStorage(dst, dst_opts), progress=copied_bytes.append
    )
    assert info.name == NAME and info.manifest["copied_from"].endswith(NAME)
    assert sum(copied_bytes) == sum(r["size"] for r in info.manifest["files"].values())
    loads_exactly(dst, dst_opts, expected)
    assert CheckpointStorage(dst, dst_opts).incomplete() == []


def test_copy_never_replaces_unless_asked_and_keeps_the_source(tmp_path, memory_url):
    expected = saved(str(tmp_path / "a"), {})
    saved(memory_url, {}, seed=4)
    source, target = CheckpointStorage(str(tmp_path / "a")), CheckpointStorage(memory_url)
    with pytest.raises(CheckpointExistsError):
        copy_checkpoint(source, NAME, target)
    copy_checkpoint(source, NAME, target, overwrite=True)
    loads_exactly(memory_url, {}, expected)
    copy_checkpoint(source, NAME, target, "promoted")
    loads_exactly(memory_url, {}, expected, name="promoted")
    loads_exactly(str(tmp_path / "a"), {}, expected)


def test_a_damaged_source_is_refused_and_nothing_is_committed(tmp_path):
    saved(str(tmp_path / "a"), {})
    data = tmp_path / "a" / NAME / "__0_0.distcp"
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data.write_bytes(bytes(raw))
    target = CheckpointStorage(str(tmp_path / "b"))
    with pytest.raises(CheckpointCorruptError, match="__0_0.distcp"):
        copy_checkpoint(CheckpointStorage(str(tmp_path / "a")), NAME, target)
    assert target.list() == [] and target.incomplete() == []
    assert not os.path.exists(tmp_path / "b" / NAME)


def test_the_cp_command_copies_and_refuses_to_replace(tmp_path, capsys):
    from dcp_plugin.cli import main

    expected = saved(str(tmp_path / "a"), {})
    source = str(tmp_path / "a" / NAME)
    assert main(["cp", source, str(tmp_path / "b")]) == 0
    assert "checksums verified" in capsys.readouterr().out
    loads_exactly(str(tmp_path / "b"), {}, expected)
    assert main(["cp", source, str(tmp_path / "b")]) == 1
    assert "already exists" in capsys.readouterr().err
    assert main(["cp", source, str(tmp_path / "b"), "--name", "best", "--json"]) == 0
    assert '"target"' in capsys.readouterr().out
    assert main(["cp", source, str(tmp_path / "b"), "--target-options", "[1]"]) == 2
