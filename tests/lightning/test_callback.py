"""DCPCheckpoint with a real Trainer: triggers, preemption of real processes, retention, resume, telemetry."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader

from dcp_plugin import CheckpointManager
from dcp_plugin.lightning import DCPCheckpoint, DCPCheckpointIO
from tests.lightning.helpers import TinyModule, dataset, loader, seed_all, trainer
from tests.multiproc import free_port, rank_env, run_ranks

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class AdvanceClock(pl.Callback):
    """Moves the injected clock 10 s per training batch, on rank 0 only (other ranks' clocks stand still)."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_rank == 0:
            self.clock.now += 10


class SignalAt(pl.Callback):
    """Sends ``signum`` to this process after global step ``step`` on rank ``rank``."""

    def __init__(self, step: int, signum: int, rank: int = 0) -> None:
        self.step, self.signum, self.rank = step, signum, rank

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_step == self.step and trainer.global_rank == self.rank:
            os.kill(os.getpid(), self.signum)


class ScoreModule(TinyModule):
    """Logs a predetermined ``score`` at each step (for best-K)."""

    SCORES = [0.5, 0.2, 0.9, 0.1, 0.7, 0.8, 0.3, 0.6]

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        self.log("score", self.SCORES[self.global_step % len(self.SCORES)])
        return super().training_step(batch, batch_idx)


def saved_steps(directory: str) -> dict[int, list[str]]:
    return {info.step: info.metadata.get("reasons", []) for info in CheckpointManager(directory).list()}


# -- triggers --------------------------------------------------------------------------------------
EXPECTED = {
    4: ["every_n_seconds"],  # timer starts at step 1; 30 s at step 4
    6: ["every_n_steps"],
    8: ["epoch_end"],  # end of the 2nd epoch (4 steps per epoch)
    11: ["every_n_seconds"],
    12: ["every_n_steps"],
}


def _fit_with_triggers(root: str, world_size: int = 1) -> dict[int, list[str]]:
    from lightning.pytorch.strategies import DDPStrategy

    clock = FakeClock()
    ckpts = os.path.join(root, "ckpts")
    callback = DCPCheckpoint(
        ckpts, every_n_train_steps=6, every_n_seconds=25, every_n_epochs=2, clock=clock, auto_resume=False
    )
    seed_all(0)
    fit = trainer(
        root,
        DCPCheckpointIO(async_mode="thread"),
        max_epochs=3,
        callbacks=[AdvanceClock(clock), callback],
        strategy=DDPStrategy() if world_size > 1 else "auto",
        devices=world_size,
        limit_train_batches=4,
    )
    fit.fit(TinyModule(), DataLoader(dataset(n=16 * world_size), batch_size=4))
    return saved_steps(ckpts) if fit.is_global_zero else {}


def test_each_trigger_fires_when_it_should(tmp_path):
    assert _fit_with_triggers(str(tmp_path)) == EXPECTED


def _ddp_triggers(rank: int, world_size: int, root: str) -> dict[int, list[str]]:
    return _fit_with_triggers(root, world_size)


@pytest.mark.slow
def test_each_trigger_fires_together_on_two_ranks(tmp_path):
    # only rank 0's clock moves: both ranks still save the same steps (rank 0 reports what was committed)
    results = run_ranks(_ddp_triggers, str(tmp_path), world_size=2)
    assert results[0] == EXPECTED


def test_signal_in_process_saves_that_step_and_stops(tmp_path):
    ckpts = str(tmp_path / "ckpts")
    callback = DCPCheckpoint(ckpts, every_n_train_steps=100, signals=(signal.SIGUSR1,), auto_resume=False)
    fit = trainer(str(tmp_path), DCPCheckpointIO(), max_epochs=5, callbacks=[SignalAt(6, signal.SIGUSR1), callback])
    fit.fit(TinyModule(), loader())
    assert fit.global_step == 6
    assert saved_steps(ckpts) == {6: ["preemption"]}
    assert signal.getsignal(signal.SIGUSR1) is not callback.save_policy.leaves()[-1]._handle


def test_save_on_exception_single_process(tmp_path):
    class Boom(pl.Callback):
        def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
            if trainer.global_step == 3:
                raise RuntimeError("boom")

    ckpts = str(tmp_path / "ckpts")
    callback = DCPCheckpoint(ckpts, every_n_train_steps=100, save_on_exception=True, auto_resume=False)
    with pytest.raises(RuntimeError, match="boom"):
        trainer(str(tmp_path), DCPCheckpointIO(), max_epochs=5, callbacks=[Boom(), callback]).fit(
            TinyModule(), loader()
        )
    assert saved_steps(ckpts) == {3: ["exception"]}


def test_needs_the_dcp_plugin(tmp_path):
    with pytest.raises(TypeError, match="DCPCheckpointIO"):
        trainer(str(tmp_path), None, max_epochs=1, callbacks=[DCPCheckpoint(str(tmp_path))]).fit(TinyModule(), loader())


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"every_n_train_steps": 0}, "positive integer"),
        ({"every_n_seconds": -1}, "positive number"),
        ({"keep_best": 2}, "monitor"),
        ({"monitor": "loss"}, "keep_best"),
        ({"keep_best": 1, "monitor": "loss", "mode": "avg"}, "'min' or 'max'"),
        ({"export_dtype": torch.bfloat16}, "export_final=True"),
        ({"export_final": True, "export_dtype": torch.int8}, "floating-point"),
        ({"save_on_signal": "yes"}, "True or False"),
    ],
)
def test_bad_arguments_say_what_is_wrong(kwargs, message):
    with pytest.raises((ValueError, TypeError), match=message):
        DCPCheckpoint("ckpts", **kwargs)


