"""Damaged checkpoints (a failing disk, not an attacker): ``verify`` names every damaged file and ``load`` raises
a project error instead of returning wrong tensors (DESIGN.md section 7, "Corruption")."""

from __future__ import annotations

import json
import os
import random
import shutil
from collections.abc import Callable

import pytest
import torch

from dcp_plugin import CheckpointManager
from dcp_plugin.errors import CheckpointCorruptError, CheckpointError
from tests.forge import read_manifest
from tests.models import assert_same, make_training, snapshot, train_step

pytestmark = pytest.mark.timeout(30)

FIRST, SECOND = "step_000000001", "step_000000002"
DATA_FILES = ["__0_0.distcp"]  # a small save writes one file per rank
FILES = [*DATA_FILES, ".metadata", "dcp_plugin.json"]
PAGE = 4096


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict]:
    """A root with two checkpoints of the same model and optimizer at different steps, and what each holds."""
    root = str(tmp_path_factory.mktemp("pristine"))
    model, optimizer, scheduler = make_training()
    saved = {}
    with CheckpointManager(root, async_mode="sync") as manager:
        # a save first that is deleted again: both checkpoints are then written the same way (without DCP, as saves
        # that repeat a structure are), so their files have the same sizes
        for step, name in ((0, ""), (1, FIRST), (2, SECOND)):
            train_step(model, optimizer, scheduler)
            manager.save(step, {"model": model, "optim": optimizer})
            saved[name] = snapshot(model, optimizer)
        manager.delete(0)
        del saved[""]
    assert sorted(os.listdir(os.path.join(root, SECOND))) == sorted(FILES)
    return root, saved


@pytest.fixture
def root(pristine: tuple[str, dict], tmp_path) -> str:
    copy = str(tmp_path / "root")
    shutil.copytree(pristine[0], copy, symlinks=True)
    return copy


def fresh_state() -> dict:
    model, optimizer, _ = make_training(seed=11)
    return {"model": model, "optim": optimizer}


# -- corruptions: (directory, file) -> None ------------------------------------------------------------------
def _rewrite(path: str, change: Callable[[bytearray], bytes]) -> None:
    with open(path, "rb") as handle:
        data = bytearray(handle.read())
    new = bytes(change(bytearray(data)))
    assert new != bytes(data), "the corruption changed nothing"
    with open(path, "wb") as handle:
        handle.write(new)


def bit_flip(attempt: int) -> Callable[[str, str], None]:
    def corrupt(directory: str, name: str) -> None:
        rng = random.Random(f"{name}/{attempt}")  # fixed seed: the same offsets on every run

        def flip(data: bytearray) -> bytes:
            offset = rng.randrange(len(data))
            data[offset] ^= 1 << rng.randrange(8)
            return data

        _rewrite(os.path.join(directory, name), flip)

    return corrupt


