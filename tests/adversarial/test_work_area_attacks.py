"""What a hostile or careless run directory can hold inside dcp-plugin's work areas, and a
second process swapping an area for a link while dcp-plugin cleans up. Whatever is there, only names dcp-plugin
gives are removed, nothing is followed, and nothing outside the run changes."""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import time

import pytest
import torch

from dcp_plugin import CheckpointManager
from dcp_plugin.errors import UnsafeCheckpointError
from dcp_plugin.storage import CheckpointStorage, work_areas
from tests.adversarial.helpers import small_tmpfs

OURS = "step_000000009.0123456789ab"


def _outside(tmp_path) -> tuple[str, str]:
    """A directory and a file outside the run that nothing may change."""
    victim = tmp_path / "victim"
    (victim / "sub").mkdir(parents=True)
    (victim / "sub" / "keep.bin").write_text("precious")
    (victim / "step_000000001.0123456789ab").mkdir()  # named like ours
    single = tmp_path / "outside.bin"
    single.write_text("precious")
    return str(victim), str(single)


def _read(path: str) -> str:
    with open(path) as handle:
        return handle.read()


def _intact(victim: str, single: str) -> None:
    assert _read(os.path.join(victim, "sub", "keep.bin")) == "precious"
    assert os.path.isdir(os.path.join(victim, "step_000000001.0123456789ab"))
    assert _read(single) == "precious"


def test_purge_removes_only_our_entries_and_follows_nothing_inside_them(ckpt_dir, tmp_path):
    victim, single = _outside(tmp_path)
    with CheckpointManager(ckpt_dir, async_mode="sync") as manager:
        manager.save(1, {"w": torch.ones(4)})
    work = os.path.join(ckpt_dir, ".dcp-plugin")
    leftover = os.path.join(work, "trash", OURS)
    os.makedirs(os.path.join(leftover, "nested"))
    os.symlink(victim, os.path.join(leftover, "to-dir"))
    os.symlink(os.path.join(victim, "sub", "keep.bin"), os.path.join(leftover, "nested", "to-file"))
    os.link(single, os.path.join(leftover, "hard-link.bin"))
    os.mkfifo(os.path.join(leftover, "fifo"))
    os.makedirs(os.path.join(work, "staging"))
    os.symlink(victim, os.path.join(work, "staging", "step_000000008.abcdefabcdef"))  # an entry that is a link
    foreign = [os.path.join(work, "trash", "notes.txt"), os.path.join(work, "blobs", "readme"),
               os.path.join(ckpt_dir, ".tmp-data", "x")]  # fmt: skip
    for path in foreign:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        open(path, "w").close()
    removed = CheckpointStorage(ckpt_dir).purge()
    assert sorted(removed) == [".dcp-plugin/staging/step_000000008.abcdefabcdef", f".dcp-plugin/trash/{OURS}"]
    assert not os.path.lexists(leftover)
    assert all(os.path.exists(path) for path in foreign)  # names dcp-plugin never gives are left alone
    _intact(victim, single)
    assert os.stat(single).st_nlink == 1


def test_a_leftover_with_a_filesystem_mounted_inside_is_left_alone(ckpt_dir, tmp_path):
    with CheckpointManager(ckpt_dir, async_mode="sync") as manager:
        manager.save(1, {"w": torch.ones(4)})
    mount_point = os.path.join(ckpt_dir, ".dcp-plugin", "trash", OURS, "mnt")
    with small_tmpfs(mount_point, size="1m") as mounted:
        with open(os.path.join(mounted, "keep.bin"), "w") as handle:
            handle.write("precious")
        with pytest.raises(OSError, match="another filesystem"):
            CheckpointStorage(ckpt_dir).purge()
        assert _read(os.path.join(mounted, "keep.bin")) == "precious"


def test_deleting_a_checkpoint_holding_links_to_outside_removes_only_the_links(ckpt_dir, tmp_path):
    victim, single = _outside(tmp_path)
    with CheckpointManager(ckpt_dir, async_mode="sync") as manager:
        manager.save(1, {"w": torch.ones(4)})
        manager.save(2, {"w": torch.ones(4)})
        directory = os.path.join(ckpt_dir, "step_000000001")
        os.symlink(victim, os.path.join(directory, "to-dir"))
        os.link(single, os.path.join(directory, "hard-link.bin"))
        manager.delete(1)
        assert manager.steps == [2]
    _intact(victim, single)


