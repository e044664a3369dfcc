"""CheckpointEngine on its own: one save in flight, background errors, bounded stats, scoped warnings."""

from __future__ import annotations

import threading
import time
import warnings

import pytest
import torch
from torch.distributed.checkpoint import FileSystemWriter

from dcp_plugin import CheckpointConfig, CheckpointSaveError, SaveStats
from dcp_plugin.engine import checkpoint_engine as engine_module
from dcp_plugin.engine.checkpoint_engine import CheckpointEngine
from dcp_plugin.engine.staging import stagers


class ScriptedWriter(FileSystemWriter):
    """A DCP writer whose data writes wait for ``gate`` (if given), then run ``before_write``, then fail
    with ``error`` (if given) or write normally."""

    def __init__(self, path, *, gate=None, before_write=None, error=None):
        super().__init__(path, single_file_per_rank=True, sync_files=False, thread_count=1)
        self.gate, self.before_write, self.error = gate, before_write, error

    def write_data(self, plan, planner):
        if self.gate is not None:
            assert self.gate.wait(60), "the test never opened the gate"
        if self.before_write is not None:
            self.before_write()
        if self.error is not None:
            raise self.error
        return super().write_data(plan, planner)


def start(engine, path, writer, on_failure=None) -> SaveStats:
    stats = SaveStats(name=str(path), url=str(path), step=1, mode=engine.config.async_mode, blocking_s=0.0)
    return engine.save({"w": torch.ones(8)}, writer, stats=stats, started=time.perf_counter(), on_failure=on_failure)


def test_the_next_save_starts_writing_only_after_the_first_committed(tmp_path):
    engine = CheckpointEngine(CheckpointConfig(async_mode="thread"), distributed=False)
    gate = threading.Event()
    first = start(engine, tmp_path / "a", ScriptedWriter(str(tmp_path / "a"), gate=gate))
    assert engine.in_flight is first
    seen = {}
    second_writer = ScriptedWriter(str(tmp_path / "b"), before_write=lambda: seen.setdefault("first", first.durable_s))
    second = threading.Thread(target=start, args=(engine, tmp_path / "b", second_writer))
    second.start()
    gate.set()  # only now can the first write finish; the second save waited for it before it started
    second.join(60)
    engine.close()
    assert seen["first"] is not None  # the first save was committed when the second one began writing
    assert first.bytes_written and first.error is None


def test_a_background_write_error_reaches_the_next_call_with_the_path_and_cause(tmp_path):
    engine = CheckpointEngine(CheckpointConfig(async_mode="thread"), distributed=False)
    cleaned = threading.Event()
    url = tmp_path / "broken"
    stats = start(engine, url, ScriptedWriter(str(url), error=OSError(28, "disk full (test)")), cleaned.set)
    with pytest.raises(CheckpointSaveError, match=r"broken.*disk full \(test\)") as excinfo:
        engine.wait()
    assert excinfo.value.__cause__ is not None
    assert cleaned.is_set() and stats.error and "disk full" in stats.error
    assert engine.drain_completed() == [stats]
    engine.wait()  # raised once, not again
    engine.close()


def test_a_sync_save_blocks_until_durable_and_reports_bytes(tmp_path):
    engine = CheckpointEngine(CheckpointConfig(async_mode="sync"), distributed=False)
    stats = start(engine, tmp_path / "a", ScriptedWriter(str(tmp_path / "a")))
    assert engine.in_flight is None
    assert stats.durable_s == stats.blocking_s and stats.bytes_written >= 8 * 4
    engine.close()


def test_finished_stats_are_bounded(tmp_path, monkeypatch):
    monkeypatch.setattr(engine_module, "COMPLETED_LIMIT", 2)
    engine = CheckpointEngine(CheckpointConfig(async_mode="sync"), distributed=False)
    saved = [start(engine, tmp_path / str(i), ScriptedWriter(str(tmp_path / str(i)))) for i in range(3)]
    assert engine.drain_completed() == saved[1:]
    assert engine.drain_completed() == []
    engine.close()


def test_a_closed_engine_refuses_work(tmp_path):
    engine = CheckpointEngine(CheckpointConfig(async_mode="sync"), distributed=False)
    engine.close()
    with pytest.raises(RuntimeError, match="closed"):
        start(engine, tmp_path / "a", ScriptedWriter(str(tmp_path / "a")))


def test_importing_the_package_installs_no_global_warning_filter():
    import subprocess
    import sys

    probe = (
        "import warnings, dcp_plugin, dcp_plugin.engine.checkpoint_engine\n"
        "print(sum(m is not None and 'torch.distributed' in m.pattern for _, m, *_ in warnings.filters))"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True)
    assert result.stdout.strip() == "0"


def test_single_process_saves_do_not_warn_about_single_process_intent(tmp_path):
    engine = CheckpointEngine(CheckpointConfig(async_mode="sync"), distributed=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        start(engine, tmp_path / "a", ScriptedWriter(str(tmp_path / "a")))
    engine.close()
    assert not [w for w in caught if "torch.distributed is disabled" in str(w.message)]


def test_saves_keep_working_where_torch_tears_the_stager_down_after_each_stage(tmp_path, monkeypatch):
    """torch 2.11 (seen on a CUDA host) closes the state-dict stager at the end of every stage, so a reused
    stager fails the second save with ``KeyError: <class 'type'>``. That release cannot run here, so its
    stage is reproduced: the engine must notice and stage each save with a fresh stager."""
    from torch.distributed.checkpoint.staging import DefaultStager

    original = DefaultStager._stage

    def stage_then_tear_down(self, state_dict, **kwargs):
        staged = original(self, state_dict, **kwargs)
        self._state_dict_stager.close()
        return staged

    monkeypatch.setattr(DefaultStager, "_stage", stage_then_tear_down)
    stagers.stager_survives_reuse.cache_clear()
    monkeypatch.setattr(stagers, "stager_survives_reuse", stagers.stager_survives_reuse.__wrapped__)
    assert not stagers.stager_survives_reuse()
    engine = CheckpointEngine(CheckpointConfig(async_mode="thread", reuse_buffers=True))
    try:
        for step in range(3):
            start(engine, tmp_path / f"s{step}", FileSystemWriter(str(tmp_path / f"s{step}"), sync_files=False))
            engine.wait()
    finally:
        engine.close()
