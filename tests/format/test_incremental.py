"""Incremental checkpoints: unchanged tensors are written once, every checkpoint stays complete to every reader.

A LoRA-style model (frozen base ~95 % of the bytes) is saved for real; bytes written are measured as the sizes of
the files that a save added to the directory.
"""

from __future__ import annotations

import os
import re

import pytest
import torch

from dcp_plugin import CheckpointConfig, Checkpointer, CheckpointManager, KeepLast, ModelState, OptimizerState
from dcp_plugin.errors import CheckpointCorruptError, ConfigError, UnsafeCheckpointError
from dcp_plugin.format import write_watch
from dcp_plugin.storage import CheckpointStorage, copy_checkpoint, dcp_io, manifests
from dcp_plugin.storage.blobs import fingerprint
from dcp_plugin.storage.names import MANIFEST_NAME
from tests.models import assert_same, lora_step, make_lora, snapshot


def files_in(directory: str) -> dict[tuple[int, int], int]:
    """The size of each file under ``directory``, by inode: a hard link to bytes already there adds nothing."""
    found = {}
    for folder, _, names in os.walk(directory):
        for name in names:
            status = os.stat(os.path.join(folder, name))
            found[(status.st_dev, status.st_ino)] = status.st_size
    return found


def new_bytes(before: dict[tuple[int, int], int], after: dict[tuple[int, int], int]) -> int:
    return sum(size for path, size in after.items() if path not in before)


def lora_training(seed: int = 0):
    model = make_lora(seed)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    return model, optimizer


def state_of(model, optimizer) -> dict:
    return {"model": ModelState(model), "optim": OptimizerState(model, optimizer)}


def blob_files(storage: CheckpointStorage) -> set[str]:
    area = storage.blob_area
    return set(os.listdir(area)) if os.path.isdir(area) else set()


def referenced(storage: CheckpointStorage) -> set[str]:
    return {name for info in storage.list() for name in info.manifest.get("blobs", {})}


def storage_of(storage: CheckpointStorage, name: str, fqn: str) -> str:
    metadata = storage.metadata_reader(name).read_metadata()
    return next(str(info.relative_path) for index, info in metadata.storage_data.items() if index.fqn == fqn)


@pytest.mark.parametrize("mode", ["sync", "thread", pytest.param("process", marks=pytest.mark.slow)])
def test_second_save_of_a_lora_model_writes_a_fraction_and_loads_exactly(ckpt_dir, mode):
    model, optimizer = lora_training()
    lora_step(model, optimizer)
    with CheckpointManager(ckpt_dir, async_mode=mode) as manager:
        before = files_in(ckpt_dir)
        full = manager.save(1, state_of(model, optimizer))
        manager.wait()
        first = files_in(ckpt_dir)
        lora_step(model, optimizer)
        incremental = manager.save(2, state_of(model, optimizer))
        manager.wait()
        second = files_in(ckpt_dir)
        assert incremental.bytes_written <= 0.15 * full.bytes_written  # what SaveStats reports
        expected = snapshot(model, optimizer)
        written_first, written_second = new_bytes(before, first), new_bytes(first, second)
        assert written_second <= 0.15 * written_first, (written_first, written_second)
        manifest_size = os.path.getsize(os.path.join(ckpt_dir, "step_000000002", MANIFEST_NAME))
        assert manager.storage.read_manifest("step_000000002")["bytes_new"] == written_second - manifest_size

        fresh, fresh_optimizer = lora_training(seed=9)
        manager.load(state_of(fresh, fresh_optimizer), step=2)
        assert_same(snapshot(fresh, fresh_optimizer), expected)
        assert manager.storage.verify("step_000000002") == []


def _no_grad_in_place(model):
    with torch.no_grad():
        model[0].base.weight.add_(1.0)


def _in_place_through_data(model):
    model[0].base.weight.data.mul_(2.0)  # .data has its own version counter: only the content tells


def _numpy_view(model):
    model[0].base.weight.detach().numpy()[0, 0] += 1.0  # outside torch: no version counter at all


def _data_assignment(model):
    model[0].base.weight.data = torch.randn_like(model[0].base.weight)


def _load_state_dict(model):
    changed = {key: value.clone() for key, value in model.state_dict().items()}
    changed["0.base.weight"] = torch.randn_like(changed["0.base.weight"])
    model.load_state_dict(changed)


