"""Exact resume through ``accelerator.save_state`` / ``load_state`` in fresh processes, on 1 and 2
ranks, across world sizes, with options coming only from DCP_PLUGIN_* variables."""

from __future__ import annotations

import json
import os

import pytest

from tests.accelerate.launch import launch, records
from tests.models import assert_same

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

MATCHED = ("model", "optimizer", "scheduler", "torch_rng", "python_rng", "numpy_rng", "step", "epoch")
# the data loader's shuffling generator exists only on several processes
# (one process shuffles with torch's RNG)
SAME_WORLD = (*MATCHED, "shuffle_generator")


def same_state(a: dict, b: dict, keys=MATCHED) -> None:
    for key in keys:
        assert_same(a[key], b[key], key)


def committed(project: str) -> list[str]:
    root = os.path.join(project, "checkpoints")
    return sorted(n for n in os.listdir(root) if os.path.exists(os.path.join(root, n, "dcp_plugin.json")))


@pytest.fixture(scope="module")
def first_runs(tmp_path_factory):
    """A 1-process (thread mode) and a 2-process (process mode) run of 4 epochs, saving after epochs 1-3."""
    base = tmp_path_factory.mktemp("accelerate_runs")
    one = {"project": str(base / "one"), "record": str(base / "one_rec")}
    two = {"project": str(base / "two"), "record": str(base / "two_rec")}
    launch(
        [
            "train",
            "--project",
            one["project"],
            "--epochs",
            "4",
            "--save-epochs",
            "1,2,3",
            "--record",
            one["record"],
            "--total-limit",
            "2",
        ],
        env={"DCP_PLUGIN_ASYNC_MODE": "thread"},
    )
    launch(
        [
            "train",
            "--project",
            two["project"],
            "--epochs",
            "4",
            "--save-epochs",
            "1,2,3",
            "--record",
            two["record"],
        ],
        nproc=2,
        env={"DCP_PLUGIN_ASYNC_MODE": "process", "DCP_PLUGIN_THREAD_COUNT": "1", "DCP_PLUGIN_KEEP_LAST": "2"},
    )
    return base, one, two


def test_environment_reaches_every_rank_and_selects_the_mode(first_runs):
    _, one, two = first_runs
    for rank, final in enumerate(records(two["record"], "final", 2)):
        assert (final["rank"], final["async_mode"], final["thread_count"], final["keep_last"]) == (
            rank,
            "process",
            1,
            2,
        )
    with open(os.path.join(two["project"], "checkpoints", "checkpoint_2", "dcp_plugin.json")) as handle:
        manifest = json.load(handle)
    assert manifest["mode"] == "process" and manifest["world_size"] == 2
    assert records(one["record"], "final", 1)[0]["async_mode"] == "thread"
    # keep_last / total_limit = 2: the oldest of three saves is gone, the two newest are committed
    assert committed(one["project"]) == committed(two["project"]) == ["checkpoint_1", "checkpoint_2"]


def test_one_process_resume_matches_uninterrupted_run_and_loads_two_process_checkpoint(first_runs):
    base, one, two = first_runs
    resumed = str(base / "one_resumed")
    launch(
        [
            "resume",
            "--project",
            one["project"],
            "--epochs",
            "4",
            "--save-epochs",
            "4",
            "--record",
            resumed,
            "--total-limit",
            "2",
            "--check-load",
            os.path.join(two["project"], "checkpoints", "checkpoint_1"),
            "--check-tag",
            "from2",
        ],
        env={"DCP_PLUGIN_ASYNC_MODE": "thread"},
    )
    # load_state() took the latest committed checkpoint (after epoch 3), exactly as it was saved
    loaded = records(resumed, "loaded", 1)[0]
    same_state(records(one["record"], "save3", 1)[0], loaded, SAME_WORLD)
    assert loaded["iteration"] == 3  # automatic naming continues after the resume
    # training on from there reproduces the uninterrupted run bit for bit
    same_state(records(one["record"], "final", 1)[0], records(resumed, "final", 1)[0], SAME_WORLD)
    # the resumed run saved checkpoint_3 and total_limit=2 removed checkpoint_1, never the newest
    assert committed(one["project"]) == ["checkpoint_2", "checkpoint_3"]
    # a checkpoint written by 2 processes loads on 1: rank 0's state, resharded
    from2 = records(resumed, "from2", 1)[0]
    same_state(records(two["record"], "save2", 2)[0], from2)


def test_two_process_resume_matches_uninterrupted_run_and_loads_one_process_checkpoint(first_runs):
    base, one, two = first_runs
    resumed = str(base / "two_resumed")
    launch(
        [
            "resume",
            "--project",
            two["project"],
            "--epochs",
            "4",
            "--record",
            resumed,
            "--check-load",
            os.path.join(one["project"], "checkpoints", "checkpoint_2"),
            "--check-tag",
            "from1",
        ],
        nproc=2,
        env={"DCP_PLUGIN_ASYNC_MODE": "thread", "DCP_PLUGIN_KEEP_LAST": "2"},
    )
    saved = records(two["record"], "save3", 2)
    for rank in range(2):
        same_state(saved[rank], records(resumed, "loaded", 2)[rank], SAME_WORLD)
        same_state(records(two["record"], "final", 2)[rank], records(resumed, "final", 2)[rank], SAME_WORLD)
    # a 1-process checkpoint loads on 2 processes: every rank gets the full state, the extra rank
    # takes rank 0's random generators
    single = records(one["record"], "save3", 1)[0]
    for state in records(resumed, "from1", 2):
        same_state(single, state)