def test_a_work_area_that_is_a_file_is_a_clear_error(ckpt_dir):
    os.makedirs(ckpt_dir)
    open(os.path.join(ckpt_dir, ".dcp-plugin"), "w").close()
    with CheckpointManager(ckpt_dir, async_mode="sync") as manager:
        with pytest.raises(UnsafeCheckpointError, match="not a directory"):
            manager.save(1, {"w": torch.ones(4)})
    with pytest.raises(UnsafeCheckpointError, match="not a directory"):
        CheckpointStorage(ckpt_dir).purge()


def _swap_forever(work: str, seconds: float, started) -> None:
    """Swap ``trash`` and the link ``decoy`` atomically, as fast as possible, for ``seconds``."""
    libc = ctypes.CDLL(None, use_errno=True)
    trash, decoy = os.fsencode(os.path.join(work, "trash")), os.fsencode(os.path.join(work, "decoy"))
    started.set()
    stop_at = time.monotonic() + seconds
    while time.monotonic() < stop_at:
        libc.renameat2(-100, trash, -100, decoy, 2)  # RENAME_EXCHANGE


@pytest.mark.slow
def test_a_second_process_swapping_the_trash_for_a_link_never_redirects_a_removal(ckpt_dir, tmp_path):
    victim, single = _outside(tmp_path)
    for number in range(50):  # names like ours in the link's target: a followed removal would take them
        os.makedirs(os.path.join(victim, f"step_{number:09d}.0123456789ab"), exist_ok=True)
    with CheckpointManager(ckpt_dir, async_mode="sync") as manager:
        manager.save(1, {"w": torch.ones(4)})
    storage = CheckpointStorage(ckpt_dir)
    root = storage._root
    work = os.path.join(ckpt_dir, ".dcp-plugin")
    work_areas.make_entry(root, "trash", "step_000000000.0123456789ab")
    os.symlink(victim, os.path.join(work, "decoy"))
    context = multiprocessing.get_context("spawn")
    started = context.Event()
    swapper = context.Process(target=_swap_forever, args=(work, 3.0, started))
    swapper.start()
    started.wait(60)
    refused = removed = 0
    try:
        while swapper.is_alive():
            try:  # a leftover made through a descriptor: in the real trash, or refused while the link is there
                work_areas.make_entry(root, "trash", f"step_{removed % 50:09d}.0123456789ab")
            except (UnsafeCheckpointError, OSError):
                pass
            try:
                removed += len(storage.purge())
            except (UnsafeCheckpointError, OSError):
                refused += 1
    finally:
        swapper.join(10)
        if swapper.is_alive():
            swapper.kill()
    assert len(os.listdir(victim)) == 51, (removed, refused)
    _intact(victim, single)
    assert removed > 0 and refused > 0, (removed, refused)  # both sides of the race were taken


@pytest.mark.parametrize("planted", ["symlink", "hard-link"])
def test_a_file_planted_where_a_save_writes_is_never_written_through(tmp_path, planted):
    from dcp_plugin.storage.record_writer import RecordFile

    outside = tmp_path / "outside.bin"
    outside.write_text("precious")
    target = tmp_path / "blob_0123456789ab_r0_0.distcp"
    (os.symlink if planted == "symlink" else os.link)(outside, target)
    with pytest.raises(OSError):
        RecordFile.create_local(str(target))
    assert outside.read_text() == "precious"


def _purge_into(root: str, results) -> None:
    try:
        CheckpointStorage(root).purge()
        results.put("ok")
    except Exception as err:  # noqa: BLE001 - reported to the test
        results.put(f"{type(err).__name__}: {err}")


@pytest.mark.slow
def test_two_purges_at_once_both_succeed(ckpt_dir):
    with CheckpointManager(ckpt_dir, async_mode="sync") as manager:
        manager.save(1, {"w": torch.ones(4)})
    for number in range(100):
        os.makedirs(os.path.join(ckpt_dir, ".dcp-plugin", "trash", f"step_{number:09d}.0123456789ab", "data"))
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    purges = [context.Process(target=_purge_into, args=(ckpt_dir, results)) for _ in range(2)]
    for process in purges:
        process.start()
    for process in purges:
        process.join(120)
    assert [results.get(timeout=10), results.get(timeout=10)] == ["ok", "ok"]
    assert CheckpointStorage(ckpt_dir).incomplete() == []
    assert CheckpointManager(ckpt_dir).steps == [1]