def _dtype(model):
    model[0].base.to(torch.float64)


CHANGES = {
    "no_grad_in_place": _no_grad_in_place,
    "in_place_through_data": _in_place_through_data,
    "data_assignment": _data_assignment,
    "load_state_dict": _load_state_dict,
    "dtype": _dtype,
    "numpy_view": _numpy_view,
}


@pytest.mark.parametrize("mode", ["sync", "thread"])
@pytest.mark.parametrize("change", sorted(CHANGES))
def test_every_way_of_changing_a_frozen_tensor_makes_the_next_save_rewrite_it(ckpt_dir, change, mode):
    model, optimizer = lora_training()
    with CheckpointManager(ckpt_dir, async_mode=mode) as manager:
        manager.save(1, state_of(model, optimizer))
        manager.save(2, state_of(model, optimizer))  # unchanged: refers to the bytes of step 1
        manager.wait()
        storage = manager.storage
        earlier = set(storage.read_manifest("step_000000001")["blobs"])
        assert storage_of(storage, "step_000000002", "model.0.base.weight") in earlier
        CHANGES[change](model)
        manager.save(3, state_of(model, optimizer))
        manager.wait()
        assert storage_of(storage, "step_000000003", "model.0.base.weight") not in earlier
        assert storage_of(storage, "step_000000003", "model.1.base.weight") in earlier  # unchanged ones still refer

        fresh, fresh_optimizer = lora_training(seed=9)
        if change == "dtype":
            fresh[0].base.to(torch.float64)
        manager.load(state_of(fresh, fresh_optimizer), step=3)
        assert_same(snapshot(fresh), snapshot(model))
        old, old_optimizer = lora_training(seed=9)
        manager.load(state_of(old, old_optimizer), step=2)
        assert_same(snapshot(old), snapshot(make_lora(0)))  # the older checkpoint still holds the old values


@pytest.mark.parametrize("change", sorted(CHANGES))
def test_without_write_tracking_every_change_is_still_found_by_fingerprints(ckpt_dir, monkeypatch, change):
    monkeypatch.setattr(write_watch, "_registry", lambda: None)  # as on systems without the facility
    test_every_way_of_changing_a_frozen_tensor_makes_the_next_save_rewrite_it(ckpt_dir, change, "sync")


def _write_from_another_process(tensor: torch.Tensor) -> None:
    with torch.no_grad():
        tensor.add_(1.0)


def test_a_frozen_tensor_in_shared_memory_written_by_another_process_is_rewritten(ckpt_dir):
    import torch.multiprocessing as multiprocessing

    model, optimizer = lora_training()
    model[0].base.weight.share_memory_()  # e.g. handed to DataLoader workers: writes bypass this process
    with CheckpointManager(ckpt_dir, async_mode="sync") as manager:
        manager.save(1, state_of(model, optimizer))
        manager.save(2, state_of(model, optimizer))
        child = multiprocessing.get_context("spawn").Process(
            target=_write_from_another_process, args=(model[0].base.weight,)
        )
        child.start()
        child.join()
        assert child.exitcode == 0
        manager.save(3, state_of(model, optimizer))
        fresh, fresh_optimizer = lora_training(seed=9)
        manager.load(state_of(fresh, fresh_optimizer), step=3)
    assert_same(snapshot(fresh), snapshot(model))
    assert not torch.equal(fresh[0].base.weight, make_lora(0)[0].base.weight)


@pytest.mark.slow
@pytest.mark.parametrize("change", ["in_place_through_data", "numpy_view", "load_state_dict"])
def test_changes_a_process_mode_save_cannot_see_in_the_version_counter_are_rewritten(ckpt_dir, change):
    test_every_way_of_changing_a_frozen_tensor_makes_the_next_save_rewrite_it(ckpt_dir, change, "process")