def zeroed_page(directory: str, name: str) -> None:
    def zero(data: bytearray) -> bytes:
        for start in range((len(data) // 2) // PAGE * PAGE, -1, -PAGE):  # the middle page, else an earlier one
            end = min(start + PAGE, len(data))
            if any(data[start:end]):
                data[start:end] = bytes(end - start)
                return data
        return data

    _rewrite(os.path.join(directory, name), zero)


def truncated_half(directory: str, name: str) -> None:
    _rewrite(os.path.join(directory, name), lambda data: data[: len(data) // 2])


def truncated_empty(directory: str, name: str) -> None:
    _rewrite(os.path.join(directory, name), lambda data: b"")


def deleted(directory: str, name: str) -> None:
    os.remove(os.path.join(directory, name))


def appended(directory: str, name: str) -> None:
    _rewrite(os.path.join(directory, name), lambda data: data + b"\x00garbage\xff" * 4)


def first_byte_flipped(directory: str, name: str) -> None:
    def flip(data: bytearray) -> bytes:
        data[0] ^= 0xFF
        return data

    _rewrite(os.path.join(directory, name), flip)


def last_byte_flipped(directory: str, name: str) -> None:
    def flip(data: bytearray) -> bytes:
        data[-1] ^= 0xFF
        return data

    _rewrite(os.path.join(directory, name), flip)


CORRUPTIONS = {
    **{f"bit-flip-{attempt}": bit_flip(attempt) for attempt in range(4)},
    "first-byte": first_byte_flipped,
    "last-byte": last_byte_flipped,
    "zeroed-page": zeroed_page,
    "truncated-half": truncated_half,
    "truncated-empty": truncated_empty,
    "deleted": deleted,
    "appended": appended,
}


def assert_detected(root: str, name: str, file: str) -> None:
    with CheckpointManager(root, async_mode="sync") as manager:
        problems = manager.storage.verify(name)
        assert problems, f"verify found nothing wrong with {file}"
        assert any(file in problem for problem in problems), problems
        state = fresh_state()
        with pytest.raises(CheckpointError) as info:
            manager.load(state, name=name)
        assert name in str(info.value) and file in str(info.value), str(info.value)


@pytest.mark.parametrize("file", FILES)
@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_every_corruption_is_found_by_verify_and_refused_by_load(root, corruption, file):
    CORRUPTIONS[corruption](os.path.join(root, SECOND), file)
    assert_detected(root, SECOND, file)


@pytest.mark.parametrize("file", DATA_FILES)
@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_a_load_into_fresh_tensors_refuses_every_corruption(root, corruption, file):
    """Loading into empty containers (as Lightning's ``load_checkpoint`` does: the reader hands over the tensors
    it builds instead of copying them) refuses damaged files just like a load into a live model."""
    CORRUPTIONS[corruption](os.path.join(root, SECOND), file)
    with CheckpointManager(root, async_mode="sync") as manager, pytest.raises(CheckpointError) as info:
        manager.load({"model": {}, "optim": {}}, name=SECOND)
    assert SECOND in str(info.value) and file in str(info.value), str(info.value)


def test_a_load_into_fresh_tensors_returns_exactly_what_was_saved(root, pristine):
    with CheckpointManager(root, async_mode="sync") as manager:
        state: dict = {"model": {}, "optim": {}}
        manager.load(state, name=SECOND)
    assert_same(pristine[1][SECOND]["model"], state["model"])
    by_id = pristine[1][SECOND]["optim_state"]  # keyed by parameter index; the checkpoint keys them by name
    names = list(pristine[1][SECOND]["model"])
    assert_same({names[index]: value for index, value in by_id.items()}, state["optim"]["state"])


@pytest.mark.parametrize("corruption", ["zeroed-page", "truncated-half", "last-byte"])
def test_a_damaged_file_leaves_the_live_tensors_untouched(root, corruption):
    """A load into a live model verifies each file before the first byte is copied into the model."""
    for file in DATA_FILES:
        CORRUPTIONS[corruption](os.path.join(root, SECOND), file)
    state = fresh_state()
    before = snapshot(state["model"], state["optim"])
    with CheckpointManager(root, async_mode="sync") as manager, pytest.raises(CheckpointCorruptError):
        manager.load(state, name=SECOND)
    assert_same(before, snapshot(state["model"], state["optim"]))


@pytest.mark.parametrize("corruption", ["first-byte", "last-byte", "bit-flip-0"])
def test_damaged_data_is_reported_as_corruption_wherever_it_sits(tmp_path, corruption):
    """The non-tensor state is read first (before the tensors, whose read hashes the file); damage in its bytes
    must still be reported as a damaged file, not as whatever the damaged bytes broke."""
    model = torch.nn.Linear(4, 4)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    with CheckpointManager(str(tmp_path), async_mode="sync") as manager:
        manager.save(1, {"model": model, "optim": optimizer})
        manager.save(2, {"model": model, "optim": optimizer})
    directory = tmp_path / SECOND
    for file in sorted(name for name in os.listdir(directory) if name.endswith(".distcp")):
        shutil.copytree(directory, tmp_path / "pristine", dirs_exist_ok=True)
        CORRUPTIONS[corruption](str(directory), file)
        with (
            CheckpointManager(str(tmp_path), async_mode="sync") as manager,
            pytest.raises(CheckpointCorruptError) as info,
        ):
            manager.load({"model": model, "optim": optimizer}, name=SECOND)
        assert file in str(info.value) and FIRST in str(info.value), str(info.value)
        shutil.copytree(tmp_path / "pristine", directory, dirs_exist_ok=True)


@pytest.mark.parametrize("file", [*DATA_FILES, ".metadata"])
def test_a_file_swapped_from_another_checkpoint_of_the_same_size_is_found(root, file):
    source, target = os.path.join(root, FIRST, file), os.path.join(root, SECOND, file)
    assert os.path.getsize(source) == os.path.getsize(target)
    with open(source, "rb") as a, open(target, "rb") as b:
        assert a.read() != b.read()
    shutil.copyfile(source, target)
    assert_detected(root, SECOND, file)


def test_a_manifest_edited_without_its_checksum_is_found(root):
    path = os.path.join(root, SECOND, "dcp_plugin.json")
    manifest = read_manifest(os.path.join(root, SECOND))
    manifest["step"] = 7
    with open(path, "w") as handle:
        json.dump(manifest, handle)
    assert_detected(root, SECOND, "dcp_plugin.json")


def test_the_damage_stays_in_its_checkpoint(root, pristine, caplog):
    bit_flip(0)(os.path.join(root, SECOND), "dcp_plugin.json")
    with CheckpointManager(root, async_mode="sync") as manager:
        assert [info.name for info in manager.list()] == [FIRST]
        assert manager.latest().name == FIRST
        assert manager.storage.verify(FIRST) == []
        state = fresh_state()
        manager.load(state)
    assert_same(pristine[1][FIRST], snapshot(state["model"], state["optim"]))


def test_the_pristine_checkpoints_verify_and_load(root, pristine):
    with CheckpointManager(root, async_mode="sync") as manager:
        for name in (FIRST, SECOND):
            assert manager.storage.verify(name) == []
            state = fresh_state()
            manager.load(state, name=name)
            assert_same(pristine[1][name], snapshot(state["model"], state["optim"]))


# -- checkpoints of v0.1: no checksums -------------------------------------------------------------------
def as_v01(directory: str) -> None:
    """What v0.1 wrote: format 1, no per-file checksums, no manifest checksum."""
    manifest = read_manifest(directory)
    for key in ("files", "checksum"):
        manifest.pop(key, None)
    manifest["format"] = 1
    with open(os.path.join(directory, "dcp_plugin.json"), "w") as handle:
        json.dump(manifest, handle, indent=1)


@pytest.mark.filterwarnings("ignore")
def test_a_checkpoint_without_checksums_still_loads(root, pristine):
    as_v01(os.path.join(root, SECOND))
    with CheckpointManager(root, async_mode="sync") as manager:
        assert manager.latest().name == SECOND
        assert manager.storage.verify(SECOND) == []
        state = fresh_state()
        manager.load(state)
        assert_same(pristine[1][SECOND], snapshot(state["model"], state["optim"]))
        assert_same(pristine[1][SECOND]["model"], manager.read(name=SECOND)["model"])


@pytest.mark.parametrize("corruption", ["truncated-half", "deleted"])
@pytest.mark.parametrize("file", [*DATA_FILES, ".metadata"])
def test_a_checkpoint_without_checksums_still_refuses_missing_bytes(root, corruption, file):
    directory = os.path.join(root, SECOND)
    as_v01(directory)
    CORRUPTIONS[corruption](directory, file)
    assert_detected(root, SECOND, file)