# -- retention -------------------------------------------------------------------------------------
@pytest.mark.parametrize("keep", [1, 2, 3])
def test_keep_last_with_async_writes(tmp_path, keep):
    ckpts = str(tmp_path / "ckpts")
    callback = DCPCheckpoint(ckpts, every_n_train_steps=1, keep_last=keep, auto_resume=False)
    trainer(str(tmp_path), DCPCheckpointIO(async_mode="thread"), max_epochs=2, callbacks=[callback]).fit(
        TinyModule(), loader()
    )
    assert sorted(saved_steps(ckpts)) == list(range(9 - keep, 9))


def test_another_runs_checkpoints_are_untouched(tmp_path):
    ckpts = str(tmp_path / "ckpts")
    with CheckpointManager(ckpts, run_id="someone-else", async_mode="sync") as other:
        other.save(1, {"x": torch.zeros(2)})
        other.save(50, {"x": torch.ones(2)})
    callback = DCPCheckpoint(ckpts, every_n_train_steps=1, keep_last=1, auto_resume=False)
    trainer(str(tmp_path), DCPCheckpointIO(), max_epochs=2, callbacks=[callback]).fit(TinyModule(), loader())
    runs = {info.step: info.manifest["run_id"] for info in CheckpointManager(ckpts).list()}
    assert runs == {1: "someone-else", 8: callback.run_id, 50: "someone-else"}


@pytest.mark.parametrize("mode, expected", [("min", [2, 4, 8]), ("max", [3, 6, 8])])
def test_best_k_by_a_logged_metric(tmp_path, mode, expected):
    # steps 1..8 log SCORES[step - 1]: 0.5 0.2 0.9 0.1 0.7 0.8 0.3 0.6 (the newest, 8, always stays)
    ckpts = str(tmp_path / "ckpts")
    callback = DCPCheckpoint(
        ckpts,
        every_n_train_steps=1,
        keep_best=2,
        monitor="score",
        mode=mode,
        auto_resume=False,
        save_last=False,
    )
    trainer(str(tmp_path), DCPCheckpointIO(), max_epochs=2, callbacks=[callback]).fit(ScoreModule(), loader())
    assert sorted(saved_steps(ckpts)) == expected
    best = {"min": 4, "max": 3}[mode]  # 0.1 is the lowest score, 0.9 the highest
    assert callback.best_model_path.endswith(f"step_{best:09d}")


# -- resume ----------------------------------------------------------------------------------------
def test_auto_resume_and_ckpt_path_last(tmp_path):
    ckpts = str(tmp_path / "ckpts")

    def run(max_epochs: int, **fit_kwargs: Any) -> pl.Trainer:
        callback = DCPCheckpoint(ckpts, every_n_train_steps=2, keep_last=2)
        fit = trainer(str(tmp_path), DCPCheckpointIO(), max_epochs=max_epochs, callbacks=[callback])
        fit.fit(TinyModule(), loader(), **fit_kwargs)
        return fit

    first = run(1)
    assert first.global_step == 4
    run_id = first.checkpoint_callback.run_id
    second = run(2)  # nothing passed: resumes from step 4
    assert second.ckpt_path.endswith("step_000000004")
    assert second.global_step == 8
    assert second.checkpoint_callback.run_id == run_id  # the resumed run keeps managing its checkpoints
    with pytest.warns(UserWarning, match="no last checkpoint"):
        third = run(3, ckpt_path="last")
    # (Lightning itself replays one epoch after resuming from the last batch of a resumed run; not checked)
    assert third.ckpt_path.endswith("step_000000008") and third.global_step > 8
    assert sorted(saved_steps(ckpts)) == [third.global_step - 2, third.global_step]