@pytest.mark.skipif(not write_watch.available(), reason="the kernel offers no write tracking here")
@pytest.mark.parametrize("mode", ["sync", "thread"])
@pytest.mark.parametrize("change", sorted(CHANGES))
def test_unwritten_frozen_tensors_are_not_read_and_a_written_one_is(ckpt_dir, monkeypatch, change, mode):
    """The frozen base is fingerprinted (read) once; after that only a tensor something wrote is read again."""
    read: list[str] = []

    def counting(tensor):
        read.append(tuple(tensor.shape))
        return fingerprint(tensor)

    monkeypatch.setattr(dcp_io, "fingerprint", counting)
    model, optimizer = lora_training()
    with CheckpointManager(ckpt_dir, async_mode=mode) as manager:
        manager.save(1, state_of(model, optimizer))
        manager.wait()
        assert len(read) == 8  # weight and bias of 4 frozen layers
        for step in (2, 3):
            read.clear()
            lora_step(model, optimizer)
            manager.save(step, state_of(model, optimizer))
            manager.wait()
            assert (step, read) == (step, [s for s in read if len(s) == 1])  # biases are too small to watch
        CHANGES[change](model)
        read.clear()
        manager.save(4, state_of(model, optimizer))
        manager.wait()
        assert (384, 384) in read
        assert storage_of(manager.storage, "step_000000004", "model.1.base.weight") == storage_of(
            manager.storage, "step_000000001", "model.1.base.weight"
        )
        fresh, fresh_optimizer = lora_training(seed=9)
        if change == "dtype":
            fresh[0].base.to(torch.float64)
        manager.load(state_of(fresh, fresh_optimizer), step=4)
        assert_same(snapshot(fresh, fresh_optimizer), snapshot(model, optimizer))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_frozen_tensor_moved_to_another_device_and_changed_is_rewritten(ckpt_dir):
    model, optimizer = lora_training()
    with CheckpointManager(ckpt_dir, async_mode="thread") as manager:
        manager.save(1, state_of(model, optimizer))
        model.cuda()
        with torch.no_grad():
            model[0].base.weight.add_(1.0)
        manager.save(2, state_of(model, optimizer))
        fresh, fresh_optimizer = lora_training(seed=9)
        manager.load(state_of(fresh, fresh_optimizer), step=2)
    assert_same(snapshot(fresh), {"model": {k: v.cpu() for k, v in snapshot(model)["model"].items()}})


def test_keep_last_over_ten_incremental_saves_leaves_only_referenced_data(ckpt_dir):
    model, optimizer = lora_training()
    with CheckpointManager(ckpt_dir, async_mode="thread", retention=KeepLast(1)) as manager:
        for step in range(1, 11):
            lora_step(model, optimizer)
            if step in (4, 7):
                _no_grad_in_place(model)  # some shared data stops being used
            manager.save(step, state_of(model, optimizer))
        manager.wait()
        expected = snapshot(model, optimizer)
    storage = CheckpointStorage(ckpt_dir)
    storage.purge()
    assert [info.name for info in storage.list()] == ["step_000000010"]
    assert blob_files(storage) == referenced(storage) != set()
    assert storage.incomplete() == []
    assert storage.verify("step_000000010") == []
    fresh, fresh_optimizer = lora_training(seed=9)
    with CheckpointManager(ckpt_dir, async_mode="sync") as manager:
        manager.load(state_of(fresh, fresh_optimizer))
    assert_same(snapshot(fresh, fresh_optimizer), expected)


def test_retention_never_removes_data_a_save_in_flight_refers_to(ckpt_dir):
    model, optimizer = lora_training()
    with CheckpointManager(ckpt_dir, async_mode="thread") as manager:
        manager.save(1, state_of(model, optimizer))
        manager.wait()
        manager.save(2, state_of(model, optimizer))  # refers to step 1's blobs while it is written
        manager.storage.delete("step_000000001")
        manager.storage.collect_blobs()
        manager.wait()
        assert manager.storage.verify("step_000000002") == []
        fresh, fresh_optimizer = lora_training(seed=9)
        manager.load(state_of(fresh, fresh_optimizer), step=2)
    assert_same(snapshot(fresh), snapshot(model))


def test_full_save_every_n_refers_to_no_earlier_data(ckpt_dir):
    model, optimizer = lora_training()
    with CheckpointManager(ckpt_dir, async_mode="sync", full_save_every=2) as manager:
        for step in (1, 2, 3):
            manager.save(step, state_of(model, optimizer))
        storage = manager.storage
        first, second, third = (set(storage.read_manifest(f"step_00000000{s}")["blobs"]) for s in (1, 2, 3))
    assert second & first  # the second save refers to the first one's data
    assert not third & (first | second)  # the third is a full save


