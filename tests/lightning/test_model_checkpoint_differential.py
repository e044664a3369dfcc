"""ModelCheckpoint behaves the same with DCPCheckpointIO as with Lightning's default CheckpointIO (the oracle).

Every scenario runs with the default plugin, and with DCPCheckpointIO in thread and process mode, and compares
what users observe: the names in the checkpoint directory, ``best_model_path`` / ``last_model_path`` /
``best_k_models`` (scores included), and the state a resumed run continues from.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from typing import Any

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from dcp_plugin.lightning import DCPCheckpointIO
from tests.lightning.helpers import TinyModule, loader, seed_all, trainer

PLUGINS = [
    pytest.param("thread", id="thread"),
    pytest.param("process", id="process", marks=pytest.mark.slow),
]


def _plugin(kind: str, save_rng: bool = True) -> Any:
    return None if kind == "default" else DCPCheckpointIO(async_mode=kind, save_rng=save_rng)


class ValModule(TinyModule):
    """Validates every epoch, so ``val_loss`` can be monitored."""

    def val_dataloader(self):
        return loader(shuffle=False)


class FailingModule(TinyModule):
    """Raises in the 6th training step."""

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        if self.global_step == 5:
            raise RuntimeError("boom")
        return super().training_step(batch, batch_idx)


def _observed(callback: ModelCheckpoint, root: str) -> dict[str, Any]:
    def rel(path: str) -> str:
        return os.path.relpath(path, root) if path else ""

    dirpath = callback.dirpath
    return {
        "names": sorted(os.listdir(dirpath)) if dirpath and os.path.isdir(dirpath) else [],
        "best_model_path": rel(callback.best_model_path),
        "last_model_path": rel(callback.last_model_path),
        "best_k_models": {rel(k): float(v) for k, v in callback.best_k_models.items()},
        "best_model_score": None if callback.best_model_score is None else float(callback.best_model_score),
    }


def _run(
    root: str,
    kind: str,
    make_callback: Callable[[str], ModelCheckpoint],
    *,
    max_epochs: int,
    module: type = TinyModule,
    save_rng: bool = True,
    **fit: Any,
) -> tuple[ModelCheckpoint, Any]:
    seed_all(0)
    callback = make_callback(os.path.join(root, "ckpts"))
    run = trainer(root, _plugin(kind, save_rng), max_epochs=max_epochs, callbacks=[callback])
    run.fit(module(), loader(), **fit)
    return callback, run


SCENARIOS: dict[str, tuple[Callable[[str], ModelCheckpoint], dict[str, Any]]] = {
    "top_k_by_metric": (
        lambda d: ModelCheckpoint(d, filename="{step}", monitor="train_loss", save_top_k=2, every_n_train_steps=1),
        {"max_epochs": 2},
    ),
    "keep_all_fixed_name_versioned": (
        lambda d: ModelCheckpoint(d, filename="fixed", monitor="train_loss", save_top_k=-1, every_n_epochs=1),
        {"max_epochs": 6},
    ),
    "every_n_train_steps": (
        lambda d: ModelCheckpoint(d, save_top_k=-1, every_n_train_steps=3),
        {"max_epochs": 3},
    ),
    "fixed_name_no_monitor_overwrites": (
        lambda d: ModelCheckpoint(d, filename="fixed", save_top_k=-1, every_n_epochs=1),
        {"max_epochs": 3},
    ),
    "every_n_epochs": (
        lambda d: ModelCheckpoint(d, save_top_k=-1, every_n_epochs=2),
        {"max_epochs": 4},
    ),
    "save_last_true": (
        lambda d: ModelCheckpoint(d, monitor="train_loss", save_top_k=1, every_n_train_steps=2, save_last=True),
        {"max_epochs": 2},
    ),
    "save_last_link": (
        lambda d: ModelCheckpoint(d, monitor="train_loss", save_top_k=2, every_n_train_steps=1, save_last="link"),
        {"max_epochs": 2},
    ),
    "fixed_name_top_1_overwrites": (
        lambda d: ModelCheckpoint(d, filename="best", monitor="train_loss", save_top_k=1, every_n_train_steps=1),
        {"max_epochs": 2},
    ),
    "no_version_counter_overwrites": (
        lambda d: ModelCheckpoint(d, filename="only", save_top_k=-1, every_n_epochs=1, enable_version_counter=False),
        {"max_epochs": 3},
    ),
    "val_metric_on_validation_end": (
        lambda d: ModelCheckpoint(d, monitor="val_loss", save_top_k=2, save_on_train_epoch_end=False, save_last=True),
        {"max_epochs": 3, "module": ValModule},
    ),
    "val_metric_on_train_epoch_end": (
        lambda d: ModelCheckpoint(d, monitor="val_loss", save_top_k=2, save_on_train_epoch_end=True),
        {"max_epochs": 3, "module": ValModule},
    ),
}


def _scenario(tmp_path, kind: str, name: str) -> dict[str, Any]:
    make_callback, options = SCENARIOS[name]
    root = str(tmp_path / kind)
    callback, _ = _run(root, kind, make_callback, **options)
    return _observed(callback, root)


@pytest.mark.parametrize("kind", PLUGINS)
@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_same_checkpoints_as_the_default_plugin(tmp_path, kind, name):
    expected = _scenario(tmp_path, "default", name)
    assert _scenario(tmp_path, kind, name) == expected


@pytest.mark.parametrize("kind", PLUGINS)
def test_save_on_exception_like_the_default_plugin(tmp_path, kind):
    def make(d: str) -> ModelCheckpoint:
        return ModelCheckpoint(d, save_on_exception=True, save_top_k=-1, every_n_train_steps=2, save_last=True)

    observed = {}
    for each in ("default", kind):
        root = str(tmp_path / each)
        callback = make(os.path.join(root, "ckpts"))
        seed_all(0)
        run = trainer(root, _plugin(each), max_epochs=3, callbacks=[callback])
        with pytest.raises(RuntimeError, match="boom"):
            run.fit(FailingModule(), loader())
        observed[each] = _observed(callback, root)
    assert observed[kind] == observed["default"]
    assert "epoch=1-step=5.ckpt" in observed[kind]["names"]


def _resumed(root: str, kind: str, ckpt_path: str) -> dict[str, Any]:
    """Train one epoch, then continue to two from ``ckpt_path``: "last" in a new Trainer, "best" in the same one.
    (The plugin's own RNG states are left out: Lightning's default checkpoint has none.)"""

    def make(d: str) -> ModelCheckpoint:
        return ModelCheckpoint(d, monitor="train_loss", save_top_k=2, every_n_train_steps=2, save_last=True)

    callback, run = _run(root, kind, make, max_epochs=1, save_rng=False)
    seed_all(7)
    module = TinyModule()
    if ckpt_path == "last":
        callback = make(os.path.join(root, "ckpts"))
        run = trainer(root, _plugin(kind, save_rng=False), max_epochs=2, callbacks=[callback])
    else:
        run.fit_loop.max_epochs = 2
    run.fit(module, loader(), ckpt_path=ckpt_path)
    return {
        "observed": _observed(callback, root),
        "resumed_from": module.extra_seen,
        "global_step": run.global_step,
        "weights": {k: v.clone() for k, v in module.state_dict().items()},
    }


@pytest.mark.parametrize("kind", PLUGINS)
@pytest.mark.parametrize("ckpt_path", ["last", "best"])
def test_resume_like_the_default_plugin(tmp_path, kind, ckpt_path):
    expected = _resumed(str(tmp_path / "default"), "default", ckpt_path)
    resumed = _resumed(str(tmp_path / kind), kind, ckpt_path)
    for key, value in expected["weights"].items():
        assert torch.equal(resumed["weights"][key], value), key
    assert {k: v for k, v in resumed.items() if k != "weights"} == {k: v for k, v in expected.items() if k != "weights"}


# -- wrapped in Lightning's AsyncCheckpointIO -----------------------------------------------------------------------
def _wrapped_run(root: str, io: Any) -> tuple[ModelCheckpoint, Any]:
    make_callback, options = SCENARIOS["keep_all_fixed_name_versioned"]  # fixed filename, save_top_k=-1, 6 epochs
    seed_all(0)
    callback = make_callback(os.path.join(root, "ckpts"))
    run = trainer(root, io, max_epochs=options["max_epochs"], callbacks=[callback])
    run.fit(TinyModule(), loader())
    return callback, run


@pytest.mark.parametrize("kind", PLUGINS)
def test_wrapped_in_async_checkpoint_io_keeps_what_the_default_plugin_keeps(tmp_path, kind):
    """``AsyncCheckpointIO(DCPCheckpointIO())``: the wrapper is removed (with a warning), so every checkpoint of the
    default plugin is kept, all committed when ``fit`` returns, with no thread left. Lightning's default plugin under
    the same wrapper loses some of them (names reused while a write is in flight): ours keep each of those too."""
    from lightning.pytorch.plugins.io import AsyncCheckpointIO

    expected = _scenario(tmp_path, "default", "keep_all_fixed_name_versioned")
    callback, _ = _wrapped_run(str(tmp_path / "default_wrapped"), AsyncCheckpointIO())
    wrapped_default = _observed(callback, str(tmp_path / "default_wrapped"))

    before = set(threading.enumerate())
    plugin = DCPCheckpointIO(async_mode=kind)
    root = str(tmp_path / kind)
    with pytest.warns(UserWarning, match=r"AsyncCheckpointIO\(DCPCheckpointIO\(\.\.\.\)\) is redundant"):
        callback, run = _wrapped_run(root, AsyncCheckpointIO(plugin))
    assert run.strategy.checkpoint_io is plugin and plugin.in_flight is None
    observed = _observed(callback, root)
    assert observed == expected and len(expected["names"]) == 6
    assert set(wrapped_default["names"]) <= set(observed["names"])
    if kind == "thread":
        assert set(threading.enumerate()) - before == set()
    loaded = [DCPCheckpointIO().load_checkpoint(os.path.join(root, "ckpts", n)) for n in observed["names"]]
    assert sorted(checkpoint["epoch"] for checkpoint in loaded) == list(range(6))


def test_wrapped_in_async_checkpoint_io_fit_raises_the_failed_last_write(tmp_path, monkeypatch):
    """The last write of ``fit`` fails in the background: ``fit`` raises it (the wrapper would have swallowed it)."""
    from lightning.pytorch.plugins.io import AsyncCheckpointIO

    from dcp_plugin import CheckpointSaveError
    from dcp_plugin.storage.commit import RenameCommit

    def commit(self, pending, manifest):
        raise OSError(5, "Input/output error (injected)")

    monkeypatch.setattr(RenameCommit, "commit", commit)
    callback = ModelCheckpoint(str(tmp_path / "ckpts"), filename="only", every_n_epochs=1)
    run = trainer(str(tmp_path), AsyncCheckpointIO(DCPCheckpointIO()), max_epochs=1, callbacks=[callback])
    with pytest.warns(UserWarning, match="redundant"), pytest.raises(CheckpointSaveError, match="only.ckpt"):
        run.fit(TinyModule(), loader())


# -- HPC (SLURM) save, SIGKILL in the middle of the next one, requeue -------------------------------------------------
HPC_SCRIPT = """
import os, sys
from tests.lightning.helpers import TinyModule, loader, seed_all, trainer
from dcp_plugin.lightning import DCPCheckpointIO

