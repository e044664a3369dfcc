"""Exact resume with a real Trainer: single device and DDP (2 spawned ranks), every async mode."""

from __future__ import annotations

import pytest

from dcp_plugin.lightning import DCPCheckpointIO
from tests.lightning.helpers import resume_run
from tests.models import assert_same
from tests.multiproc import run_ranks

MODES = ["sync", "thread", "process"]


def _compare(expected: dict, resumed: dict, steps: int = 4) -> None:
    assert resumed.pop("hook_key") == {"steps": steps, 7: (1, 2), "empty": []}
    for key in expected:
        assert_same(expected[key], resumed[key], key)


@pytest.mark.parametrize("mode", MODES)
def test_single_device_resume_is_bit_exact(tmp_path, mode):
    expected, resumed = resume_run(str(tmp_path), lambda: DCPCheckpointIO(async_mode=mode))
    _compare(expected, resumed)


def test_async_staging_resume_is_bit_exact(tmp_path):
    expected, resumed = resume_run(str(tmp_path), lambda: DCPCheckpointIO(async_mode="thread", async_staging=True))
    _compare(expected, resumed)


def _ddp_resume(rank: int, world_size: int, root: str, mode: str) -> tuple[dict, dict]:
    from lightning.pytorch.strategies import DDPStrategy

    return resume_run(root, lambda: DCPCheckpointIO(async_mode=mode), strategy_factory=DDPStrategy, devices=world_size)


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
def test_ddp_resume_is_bit_exact(tmp_path, mode):
    results = run_ranks(_ddp_resume, str(tmp_path), mode, world_size=2)
    for expected, resumed in results:
        _compare(expected, resumed, steps=2)