def test_incremental_off_writes_self_contained_checkpoints(ckpt_dir, monkeypatch):
    monkeypatch.setenv("DCP_PLUGIN_INCREMENTAL", "0")
    model, optimizer = lora_training()
    with CheckpointManager(ckpt_dir, async_mode="sync") as manager:
        assert manager.config.incremental is False
        manager.save(1, state_of(model, optimizer))
        manager.save(2, state_of(model, optimizer))
        assert "blobs" not in manager.storage.read_manifest("step_000000002")
    assert not os.path.exists(os.path.join(ckpt_dir, ".dcp-plugin"))


def test_options_come_from_the_environment_and_are_checked():
    config = CheckpointConfig.resolve({"DCP_PLUGIN_FULL_SAVE_EVERY": "5", "DCP_PLUGIN_INCREMENTAL": "no"})
    assert (config.incremental, config.full_save_every) == (False, 5)
    assert CheckpointConfig.resolve({"DCP_PLUGIN_FULL_SAVE_EVERY": "none"}).full_save_every is None
    assert CheckpointConfig().incremental is True
    with pytest.raises(ConfigError, match="full_save_every"):
        CheckpointConfig(full_save_every=0)
    with pytest.raises(ConfigError, match="DCP_PLUGIN_FULL_SAVE_EVERY"):
        CheckpointConfig.resolve({"DCP_PLUGIN_FULL_SAVE_EVERY": "often"})


def test_a_copy_is_self_contained(ckpt_dir, tmp_path):
    model, optimizer = lora_training()
    with CheckpointManager(ckpt_dir, async_mode="sync") as manager:
        manager.save(1, state_of(model, optimizer))
        manager.save(2, state_of(model, optimizer))
    target = CheckpointStorage(str(tmp_path / "copies"))
    copied = copy_checkpoint(CheckpointStorage(ckpt_dir), "step_000000002", target)
    assert "blobs" not in copied.manifest
    import shutil

    shutil.rmtree(ckpt_dir)
    assert target.verify("step_000000002") == []
    fresh, fresh_optimizer = lora_training(seed=9)
    Checkpointer(CheckpointConfig(async_mode="sync")).load(
        target.url("step_000000002"), state_of(fresh, fresh_optimizer)
    )
    assert_same(snapshot(fresh), snapshot(model))


# -- hostile and damaged references -------------------------------------------------------------------------
def _two_saves(ckpt_dir) -> CheckpointStorage:
    model, optimizer = lora_training()
    with CheckpointManager(ckpt_dir, async_mode="sync") as manager:
        manager.save(1, state_of(model, optimizer))
        manager.save(2, state_of(model, optimizer))
    return CheckpointStorage(ckpt_dir)


def _load_step_2(ckpt_dir):
    fresh, fresh_optimizer = lora_training(seed=9)
    with CheckpointManager(ckpt_dir, async_mode="sync") as manager:
        manager.load(state_of(fresh, fresh_optimizer), step=2)


def _forge(storage: CheckpointStorage, name: str, change) -> None:
    """Rewrite a manifest as a forger would (a valid checksum over the changed content)."""
    path = os.path.join(storage.url(name), MANIFEST_NAME)
    with open(path, "rb") as handle:
        manifest = manifests.decode(handle.read(), path)
    change(manifest)
    with open(path, "wb") as handle:
        handle.write(manifests.encode(manifest))


@pytest.mark.parametrize("name", ["../../etc/passwd", "/etc/passwd", "..", "blob_aaaaaaaaaaaa_r0_0.distcp/x"])
def test_a_manifest_naming_shared_data_outside_the_blob_area_is_refused(ckpt_dir, name):
    storage = _two_saves(ckpt_dir)
    _forge(storage, "step_000000002", lambda m: m["blobs"].update({name: {"size": 1, "xxh3_128": "0"}}))
    with pytest.raises(CheckpointCorruptError, match="malformed"):
        storage.info("step_000000002")
    assert [info.name for info in storage.list()] == ["step_000000001"]


def test_a_missing_shared_file_fails_the_load_and_verify_names_it(ckpt_dir):
    storage = _two_saves(ckpt_dir)
    used = sorted(storage.read_manifest("step_000000002")["blobs"])
    os.remove(os.path.join(ckpt_dir, "step_000000002", used[0]))  # readers use the checkpoint's own link
    assert any(f"{used[0]} is missing" in p for p in storage.verify("step_000000002"))
    with pytest.raises(CheckpointCorruptError, match="missing"):
        _load_step_2(ckpt_dir)


