"""CheckpointManager in one process: exact round trips, snapshot semantics, listing and bad input."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch

from dcp_plugin import (
    CheckpointExistsError,
    CheckpointManager,
    CheckpointNotFoundError,
    ConfigError,
    OptimizerState,
    RNGState,
    StateMismatchError,
)
from tests.forge import forge_manifest
from tests.models import assert_same, make_model, make_training, snapshot, train_step

MODES = ["sync", "thread", pytest.param("process", marks=pytest.mark.slow)]


def full_state(model, optimizer, scheduler, step):
    return {"model": model, "optim": optimizer, "sched": scheduler, "rng": RNGState(), "step": step}


@pytest.mark.parametrize("mode", MODES)
def test_roundtrip_is_bit_exact_and_resume_matches_uninterrupted_run(ckpt_dir, mode):
    model, optimizer, scheduler = make_training()
    for _ in range(4):
        train_step(model, optimizer, scheduler)
    with CheckpointManager(ckpt_dir, async_mode=mode) as manager:
        manager.save(4, full_state(model, optimizer, scheduler, 4))
        saved = snapshot(model, optimizer)
        saved_sched = scheduler.state_dict()
        # the uninterrupted run continues from here
        expected_losses = [train_step(model, optimizer, scheduler) for _ in range(3)]
        expected = snapshot(model, optimizer)

    model2, optimizer2, scheduler2 = make_training(seed=123)
    random.seed(99), np.random.seed(99), torch.manual_seed(99)
    state = full_state(model2, optimizer2, scheduler2, 0)
    with CheckpointManager(ckpt_dir, async_mode=mode) as manager:
        info = manager.load(state)
    assert info.step == 4 and state["step"] == 4
    assert_same(snapshot(model2, optimizer2), saved)
    assert scheduler2.state_dict() == saved_sched
    resumed_losses = [train_step(model2, optimizer2, scheduler2) for _ in range(3)]
    assert resumed_losses == expected_losses
    assert_same(snapshot(model2, optimizer2), expected)


@pytest.mark.parametrize("mode", ["thread", pytest.param("process", marks=pytest.mark.slow)])
@pytest.mark.parametrize("async_staging", [False, None], ids=["staged-at-save", "default"])
def test_mutating_right_after_save_never_changes_what_was_saved(ckpt_dir, mode, async_staging):
    """Without async staging the live tensors may change as soon as ``save`` returns; with it (the default), once
    ``wait_for_staging()`` returns (what the optimizer's step pre-hook calls)."""
    model = make_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with CheckpointManager(ckpt_dir, async_mode=mode, async_staging=async_staging) as manager:
        manager.save(1, {"model": model})
        if manager.config.stages_in_background:
            manager.wait_for_staging()
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.mul_(-3).add_(7)
        manager.wait()
        restored = make_model(seed=5)
        manager.load({"model": restored})
    assert_same(restored.state_dict(), before)


def test_async_staging_blocks_only_at_the_next_optimizer_step(ckpt_dir):
    model, optimizer, _ = make_training()
    train_step(model, optimizer)
    with CheckpointManager(ckpt_dir, async_mode="thread", async_staging=True) as manager:
        manager.save(1, {"model": model, "optim": optimizer})
        saved = snapshot(model, optimizer)
        train_step(model, optimizer)  # its step pre-hook waits for the snapshot copy
        manager.wait()
        model2, optimizer2, _ = make_training(seed=3)
        manager.load({"model": model2, "optim": optimizer2})
    assert_same(snapshot(model2, optimizer2), saved)


def test_stats_report_timings_and_bytes(ckpt_dir):
    model = make_model()
    with CheckpointManager(ckpt_dir, async_mode="thread") as manager:
        stats = manager.save(0, {"model": model})
        manager.wait()
        completed = manager.engine.drain_completed()
    assert completed == [stats]
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    assert stats.bytes_written >= param_bytes
    assert 0 <= stats.blocking_s <= stats.durable_s
    assert stats.throughput_bytes_per_s > 0
    assert "blocked" in stats.summary()


def test_listing_latest_specific_step_and_delete(ckpt_dir):
    model = make_model()
    with CheckpointManager(ckpt_dir, async_mode="thread") as manager:
        for step in (10, 20, 30):
            manager.wait_for_staging()  # the edit below is no optimizer step: it waits for the snapshot itself
            with torch.no_grad():
                model[0].bias.fill_(step)
            manager.save(step, {"model": model}, metadata={"loss": step / 10})
        manager.wait()
        assert manager.steps == [10, 20, 30]
        assert manager.latest().metadata == {"loss": 3.0}
        target = make_model()
        manager.load({"model": target}, step=20)
        assert torch.all(target[0].bias == 20)
        manager.delete(20)
        assert manager.steps == [10, 30]
        with pytest.raises(CheckpointNotFoundError, match=r"step 20.*\[10, 30\]"):
            manager.load({"model": target}, step=20)


def test_committed_checkpoint_is_not_overwritten_unless_asked(ckpt_dir):
    model = make_model()
    with CheckpointManager(ckpt_dir, async_mode="sync") as manager:
        manager.save(5, {"model": model})
        with pytest.raises(CheckpointExistsError, match="overwrite=True"):
            manager.save(5, {"model": model})
        with torch.no_grad():
            model[0].bias.fill_(1.5)
        manager.save(5, {"model": model}, overwrite=True)
        target = make_model(seed=9)
        manager.load({"model": target})
    assert torch.all(target[0].bias == 1.5)
    assert sorted(os.listdir(ckpt_dir)) == ["step_000000005"]


def test_optimizer_state_is_keyed_by_parameter_name(ckpt_dir):
    model, optimizer, _ = make_training()
    train_step(model, optimizer)
    with CheckpointManager(ckpt_dir, async_mode="sync") as manager:
        manager.save(1, {"model": model, "optim": OptimizerState(model, optimizer)})
        manifest_entries = manager.latest().manifest["entries"]
    assert manifest_entries == {"model": {"per_rank": False}, "optim": {"per_rank": False}}
    from torch.distributed.checkpoint import FileSystemReader

    keys = set(FileSystemReader(os.path.join(ckpt_dir, "step_000000001")).read_metadata().state_dict_metadata)
    assert "optim.state.0.weight.exp_avg" in keys and "model.0.weight" in keys


# -- bad input -----------------------------------------------------------------------------------


def test_directory_that_is_a_file(tmp_path):
    path = tmp_path / "file"
    path.write_text("not a directory")
    with pytest.raises(NotADirectoryError, match="is a file"):
        CheckpointManager(str(path))


def test_loading_from_an_empty_directory_or_missing_step(ckpt_dir):
    with CheckpointManager(ckpt_dir, async_mode="sync") as manager:
        with pytest.raises(CheckpointNotFoundError, match="No committed checkpoint"):
            manager.load({"model": make_model()})
        manager.save(1, {"model": make_model()})
        with pytest.raises(CheckpointNotFoundError, match=r"step 2.*\[1\]"):
            manager.load({"model": make_model()}, step=2)


def test_shape_and_key_mismatch_list_every_problem(ckpt_dir):
    with CheckpointManager(ckpt_dir, async_mode="sync") as manager:
        manager.save(1, {"model": make_model()})
        wrong = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
        with pytest.raises(StateMismatchError, match=r"shape mismatch for 'model.2.weight'.*\(8, 32\).*\(4, 32\)"):
            manager.load({"model": wrong})
        bigger = torch.nn.Sequential(make_model(), torch.nn.Linear(8, 2))
        with pytest.raises(StateMismatchError) as excinfo:
            manager.load({"model": bigger, "absent": 1})
        message = str(excinfo.value)
        assert "entry 'absent' is not in the checkpoint" in message
        assert "missing keys" in message and "unexpected keys" in message and "strict=False" in message


def test_non_strict_load_takes_what_matches(ckpt_dir):
    source = make_model()
    with CheckpointManager(ckpt_dir, async_mode="sync") as manager:
        manager.save(1, {"model": source, "epoch": 3})
        target = torch.nn.Sequential(*make_model(seed=4), torch.nn.Linear(8, 2))
        untouched = target[3].weight.clone()
        state = {"model": target, "epoch": 0, "extra": 5}
        with pytest.warns(UserWarning) as warned:
            manager.load(state, strict=False)
    messages = [str(w.message) for w in warned]
    assert any("missing keys" in m for m in messages) and any(
        "entry 'extra' is not in the checkpoint" in m for m in messages
    )
    assert_same(target[:3].state_dict(), source.state_dict())
    assert torch.equal(target[3].weight, untouched)
    assert state["epoch"] == 3 and state["extra"] == 5


def test_unsupported_values_fail_before_anything_is_written(ckpt_dir):
    class Opaque:
        pass

    with CheckpointManager(ckpt_dir, async_mode="thread") as manager:
        with pytest.raises(TypeError, match=r"Opaque.*allow_pickle"):
            manager.save(1, {"model": make_model(), "thing": Opaque()})
        with pytest.raises(TypeError, match="JSON-serializable"):
            manager.save(1, {"model": make_model()}, metadata={"x": Opaque()})
    assert not os.path.exists(ckpt_dir) or os.listdir(ckpt_dir) == []


def test_process_mode_refuses_memory_filesystem(memory_url):
    with pytest.raises(ConfigError, match="memory://"):
        CheckpointManager(memory_url, async_mode="process")


def test_optimizer_without_a_single_model_must_be_wrapped(ckpt_dir):
    model_a, optimizer, _ = make_training()
    with CheckpointManager(ckpt_dir, async_mode="sync") as manager:
        with pytest.raises(ValueError, match="OptimizerState"):
            manager.save(1, {"a": model_a, "b": make_model(), "optim": optimizer})


def test_tampered_metadata_is_refused_without_running_it(ckpt_dir, tmp_path):
    import pickle

    with CheckpointManager(ckpt_dir, async_mode="sync") as manager:
        manager.save(1, {"model": make_model()})
        marker = tmp_path / "pwned"

        class Exploit:
            def __reduce__(self):
                return (os.system, (f"touch {marker}",))

        with open(os.path.join(ckpt_dir, "step_000000001", ".metadata"), "wb") as handle:
            pickle.dump(Exploit(), handle)
        forge_manifest(os.path.join(ckpt_dir, "step_000000001"))  # the attacker fixes up the checksums too
        from dcp_plugin import UnsafeCheckpointError

        with pytest.raises(UnsafeCheckpointError, match="posix.system|os.system"):
            manager.load({"model": make_model()})
    assert not marker.exists()


def test_process_mode_in_a_script_without_main_guard_is_explained(tmp_path):
    import subprocess
    import sys

    script = tmp_path / "train.py"
    script.write_text(
        "import torch\n"
        "from dcp_plugin import CheckpointManager\n"
        f"manager = CheckpointManager({str(tmp_path / 'ckpts')!r}, async_mode='process')\n"
        "manager.save(1, {'model': torch.nn.Linear(2, 2)})\n"
    )
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert 'if __name__ == "__main__":' in result.stderr and "async_mode='thread'" in result.stderr


_PROCESS_MODE_SCRIPT = """\
import torch
from dcp_plugin import CheckpointManager

if __name__ == "__main__":
    with CheckpointManager({directory!r}, async_mode="process") as manager:
        manager.save(1, {{"model": torch.nn.Linear({width}, {width})}})
        manager.wait()
    raise RuntimeError("the script's own error")
"""


def _run_process_mode_script(tmp_path, width: int, prefix: list[str] | None = None):
    import subprocess
    import sys

    script = tmp_path / "train.py"
    script.write_text(_PROCESS_MODE_SCRIPT.format(directory=str(tmp_path / "ckpts"), width=width))
    return subprocess.run([*(prefix or []), sys.executable, str(script)], capture_output=True, text=True, timeout=240)


@pytest.mark.slow
def test_process_mode_in_a_plain_script_adds_no_warning_and_no_rank_prefix(tmp_path):
    result = _run_process_mode_script(tmp_path, 4)
    assert os.path.isdir(tmp_path / "ckpts" / "step_000000001"), result.stderr
    assert "RuntimeError: the script's own error" in result.stderr
    assert "[rank0]" not in result.stderr and "torch.distributed is disabled" not in result.stderr, result.stderr
    assert "Warning" not in result.stderr, result.stderr


def _can_mount_a_small_dev_shm() -> bool:
    import shutil
    import subprocess

    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return False
    probe = ["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /dev/shm"]
    return subprocess.run(probe, capture_output=True, timeout=30).returncode == 0


@pytest.mark.slow
@pytest.mark.skipif(not _can_mount_a_small_dev_shm(), reason="needs root and unshare to mount a 1 MiB /dev/shm")
def test_a_full_dev_shm_is_named_with_the_size_needed_and_the_fixes(tmp_path):
    # A private mount namespace with a 1 MiB /dev/shm: a 4 MiB snapshot cannot be handed to the writer process.
    shell = ["unshare", "-m", "sh", "-c", 'mount -t tmpfs -o size=1m tmpfs /dev/shm && exec "$@"', "sh"]
    result = _run_process_mode_script(tmp_path, 1024, prefix=shell)
    assert result.returncode != 0
    assert "CheckpointSaveError" in result.stderr and "/dev/shm is too small for this snapshot" in result.stderr
    assert "needs about 4.0 MiB there; /dev/shm holds 1.0 MiB in all" in result.stderr
    assert "docker run --shm-size=1g" in result.stderr and "async_mode='thread'" in result.stderr
    assert not os.path.exists(tmp_path / "ckpts" / "step_000000001")


@pytest.mark.parametrize("mode", ["sync", "thread"])
def test_saving_before_the_first_step_does_not_change_training(ckpt_dir, mode):
    reference_model, reference_optimizer, _ = make_training()
    torch.manual_seed(5)
    expected = [train_step(reference_model, reference_optimizer) for _ in range(3)]

    model, optimizer, _ = make_training()
    with CheckpointManager(ckpt_dir, async_mode=mode) as manager:
        manager.save(0, {"model": model, "optim": optimizer})
        assert not optimizer.state  # the save did not initialise the optimizer
        torch.manual_seed(5)
        assert [train_step(model, optimizer) for _ in range(3)] == expected

        fresh_model, fresh_optimizer, _ = make_training(seed=8)
        manager.load({"model": fresh_model, "optim": fresh_optimizer}, step=0)
    assert not fresh_optimizer.state
    torch.manual_seed(5)
    assert [train_step(fresh_model, fresh_optimizer) for _ in range(3)] == expected


def test_async_staging_keeps_batchnorm_statistics_of_the_saved_step(ckpt_dir):
    model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.BatchNorm1d(16))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model(torch.randn(8, 16))
    with CheckpointManager(ckpt_dir, async_mode="thread", async_staging=True) as manager:
        manager.save(1, {"model": model, "optim": optimizer})
        saved = {k: v.clone() for k, v in model.state_dict().items()}
        model(torch.randn(8, 16) * 5)  # the next forward updates running stats: it waits for the snapshot
        manager.wait()
        restored = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.BatchNorm1d(16))
        manager.load({"model": restored})
    assert_same(restored.state_dict(), saved)


