"""The commit strategies on their own: what each step leaves, links and files, the work area, purge."""

from __future__ import annotations

import os

import pytest

import dcp_plugin.storage.commit as commit
from dcp_plugin import CheckpointExistsError, CheckpointNotFoundError
from dcp_plugin.storage import CheckpointStorage, MarkerCommit, RenameCommit
from dcp_plugin.storage.faults import POINTS, reached

NAME = "step_000000001"


def write(storage: CheckpointStorage, name: str, payload: bytes, *, overwrite: bool = False) -> None:
    """A stand-in for DCP's writer: one data file, then the commit the writer's finish() performs."""
    pending = storage.begin_write(name, overwrite=overwrite)
    storage.fs.pipe_file(f"{pending.directory}/.metadata", payload)
    storage.strategy.commit(pending, {"name": name, "step": 1, "created": 1.0, "save_id": payload.hex(), "files": {}})


def data_of(storage: CheckpointStorage, name: str) -> bytes:
    info = storage.info(name)
    return storage.fs.cat_file(f"{storage.data_path(info)}/.metadata")


def test_strategy_follows_the_kind_of_storage(tmp_path, memory_url):
    assert isinstance(CheckpointStorage(str(tmp_path)).strategy, RenameCommit)
    assert isinstance(CheckpointStorage(memory_url).strategy, MarkerCommit)


@pytest.mark.parametrize("backend", ["local", "memory"])
def test_replacement_is_atomic_and_leaves_no_work_entries(backend, tmp_path, memory_url):
    storage = CheckpointStorage(str(tmp_path / "ckpts") if backend == "local" else memory_url)
    write(storage, NAME, b"old")
    with pytest.raises(CheckpointExistsError):
        write(storage, NAME, b"new")
    write(storage, NAME, b"new", overwrite=True)
    assert data_of(storage, NAME) == b"new"
    assert storage.incomplete() == []
    if backend == "local":
        assert sorted(os.listdir(tmp_path / "ckpts")) == [NAME]  # the empty work area is tidied away


def test_two_step_replacement_when_the_filesystem_cannot_exchange(tmp_path, monkeypatch):
    monkeypatch.setattr(commit, "exchange", lambda source, target: False)
    storage = CheckpointStorage(str(tmp_path))
    write(storage, NAME, b"old")
    write(storage, NAME, b"new", overwrite=True)
    assert data_of(storage, NAME) == b"new"
    assert storage.incomplete() == []


def test_a_link_is_replaced_and_deleted_itself_never_its_target(tmp_path):
    storage = CheckpointStorage(str(tmp_path))
    write(storage, "epoch=1.ckpt", b"target")
    os.symlink(tmp_path / "epoch=1.ckpt", tmp_path / "last.ckpt")
    assert data_of(storage, "last.ckpt") == b"target"  # a link to a sibling reads as that checkpoint
    write(storage, "last.ckpt", b"copy", overwrite=True)
    assert not os.path.islink(tmp_path / "last.ckpt")
    assert data_of(storage, "last.ckpt") == b"copy" and data_of(storage, "epoch=1.ckpt") == b"target"
    storage.delete("last.ckpt")
    os.symlink(tmp_path / "epoch=1.ckpt", tmp_path / "last.ckpt")
    storage.delete("last.ckpt")
    assert not os.path.lexists(tmp_path / "last.ckpt")
    assert data_of(storage, "epoch=1.ckpt") == b"target"


def test_a_file_is_replaced_only_when_overwriting(tmp_path):
    (tmp_path / "last.ckpt").write_bytes(b"torch.save")
    storage = CheckpointStorage(str(tmp_path))
    with pytest.raises(ValueError, match="is a file"):
        write(storage, "last.ckpt", b"dcp")
    write(storage, "last.ckpt", b"dcp", overwrite=True)
    assert data_of(storage, "last.ckpt") == b"dcp"


def test_a_link_leaving_the_root_is_never_listed_or_read(tmp_path):
    outside = CheckpointStorage(str(tmp_path / "outside"))
    write(outside, NAME, b"secret")
    storage = CheckpointStorage(str(tmp_path / "root"))
    write(storage, "step_000000002", b"mine")
    os.symlink(tmp_path / "outside" / NAME, tmp_path / "root" / NAME)
    assert [i.name for i in storage.list()] == ["step_000000002"]
    assert [name for name, _ in storage.scan().broken] == [NAME]
    with pytest.raises(Exception, match="outside"):
        storage.info(NAME)


def test_delete_hides_first_and_purge_never_touches_committed_data(tmp_path):
    storage = CheckpointStorage(str(tmp_path))
    write(storage, NAME, b"a")
    write(storage, "step_000000002", b"b")
    leftover = storage.begin_write("step_000000003")  # an abandoned write
    storage.delete(NAME)
    with pytest.raises(CheckpointNotFoundError):
        storage.info(NAME)
    expected = [f".dcp-plugin/staging/{os.path.basename(leftover.directory)}"]
    assert storage.incomplete() == expected
    assert storage.purge() == expected
    assert storage.incomplete() == [] and [i.name for i in storage.list()] == ["step_000000002"]
    with pytest.raises(ValueError, match="not a leftover"):
        storage.remove_incomplete("step_000000002")


def test_crash_points_are_inert_unless_armed(monkeypatch):
    monkeypatch.delenv("DCP_PLUGIN_CRASH_AT", raising=False)
    reached("save.sealed")  # returns: nothing armed
    monkeypatch.setenv("DCP_PLUGIN_CRASH_AT", "no.such.point")  # armed elsewhere: every real point returns
    for point in POINTS:
        reached(point)