def test_a_shared_file_of_the_wrong_size_fails_the_load(ckpt_dir):
    storage = _two_saves(ckpt_dir)
    blobs = storage.read_manifest("step_000000002")["blobs"]
    largest = max(blobs, key=lambda n: blobs[n]["size"])
    with open(os.path.join(storage.blob_area, largest), "ab") as handle:
        handle.write(b"\0" * 16)
    assert any("appended" in p for p in storage.verify("step_000000002"))
    with pytest.raises(CheckpointCorruptError, match=largest):
        _load_step_2(ckpt_dir)


def test_a_shared_file_replaced_by_a_link_is_never_followed(ckpt_dir, tmp_path):
    storage = _two_saves(ckpt_dir)
    blobs = storage.read_manifest("step_000000002")["blobs"]
    largest = max(blobs, key=lambda n: blobs[n]["size"])
    outside = tmp_path / "outside"
    outside.write_bytes(b"x" * blobs[largest]["size"])
    path = os.path.join(ckpt_dir, "step_000000002", largest)  # the link readers use
    os.remove(path)
    os.symlink(outside, path)
    with pytest.raises((CheckpointCorruptError, UnsafeCheckpointError)):
        _load_step_2(ckpt_dir)


def test_metadata_pointing_at_a_blob_the_manifest_does_not_list_is_refused(ckpt_dir):
    storage = _two_saves(ckpt_dir)
    _forge(storage, "step_000000002", lambda m: m.update(blobs={}))
    # the directory holds a link to the blob, but no checksum vouches for it
    with pytest.raises(CheckpointCorruptError, match="step_000000002 has no checksum for blob_"):
        _load_step_2(ckpt_dir)


# -- object stores and several ranks -------------------------------------------------------------------------
def test_incremental_saves_on_s3_refer_to_shared_data_and_are_collected(s3_url):
    url, options = s3_url
    model, optimizer = lora_training()
    with CheckpointManager(url, async_mode="thread", storage_options=options, retention=KeepLast(1)) as manager:
        manager.save(1, state_of(model, optimizer))
        lora_step(model, optimizer)
        _no_grad_in_place(model)
        manager.save(2, state_of(model, optimizer))
        manager.wait()
        lora_step(model, optimizer)
        manager.save(3, state_of(model, optimizer))
        manager.wait()
        storage = manager.storage
        first = storage.read_manifest("step_000000003")  # step 1 and 2 were deleted by retention
        assert manager.steps == [3]
        expected = snapshot(model, optimizer)
    assert first["bytes_new"] <= 0.15 * first["bytes"]
    storage.purge()
    storage.fs.invalidate_cache()
    stored = {p.rsplit("/", 1)[-1] for p in storage.fs.ls(storage.blob_area, detail=False)}
    assert stored == set(first["blobs"])
    assert storage.verify("step_000000003") == []
    fresh, fresh_optimizer = lora_training(seed=9)
    with CheckpointManager(url, async_mode="sync", storage_options=options) as manager:
        manager.load(state_of(fresh, fresh_optimizer))
    assert_same(snapshot(fresh, fresh_optimizer), expected)


def _sharded_lora(world_size: int):
    import torch.distributed as dist

    model, optimizer = lora_training()
    if world_size > 1:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (dist.get_world_size(),))
        for layer in model:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    return model, optimizer


def _full_model_state(model) -> dict:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {key: value.detach().clone() for key, value in full.items()}


def two_rank_incremental_saves(rank, world_size, directory):
    model, optimizer = _sharded_lora(world_size)
    torch.manual_seed(5)
    with CheckpointManager(directory, async_mode="thread") as manager:
        manager.save(1, {"model": ModelState(model)})
        lora_step(model, optimizer)
        manager.save(2, {"model": ModelState(model)})
        manager.wait()
        manifests_ = [manager.storage.read_manifest(f"step_00000000{s}") for s in (1, 2)]
    return {"full": _full_model_state(model), "manifests": manifests_}


def one_rank_load(rank, world_size, directory):
    model, _ = _sharded_lora(world_size)
    with CheckpointManager(directory, async_mode="sync") as manager:
        manager.load({"model": ModelState(model)}, step=2)
    return {"full": _full_model_state(model)}