if __name__ == "__main__":
    root, kind, phase = sys.argv[1], sys.argv[2], sys.argv[3]
    os.environ["DCP_PLUGIN_CRASH_GROUP"] = str(os.getpgid(0))  # a new session: this process and its daemon
    seed_all(0)
    module = TinyModule()
    run = trainer(root, DCPCheckpointIO(async_mode=kind), max_epochs=phase.count("+"), enable_checkpointing=False)
    run.fit(module, loader(), ckpt_path=None if phase == "+" else "hpc")
    print("trained from", module.extra_seen and module.extra_seen["steps"], "to", run.global_step, flush=True)
    if phase != "+++":
        run.save_checkpoint(run._checkpoint_connector.hpc_save_path(root))  # what the SIGUSR1 handler does
        run.strategy.checkpoint_io.teardown()
"""


def _hpc_phase(tmp_path, kind: str, phase: str, crash: bool = False) -> subprocess.CompletedProcess:
    script = tmp_path / "hpc.py"
    script.write_text(HPC_SCRIPT)
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    if crash:
        env["DCP_PLUGIN_CRASH_AT"] = "save.written"
    command = [sys.executable, str(script), str(tmp_path / kind), kind, phase]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, start_new_session=True)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["thread", "process"])
def test_hpc_requeue_after_a_kill_mid_save(tmp_path, kind):
    first = _hpc_phase(tmp_path, kind, "+")
    assert first.returncode == 0, first.stderr[-3000:]
    killed = _hpc_phase(tmp_path, kind, "++", crash=True)  # requeued, trains on, killed while saving hpc_ckpt_2
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert "trained from 4 to 8" in killed.stdout
    names = sorted(n for n in os.listdir(tmp_path / kind) if n.startswith("hpc_ckpt_"))
    assert names == ["hpc_ckpt_1.ckpt"]  # the killed save left nothing beside the checkpoints
    resumed = _hpc_phase(tmp_path, kind, "+++")  # requeued again: resumes from the newest committed one
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "trained from 4 to 12" in resumed.stdout
