"""The Accelerate adapter in one process: ProjectConfiguration semantics, storage URLs, errors, export."""

from __future__ import annotations

import os

import fsspec
import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import ProjectConfiguration
from fsspec.implementations.memory import MemoryFileSystem

import dcp_plugin.accelerate as dpa
from dcp_plugin import CheckpointConfig, CheckpointNotFoundError, CheckpointSaveError, ConfigError
from tests.models import assert_same, make_training, snapshot, train_step


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    yield
    AcceleratorState._reset_state(True)
    PartialState._reset_state()


class Counter:
    """An object registered with accelerator.register_for_checkpointing."""

    def __init__(self) -> None:
        self.count = 0
        self.history: list[float] = []

    def state_dict(self) -> dict:
        return {"count": self.count, "history": list(self.history)}

    def load_state_dict(self, state: dict) -> None:
        self.count = state["count"]
        self.history = list(state["history"])


def prepared(accelerator: Accelerator, seed: int = 0):
    model, optimizer, scheduler = make_training(seed)
    counter = Counter()
    accelerator.register_for_checkpointing(counter)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    return model, optimizer, scheduler, counter


def train(model, optimizer, scheduler, counter, steps: int = 2) -> None:
    for _ in range(steps):
        counter.history.append(train_step(model, optimizer, scheduler))
        counter.count += 1


def _list(root: str) -> list[str]:
    from dcp_plugin.storage import CheckpointStorage

    return [info.name for info in CheckpointStorage(root).list()]


def auto_accelerator(project: str, total_limit: int | None = None) -> Accelerator:
    config = ProjectConfiguration(project_dir=project, automatic_checkpoint_naming=True, total_limit=total_limit)
    return Accelerator(cpu=True, project_config=config)


def test_total_limit_never_deletes_the_newest_committed_checkpoint_while_a_save_is_in_flight(tmp_path):
    accelerator = auto_accelerator(str(tmp_path), total_limit=1)
    dpa.enable(accelerator, environ={}, async_mode="thread")
    model, optimizer, scheduler, counter = prepared(accelerator)
    root = str(tmp_path / "checkpoints")
    accelerator.save_state()
    accelerator.wait_for_everyone()
    assert _list(root) == ["checkpoint_0"]
    train(model, optimizer, scheduler, counter)
    accelerator.save_state()
    # the new save may still be writing: the only committed checkpoint must still be there
    assert "checkpoint_0" in _list(root)
    accelerator.wait_for_everyone()
    assert _list(root) == ["checkpoint_1"]
    accelerator.end_training()


def test_resume_restores_everything_and_continues_naming_after_the_newest(tmp_path):
    accelerator = auto_accelerator(str(tmp_path), total_limit=3)
    dpa.enable(accelerator, environ={})
    model, optimizer, scheduler, counter = prepared(accelerator)
    train(model, optimizer, scheduler, counter)
    accelerator.step = 7
    expected = (
        snapshot(model, optimizer),
        scheduler.state_dict(),
        counter.state_dict(),
        torch.get_rng_state(),
    )
    assert accelerator.save_state() == str(tmp_path / "checkpoints" / "checkpoint_0")
    for _ in range(2):
        train(model, optimizer, scheduler, counter)
        accelerator.save_state()
    accelerator.end_training()
    torch.manual_seed(99)  # the load must restore the RNG

    AcceleratorState._reset_state(True)
    again = auto_accelerator(str(tmp_path), total_limit=3)
    dpa.enable(again, environ={})
    model, optimizer, scheduler, counter = prepared(again, seed=5)
    info = again.load_state(str(tmp_path / "checkpoints" / "checkpoint_0"))  # an older one, on purpose
    assert info.name == "checkpoint_0"
    assert_same(
        expected,
        (snapshot(model, optimizer), scheduler.state_dict(), counter.state_dict(), torch.get_rng_state()),
    )
    assert again.step == 7
    # numbering continues after the newest existing checkpoint, so nothing newer is overwritten
    assert again.project_configuration.iteration == 3
    assert again.save_state().endswith("checkpoint_3")
    again.wait_for_everyone()
    assert _list(str(tmp_path / "checkpoints")) == ["checkpoint_1", "checkpoint_2", "checkpoint_3"]
    # no argument: the latest committed checkpoint; leftovers of an interrupted write are ignored
    os.makedirs(tmp_path / "checkpoints" / "checkpoint_9")
    (tmp_path / "checkpoints" / "checkpoint_9" / ".metadata").write_bytes(b"partial")
    assert again.load_state().name == "checkpoint_3"
    again.end_training()


