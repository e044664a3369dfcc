"""SIGKILL during an incremental save and during the retention that removes shared data no kept checkpoint uses
(thread and process mode on local disk, thread mode on S3): every committed checkpoint stays complete.

After each crash: exactly the expected checkpoints are listed, each verifies and loads exactly; ``purge`` leaves
exactly the shared data that committed checkpoints use; the next incremental save works.
"""

from __future__ import annotations

import os

import pytest
import torch

from dcp_plugin import CheckpointManager, ModelState
from dcp_plugin.storage import CheckpointStorage
from tests.crashes import run_until_killed
from tests.models import assert_same
from tests.paths import SCRIPTS
from tests.scripts.crash_incremental import lora_at

pytestmark = pytest.mark.slow

SCRIPT = os.path.join(SCRIPTS, "crash_incremental.py")
OUTCOMES = {
    ("save", "save.begun"): [1, 2],
    ("save", "save.written"): [1, 2],
    ("save", "save.sealed"): [1, 2],
    ("save", "save.committed"): [1, 2, 3],
    ("retention", "delete.hidden"): [2, 3],
    ("retention", "blobs.collecting"): [3],
}


def crash(scenario: str, mode: str, url: str, options: dict, point: str, cwd) -> None:
    run_until_killed(SCRIPT, scenario, mode, url, options, point, cwd, timeout=180)


def blob_names(storage: CheckpointStorage) -> set[str]:
    storage.fs.invalidate_cache()
    try:
        return {path.rstrip("/").rsplit("/", 1)[-1] for path in storage.fs.ls(storage.blob_area, detail=False)}
    except FileNotFoundError:
        return set()


def check_after_crash(url: str, options: dict, steps: list[int]) -> None:
    with CheckpointManager(url, async_mode="sync", storage_options=options) as manager:
        storage = manager.storage
        assert manager.steps == steps
        for step in steps:
            assert storage.verify(storage.find_step(step)) == []
            model = lora_at(9)
            manager.load({"model": ModelState(model)}, step=step)
            assert_same(model.state_dict(), lora_at(step).state_dict())
        storage.purge()
        assert manager.steps == steps, "purge removed committed data"
        used = {name for info in storage.list() for name in info.manifest.get("blobs", {})}
        assert blob_names(storage) == used
        model = lora_at(9)
        manager.load({"model": ModelState(model)})
        with torch.no_grad():
            model[1].a.fill_(4.0)
        manager.save(4, {"model": ModelState(model)})
        assert storage.read_manifest("step_000000004")["blobs"], "the next save refers to shared data again"
        fresh = lora_at(9)
        manager.load({"model": ModelState(fresh)}, step=4)
        assert_same(fresh.state_dict(), model.state_dict())


@pytest.mark.parametrize(
    ("scenario", "point", "mode"),
    [(s, p, m) for s, p in sorted(OUTCOMES) for m in ("thread", "process") if s == "save" or m == "thread"],
)  # retention runs in the calling process whatever the mode: one mode is enough
def test_sigkill_during_incremental_saves_and_retention_on_local_disk(tmp_path, scenario, point, mode):
    url = str(tmp_path / "ckpts")
    crash(scenario, mode, url, {}, point, tmp_path)
    check_after_crash(url, {}, OUTCOMES[(scenario, point)])


@pytest.mark.parametrize(("scenario", "point"), sorted(OUTCOMES))
def test_sigkill_during_incremental_saves_and_retention_on_s3(s3_url, tmp_path, scenario, point):
    url, options = s3_url
    crash(scenario, "thread", url, options, point, tmp_path)
    check_after_crash(url, options, OUTCOMES[(scenario, point)])
