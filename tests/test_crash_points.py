"""SIGKILL at every step of save, replace, delete and retention (thread and process mode, local disk and S3).

After each crash: the newest committed checkpoint is listed under its real name and loads exactly; nothing
partial is listed; ``purge`` removes only uncommitted data; the next save succeeds.
"""

from __future__ import annotations

import os

import pytest
import torch

from dcp_plugin import CheckpointManager
from tests.crashes import run_until_killed
from tests.scripts.crash_at import VALUES, model_with

SCRIPT = os.path.join(os.path.dirname(__file__), "scripts", "crash_at.py")

# (scenario, crash point) -> {step: value of the checkpoint listed under that step afterwards}
OLD = {1: VALUES["step1"]}
OUTCOMES = {
    ("save", "save.begun"): OLD,
    ("save", "save.written"): OLD,
    ("save", "save.sealed"): OLD,
    ("save", "save.committed"): {1: VALUES["step1"], 2: VALUES["step2"]},
    ("replace", "save.begun"): OLD,
    ("replace", "save.written"): OLD,
    ("replace", "save.sealed"): OLD,
    ("replace", "save.committed"): {1: VALUES["step1_replacement"]},
    ("delete", "delete.hidden"): {2: VALUES["step2"]},
    ("retention", "delete.hidden"): {2: VALUES["step2"]},
}
TWO = {1: VALUES["step1"], 2: VALUES["step2"]}
REPEAT = {  # a save that repeats the structure of the one before, written without DCP (thread mode)
    ("repeat", "save.begun"): TWO,
    ("repeat", "save.written"): TWO,
    ("repeat", "save.sealed"): TWO,
    ("repeat", "save.committed"): {**TWO, 3: VALUES["step3"]},
}
LOCAL_ONLY = {("replace_two_step", "replace.old_moved"): OLD, ("replace_two_step", "save.committed"): {1: 11.0}}


def crash(scenario: str, mode: str, url: str, options: dict, point: str, tmp_path) -> None:
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    if scenario == "replace_two_step":
        scenario, env["CRASH_TEST_NO_EXCHANGE"] = "replace", "1"
    run_until_killed(SCRIPT, scenario, mode, url, options, point, tmp_path, env=env)


def check_after_crash(url: str, options: dict, expected: dict[int, float]) -> None:
    with CheckpointManager(url, async_mode="sync", storage_options=options) as manager:
        infos = manager.list()
        assert [i.name for i in infos] == [f"step_{s:09d}" for s in sorted(expected)], "only real names are listed"
        assert manager.steps == sorted(expected)
        for step, value in expected.items():
            model = model_with(-1.0)
            manager.load({"model": model}, step=step)
            assert torch.equal(model.weight, torch.full((8, 8), value)), f"step {step} does not load exactly"
        assert all(not manager.storage.verify(info) for info in infos)

        removed = manager.storage.purge()
        assert manager.steps == sorted(expected), f"purge removed committed data ({removed})"
        assert manager.storage.incomplete() == []
        newest = max(expected)
        model = model_with(-1.0)
        manager.load({"model": model})
        assert torch.equal(model.weight, torch.full((8, 8), expected[newest]))

        manager.save(10, {"model": model_with(10.0)})
        assert manager.steps == [*sorted(expected), 10]


IN_THE_CALLER = ("delete", "retention")  # they run in the calling process whatever the mode: one mode is enough


def _cases(table: dict, modes: tuple[str, ...], only_first: tuple[str, ...] = IN_THE_CALLER) -> list:
    return [
        pytest.param(s, p, m, id=f"{s}-{p}-{m}")
        for (s, p) in table
        for m in modes
        if s not in only_first or m == modes[0]
    ]


@pytest.mark.slow
@pytest.mark.parametrize("scenario, point, mode", _cases({**OUTCOMES, **LOCAL_ONLY}, ("thread", "process")))
def test_crash_point_on_local_disk(scenario, point, mode, tmp_path):
    url = str(tmp_path / "ckpts")
    crash(scenario, mode, url, {}, point, tmp_path)
    check_after_crash(url, {}, {**OUTCOMES, **LOCAL_ONLY}[(scenario, point)])


@pytest.mark.slow
@pytest.mark.parametrize("scenario, point, mode", _cases(REPEAT, ("thread", "sync")))
def test_crash_point_of_a_save_written_without_dcp(scenario, point, mode, tmp_path):
    url = str(tmp_path / "ckpts")
    crash(scenario, mode, url, {}, point, tmp_path)
    check_after_crash(url, {}, REPEAT[(scenario, point)])


@pytest.mark.slow
@pytest.mark.s3
@pytest.mark.parametrize(
    "scenario, point, mode",
    _cases(OUTCOMES, ("thread", "process"), (*IN_THE_CALLER, "replace")) + _cases(REPEAT, ("thread",)),
)  # process mode: its writer process on S3 is killed in plain saves (replacing on S3 is killed in thread mode, and
# in both modes on the local disk); it writes every save through DCP: a repeat save's points are never reached
def test_crash_point_on_s3(scenario, point, mode, tmp_path, s3_url):
    url, options = s3_url
    crash(scenario, mode, url, options, point, tmp_path)
    check_after_crash(url, options, {**OUTCOMES, **REPEAT}[(scenario, point)])