@pytest.mark.s3
def test_save_and_load_through_s3_with_automatic_naming_and_explicit_urls(s3_url):
    url, storage_options = s3_url
    accelerator = Accelerator(cpu=True)
    dpa.enable(accelerator, environ={}, directory=f"{url}/auto", keep_last=1, storage_options=storage_options)
    model, optimizer, scheduler, counter = prepared(accelerator)
    train(model, optimizer, scheduler, counter)
    saved = snapshot(model, optimizer)
    assert accelerator.save_state() == f"{url}/auto/checkpoint_0"
    accelerator.save_state(f"{url}/explicit/best")  # automatic naming comes from the directory only
    train(model, optimizer, scheduler, counter)
    # every save_state() counts an iteration, as in Accelerate
    assert accelerator.save_state() == f"{url}/auto/checkpoint_2"
    accelerator.wait_for_everyone()
    accelerator.load_state(f"{url}/explicit/best")
    assert_same(saved, snapshot(model, optimizer))
    fs = fsspec.filesystem("s3", **storage_options, skip_instance_cache=True)
    names = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(f"{url}/auto".removeprefix("s3://"), detail=False))
    assert [n for n in names if not n.startswith(".")] == ["checkpoint_2"]  # keep_last=1
    assert len(fs.ls(f"{url}/auto/.dcp-plugin/objects".removeprefix("s3://"))) == 1  # its data, nothing else
    accelerator.end_training()


def test_export_weights_writes_a_merged_safetensors_file(tmp_path):
    accelerator = Accelerator(cpu=True)
    dpa.enable(accelerator, environ={"DCP_PLUGIN_ASYNC_MODE": "sync"})
    model, optimizer, scheduler, counter = prepared(accelerator)
    train(model, optimizer, scheduler, counter)
    accelerator.save_state(str(tmp_path / "ckpt"))
    path = dpa.export_weights(str(tmp_path / "ckpt"), str(tmp_path / "merged"))
    from safetensors.torch import load_file

    assert_same({k: v.detach() for k, v in model.state_dict().items()}, load_file(path))
    with pytest.raises(KeyError, match="model_1"):
        dpa.export_weights(str(tmp_path / "ckpt"), str(tmp_path / "merged"), model_index=1)
    accelerator.end_training()


class FailingMemoryFileSystem(MemoryFileSystem):
    """memory:// whose checkpoint data files cannot be written (a full disk, a revoked credential...)."""

    protocol = "failmem"

    def _open(self, path, mode="rb", **kwargs):
        if "w" in mode and path.endswith(".distcp"):
            raise OSError(28, "No space left on device", path)
        return super()._open(path, mode, **kwargs)


# DCP's writer thread fails, as intended
@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_failed_background_write_surfaces_at_wait_for_everyone(tmp_path):
    fsspec.register_implementation("failmem", FailingMemoryFileSystem, clobber=True)
    accelerator = Accelerator(cpu=True)
    dpa.enable(accelerator, environ={}, async_mode="thread")
    prepared(accelerator)
    accelerator.save_state("failmem://run/ckpt")
    with pytest.raises(CheckpointSaveError, match="No space left on device"):
        accelerator.wait_for_everyone()
    with pytest.raises(CheckpointNotFoundError, match="not a committed checkpoint|No checkpoint"):
        accelerator.load_state("failmem://run/ckpt")
    accelerator.end_training()


def test_environment_switches_and_subclass(tmp_path):
    accelerator = Accelerator(cpu=True)
    assert dpa.enable(accelerator, environ={"DCP_PLUGIN_ENABLE": "0"}) is None
    assert "save_state" not in accelerator.__dict__  # Accelerate's own method stays
    checkpointer = dpa.enable(
        accelerator,
        environ={
            "DCP_PLUGIN_ASYNC_MODE": "sync",
            "DCP_PLUGIN_DIR": str(tmp_path / "c"),
            "DCP_PLUGIN_KEEP_LAST": "2",
        },
    )
    assert (checkpointer.config.async_mode, checkpointer.automatic_directory, checkpointer.keep_last) == (
        "sync",
        str(tmp_path / "c"),
        2,
    )
    with pytest.raises(RuntimeError, match="already enabled"):
        dpa.enable(accelerator, environ={})
    dpa.disable(accelerator)
    assert "save_state" not in accelerator.__dict__

    AcceleratorState._reset_state(True)
    sub = dpa.DCPAccelerator(
        cpu=True, dcp_config=CheckpointConfig(async_mode="sync"), dcp_directory=str(tmp_path / "s")
    )
    model, optimizer, scheduler, counter = prepared(sub)
    train(model, optimizer, scheduler, counter)
    before = snapshot(model, optimizer)
    sub.save_state()
    train(model, optimizer, scheduler, counter)
    sub.load_state()
    assert_same(before, snapshot(model, optimizer))
    sub.end_training()


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"DCP_PLUGIN_ASYNC_MODE": "fast"}, "DCP_PLUGIN_ASYNC_MODE='fast' is not supported"),
        ({"DCP_PLUGIN_KEEP_LAST": "0"}, "DCP_PLUGIN_KEEP_LAST='0' must be an integer >= 1"),
        ({"DCP_PLUGIN_KEEP_LAST": "three"}, "DCP_PLUGIN_KEEP_LAST='three' must be an integer"),
        ({"DCP_PLUGIN_ENABLE": "maybe"}, "DCP_PLUGIN_ENABLE='maybe'"),
        ({"DCP_PLUGIN_ASYNC_MOD": "thread"}, "Unknown environment variable DCP_PLUGIN_ASYNC_MOD"),
    ],
)
def test_bad_environment_values_are_rejected(environ, message):
    accelerator = Accelerator(cpu=True)
    with pytest.raises(ConfigError, match=message):
        dpa.enable(accelerator, environ=environ)
    assert "save_state" not in accelerator.__dict__