def test_export_final_model_only_in_bf16(tmp_path):
    ckpts = str(tmp_path / "ckpts")
    callback = DCPCheckpoint(ckpts, every_n_epochs=1, export_final=True, export_dtype=torch.bfloat16, auto_resume=False)
    plugin = DCPCheckpointIO()
    module = TinyModule()
    trainer(str(tmp_path), plugin, max_epochs=1, callbacks=[callback]).fit(module, loader())
    exported = plugin.load_checkpoint(os.path.join(ckpts, "export", "step_000000004"))
    assert "optimizer_states" not in exported and exported["hyper_parameters"]["lr"] == 0.05
    for key, value in module.state_dict().items():
        assert exported["state_dict"][key].dtype == torch.bfloat16
        assert torch.equal(exported["state_dict"][key], value.to(torch.bfloat16))
    # the export is not a resume candidate
    assert callback.latest_checkpoint().url == os.path.join(ckpts, "step_000000004")


# -- telemetry -------------------------------------------------------------------------------------
def test_metrics_reach_a_csv_logger(tmp_path, caplog):
    ckpts = str(tmp_path / "ckpts")
    callback = DCPCheckpoint(ckpts, every_n_train_steps=2, auto_resume=False)
    logger = CSVLogger(str(tmp_path), name="logs")
    fit = pl.Trainer(
        default_root_dir=str(tmp_path),
        accelerator="cpu",
        max_epochs=2,
        plugins=[DCPCheckpointIO(async_mode="thread")],
        callbacks=[callback],
        logger=logger,
        log_every_n_steps=1,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    with caplog.at_level("INFO"):
        fit.fit(TinyModule(), loader())
    with open(os.path.join(logger.log_dir, "metrics.csv")) as handle:
        rows = list(csv.DictReader(handle))
    logged = [row for row in rows if row.get("checkpoint/blocking_s")]
    assert sorted(int(row["step"]) for row in logged) == [2, 4, 6, 8]
    for row in logged:
        assert float(row["checkpoint/blocking_s"]) > 0
        assert float(row["checkpoint/durable_s"]) > 0
        assert float(row["checkpoint/bytes"]) > 0
        assert float(row["checkpoint/throughput_mib_s"]) > 0
    assert len(callback.history) == 4
    assert "DCPCheckpoint: 4 checkpoint(s)" in callback.summary()


# -- preemption of real processes ----------------------------------------------------------------------
def _launch(directory: str, world_size: int, *args: str) -> list[subprocess.Popen]:
    port = free_port()
    processes = []
    for rank in range(world_size):
        env = dict(os.environ, PYTHONPATH=ROOT)
        if world_size > 1:
            env.update(rank_env(rank, world_size, port))
        processes.append(
            subprocess.Popen(
                [sys.executable, "-m", "tests.lightning.preempt_fit", directory, *args],
                cwd=ROOT,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    return processes


def _finish(processes: list[subprocess.Popen]) -> str:
    outputs = []
    try:
        for process in processes:
            out, err = process.communicate(timeout=240)
            assert process.returncode == 0, err[-3000:]
            outputs.append(out)
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
    return outputs[0]


@pytest.mark.slow
@pytest.mark.parametrize("world_size", [1, 2])
def test_sigterm_to_real_training_processes_then_exact_resume(tmp_path, world_size):
    run_dir, ref_dir = str(tmp_path / "run"), str(tmp_path / "reference")
    processes = _launch(run_dir, world_size, "--max-steps", "100000", "--pace", "0.05")
    try:
        for line in processes[0].stdout:
            if line.startswith("step ") and int(line.split()[1]) >= 3:
                for process in processes:  # a scheduler signals every process of the job
                    process.send_signal(signal.SIGTERM)
                break
    except BaseException:
        for process in processes:
            process.kill()
        raise
    out = _finish(processes)
    stopped = int(next(line for line in out.splitlines() if line.startswith("stopped")).split()[1])
    latest = CheckpointManager(run_dir).latest()
    assert latest is not None and latest.step == stopped
    assert latest.metadata["reasons"] == ["preemption"]

    target = stopped + 3
    final_resumed, final_reference = str(tmp_path / "resumed.pt"), str(tmp_path / "reference.pt")
    _finish(_launch(run_dir, world_size, "--max-steps", str(target), "--final", final_resumed))
    _finish(_launch(ref_dir, world_size, "--max-steps", str(target), "--final", final_reference))
    resumed, reference = torch.load(final_resumed), torch.load(final_reference)
    for key in reference:
        assert torch.equal(resumed[key], reference[key]), key
