"""Two jobs pointed at one directory save the same step with overwrite=False: exactly one commits."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from dcp_plugin import CheckpointExistsError, CheckpointManager
from dcp_plugin.storage import CheckpointStorage

SCRIPT = os.path.join(os.path.dirname(__file__), "scripts", "race_writer.py")
TRIALS = 20


def race(url: str, options: dict, tmp_path) -> dict[str, list[str]]:
    sync_dir = tmp_path / "sync"
    sync_dir.mkdir()
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    procs = {
        writer: subprocess.Popen(
            [sys.executable, SCRIPT, url, json.dumps(options), str(sync_dir), writer, str(TRIALS)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for writer in ("a", "b")
    }
    outcomes = {}
    for writer, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
        outcomes[writer] = [json.loads(line)["outcome"] for line in out.splitlines()]
    return outcomes


def check(outcomes: dict[str, list[str]], url: str, options: dict) -> None:
    with CheckpointManager(url, async_mode="sync", storage_options=options) as manager:
        for trial in range(TRIALS):
            results = [outcomes["a"][trial], outcomes["b"][trial]]
            assert results.count("committed") == 1, f"trial {trial}: {results}"
            loser = next(r for r in results if r != "committed")
            assert "CheckpointExistsError" in loser or "already exists" in loser or "was committed" in loser, loser
            winner = "a" if results[0] == "committed" else "b"
            state = {"model": torch.nn.Linear(64, 64), "writer": None}
            manager.load(state, step=trial)
            assert state["writer"] == winner, f"trial {trial}: the committed checkpoint is not the winner's"
            assert torch.all(state["model"].weight == (1.0 if winner == "a" else 2.0))
        assert manager.storage.incomplete() == []


@pytest.mark.slow
def test_two_processes_same_step_local(tmp_path):
    url = str(tmp_path / "ckpts")
    check(race(url, {}, tmp_path), url, {})


@pytest.mark.slow
@pytest.mark.s3
def test_two_processes_same_step_s3(tmp_path, s3_url):
    url, options = s3_url
    check(race(url, options, tmp_path), url, options)


@pytest.mark.parametrize("backend", ["local", "memory", "s3"])
def test_no_replace_is_enforced_at_commit_time(backend, tmp_path, request):
    """Both writes began before either committed (so the early check passed for both): the second commit fails
    and leaves the first checkpoint untouched."""
    if backend == "local":
        url, options = str(tmp_path / "ckpts"), {}
    elif backend == "memory":
        url, options = request.getfixturevalue("memory_url"), {}
    else:
        url, options = request.getfixturevalue("s3_url")
    storage = CheckpointStorage(url, options)
    first = storage.begin_write("step_000000001")
    second = storage.begin_write("step_000000001")
    for pending, payload in ((first, b"first"), (second, b"second")):
        storage.fs.pipe_file(f"{pending.directory}/.metadata", payload)
    manifest = {"step": 1, "created": 1.0, "save_id": "x", "files": {}}
    storage.strategy.commit(first, {**manifest, "name": "step_000000001"})
    with pytest.raises(CheckpointExistsError, match="step_000000001"):
        storage.strategy.commit(second, {**manifest, "name": "step_000000001"})
    info = storage.info("step_000000001")
    assert storage.fs.cat_file(f"{storage.data_path(info)}/.metadata") == b"first"
    assert storage.incomplete() == []