def test_unsupported_uses_get_clear_errors(tmp_path):
    accelerator = Accelerator(cpu=True)
    dpa.enable(accelerator, environ={}, async_mode="sync")
    prepared(accelerator)
    with pytest.raises(ValueError, match="save_state\\(\\) needs an output directory"):
        accelerator.save_state()
    with pytest.raises(ValueError, match="load_state\\(\\) needs an input directory"):
        accelerator.load_state()
    with pytest.raises(CheckpointNotFoundError, match="No checkpoint at .*missing.*save_state") as missing:
        accelerator.load_state(str(tmp_path / "missing"))
    assert "DCP_PLUGIN_ENABLE" not in str(missing.value)
    with pytest.raises(TypeError, match="DeepSpeed"):
        accelerator.save_state(str(tmp_path / "x"), tag="best")
    accelerator.end_training()
    with pytest.raises(RuntimeError, match="closed by end_training"):
        accelerator.save_state(str(tmp_path / "x"))


def test_the_first_load_state_of_a_fresh_run_says_what_is_wrong_and_how_to_guard_it(tmp_path):
    """Nothing saved yet: the error names the missing directory and the guard, not Accelerate's own saves; the
    guard works. Only a directory holding Accelerate's own checkpoints is blamed on them."""
    project = str(tmp_path / "run")
    accelerator = auto_accelerator(project)
    dpa.enable(accelerator, environ={}, async_mode="sync")
    prepared(accelerator)
    with pytest.raises(CheckpointNotFoundError) as fresh:
        accelerator.load_state()
    message = str(fresh.value)
    assert f"{project}/checkpoints does not exist yet" in message
    assert "checkpointer_of(accelerator).latest() is not None" in message and "Accelerate's own" not in message
    if dpa.checkpointer_of(accelerator).latest() is not None:  # the documented guard
        accelerator.load_state()
    Accelerator.save_state(accelerator)  # Accelerate's own save_state: checkpoints/checkpoint_0
    with pytest.raises(CheckpointNotFoundError, match=r"checkpoint_0 holds Accelerate's own checkpoint files"):
        accelerator.load_state()
    accelerator.end_training()


def test_committed_saves_reach_the_trackers_at_the_scripts_step(tmp_path, monkeypatch):
    """With a tracker (MLflow here), each committed save is logged through accelerator.log at the step of the
    script's latest accelerator.log call; DCP_PLUGIN_LOG_METRICS=0 turns it off."""
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"file:{tmp_path}/mlruns")

    def run(name: str, environ: dict) -> str:
        config = ProjectConfiguration(project_dir=str(tmp_path / name), automatic_checkpoint_naming=True)
        accelerator = Accelerator(cpu=True, log_with="mlflow", project_config=config)
        dpa.enable(accelerator, environ=environ, async_mode="thread")
        accelerator.init_trackers(name)
        objects = prepared(accelerator)
        for step in (10, 20):
            train(*objects)
            accelerator.log({"loss": 1.0}, step=step)
            accelerator.save_state()
            accelerator.wait_for_everyone()  # committed: logged at this step
        run_id = accelerator.get_tracker("mlflow").tracker.info.run_id
        accelerator.end_training()
        AcceleratorState._reset_state(True)
        PartialState._reset_state()
        return run_id

    client = MlflowClient()
    logged = run("logged", {})
    durable = client.get_metric_history(logged, "checkpoint/durable_s")
    assert [m.step for m in durable] == [10, 20] and all(m.value > 0 for m in durable)
    assert [m.value for m in client.get_metric_history(logged, "checkpoint/iteration")] == [0, 1]
    assert all(m.value > 0 for m in client.get_metric_history(logged, "checkpoint/bytes"))
    quiet = run("quiet", {"DCP_PLUGIN_LOG_METRICS": "0"})
    assert set(client.get_run(quiet).data.metrics) == {"loss"}