@pytest.mark.slow
def test_two_rank_incremental_saves_write_a_fraction_and_reshard_to_one_rank(tmp_path):
    from tests.multiproc import run_ranks

    directory = str(tmp_path / "ckpts")
    saved = run_ranks(two_rank_incremental_saves, directory, world_size=2)
    first, second = saved[0]["manifests"]
    assert {name.split("_r")[1][0] for name in first["blobs"]} == {"0", "1"}  # both ranks wrote shared data
    assert second["bytes_new"] <= 0.15 * first["bytes_new"]
    loaded = run_ranks(one_rank_load, directory, world_size=1)
    assert_same(loaded[0]["full"], saved[0]["full"])


def test_the_command_line_reads_through_references(ckpt_dir, tmp_path, capsys):
    from dcp_plugin.cli import main

    model, optimizer = lora_training()
    with CheckpointManager(ckpt_dir, async_mode="sync") as manager:
        manager.save(1, {"model": model})
        with torch.no_grad():
            model[2].a.add_(1.0)
        manager.save(2, {"model": model})
        manager.delete(1)  # step 2's frozen weights are in step 1's write: still there
    checkpoint = os.path.join(ckpt_dir, "step_000000002")
    assert main(["verify", "--load", checkpoint]) == 0
    assert "OK" in capsys.readouterr().out
    assert main(["inspect", checkpoint]) == 0
    assert re.search(r"model\.0\.base\.weight +\(384, 384\) +float32", capsys.readouterr().out)
    target = tmp_path / "model.pt"
    assert main(["export", checkpoint, str(target)]) == 0
    assert_same(torch.load(target, weights_only=True), dict(model.state_dict()))
    assert main(["purge", ckpt_dir]) == 0
    assert main(["verify", checkpoint]) == 0


def test_a_save_with_bounded_staging_writes_everything_and_loads_exactly(ckpt_dir):
    model, optimizer = lora_training()
    with CheckpointManager(ckpt_dir, async_mode="thread", max_staging_bytes=2**20) as manager:
        manager.save(1, state_of(model, optimizer))
        lora_step(model, optimizer)
        manager.save(2, state_of(model, optimizer))
        manager.wait()
        manifest = manager.storage.read_manifest("step_000000002")
        assert not manifest["blobs"] and manifest["bytes_new"] >= manifest["bytes"]
        fresh, fresh_optimizer = lora_training(seed=9)
        manager.load(state_of(fresh, fresh_optimizer), step=2)
    assert_same(snapshot(fresh, fresh_optimizer), snapshot(model, optimizer))


@pytest.mark.parametrize("mode", ["sync", "thread"])
def test_pytorchs_own_dcp_tools_read_an_incremental_checkpoint_after_its_base_is_deleted(ckpt_dir, tmp_path, mode):
    from torch.distributed.checkpoint import load as dcp_load
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    model, optimizer = lora_training()
    with CheckpointManager(ckpt_dir, async_mode=mode, retention=KeepLast(1)) as manager:
        manager.save(1, {"model": model})
        manager.wait()
        first_blobs = set(manager.storage.read_manifest("step_000000001")["blobs"])
        lora_step(model, optimizer)
        manager.save(2, {"model": model})  # refers to step 1's bytes; retention then deletes step 1
        manager.wait()
        storage = manager.storage
        assert manager.steps == [2]
        storage.purge()
        assert blob_files(storage) == referenced(storage)
    directory = os.path.join(ckpt_dir, "step_000000002")
    reused = {storage_of(storage, "step_000000002", f"model.{i}.base.weight") for i in range(4)}
    assert reused <= first_blobs
    for name in reused:  # the bytes are stored once: the directory's name is a link to the shared file
        assert os.path.samefile(os.path.join(directory, name), os.path.join(storage.blob_area, name))
    expected = {key: value.clone() for key, value in model.state_dict().items()}

    dcp_to_torch_save(directory, str(tmp_path / "model.pt"))
    converted = torch.load(tmp_path / "model.pt", weights_only=True)["model"]
    assert_same(converted, expected)

    live = {"model": {key: torch.zeros_like(value) for key, value in expected.items()}}
    dcp_load(live, checkpoint_id=directory)
    assert_same(live["model"], expected)