def test_load_refuses_both_a_step_and_a_name(ckpt_dir):
    with CheckpointManager(ckpt_dir, async_mode="sync") as manager:
        manager.save(1, {"model": make_model()})
        with pytest.raises(ConfigError, match=r"step=1 and name='step_000000001': pass one of them"):
            manager.load({"model": make_model()}, step=1, name="step_000000001")


def test_a_live_tensor_of_another_dtype_is_cast_with_a_warning_naming_it(ckpt_dir):
    saved = make_model(seed=0)
    with CheckpointManager(ckpt_dir, async_mode="sync") as manager:
        manager.save(1, {"model": saved, "scale": torch.ones(3)})
        live = make_model(seed=1).to(torch.float64)
        scale = torch.zeros(3, dtype=torch.float16)
        with pytest.warns(UserWarning) as caught:
            manager.load({"model": live, "scale": scale})
    text = "\n".join(str(w.message) for w in caught)
    assert "'model': tensors stored with another dtype" in text and "cast to the live dtype" in text
    assert "0.weight (float32 -> float64)" in text and "(4 in all)" in text
    assert "scale (float32 -> float16)" in text
    for key, value in saved.state_dict().items():
        assert live.state_dict()[key].dtype == torch.float64
        assert torch.equal(live.state_dict()[key], value.to(torch.float64))
    assert torch.equal(scale, torch.ones(3, dtype=torch.float16))
