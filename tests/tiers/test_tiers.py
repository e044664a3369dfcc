"""CheckpointManager with a remote tier: replication, retention per tier, resume from the remote alone."""

from __future__ import annotations

import shutil

import pytest

from dcp_plugin import CheckpointManager, EveryNSteps, KeepLast
from tests.models import assert_same, make_training, snapshot, train_step
from tests.paths import SCRIPTS

pytestmark = pytest.mark.s3


def run(local: str, url: str, options: dict, steps: int, **tiers):
    model, optimizer, _ = make_training(seed=1)
    state = {"model": model, "optim": optimizer, "step": 0}
    with CheckpointManager(local, async_mode="thread", remote=url, remote_storage_options=options, **tiers) as manager:
        for step in range(1, steps + 1):
            train_step(model, optimizer)
            state["step"] = step
            manager.save(step, state)
        manager.wait()
        return manager, snapshot(model, optimizer)


def test_four_saves_replicated_then_resumed_from_s3_after_the_local_disk_is_gone(tmp_path, s3_url):
    url, options = s3_url
    local = str(tmp_path / "local")
    manager, expected = run(local, url, options, steps=4)
    assert manager.locations() == {f"step_{s:09d}": ("local", "remote") for s in (1, 2, 3, 4)}
    shutil.rmtree(local)

    model, optimizer, _ = make_training(seed=5)
    state = {"model": model, "optim": optimizer, "step": 0}
    with CheckpointManager(local, async_mode="sync", remote=url, remote_storage_options=options) as resumed:
        assert [i.step for i in resumed.list()] == [1, 2, 3, 4]
        assert set(resumed.locations().values()) == {("remote",)}
        info = resumed.load(state)
    assert info.step == 4 and state["step"] == 4
    assert_same(snapshot(model, optimizer), expected)


def test_replicate_policy_and_separate_retention_per_tier(tmp_path, s3_url):
    url, options = s3_url
    local = str(tmp_path / "local")
    manager, _ = run(
        local, url, options, steps=6, retention=KeepLast(2), replicate=EveryNSteps(2), remote_retention=KeepLast(2)
    )
    where = manager.locations()
    assert [n for n, t in where.items() if "local" in t] == ["step_000000005", "step_000000006"]
    assert [n for n, t in where.items() if "remote" in t] == ["step_000000004", "step_000000006"]


def test_a_damaged_local_copy_is_read_from_the_remote_tier(tmp_path, s3_url):
    url, options = s3_url
    local = tmp_path / "local"
    _, expected = run(str(local), url, options, steps=1)
    data = local / "step_000000001" / "__0_0.distcp"
    raw = bytearray(data.read_bytes())
    raw[-100] ^= 0xFF
    data.write_bytes(bytes(raw))
    model, optimizer, _ = make_training(seed=5)
    with CheckpointManager(str(local), async_mode="sync", remote=url, remote_storage_options=options) as manager:
        manager.load({"model": model, "optim": optimizer, "step": 0})
    assert_same(snapshot(model, optimizer), expected)


@pytest.mark.slow
def test_sigkill_during_replication_leaves_only_committed_remote_checkpoints_and_the_next_run_catches_up(
    tmp_path, s3_url
):
    import json
    import os
    import signal
    import subprocess
    import sys

    url, options = s3_url
    local = str(tmp_path / "local")
    script = os.path.join(SCRIPTS, "crash_replication.py")
    child = subprocess.run(
        [sys.executable, script, local, url, json.dumps(options)],
        env=dict(os.environ, PYTHONPATH=os.getcwd()),
        start_new_session=True,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert child.returncode == -signal.SIGKILL, child.stdout + child.stderr
    with CheckpointManager(url, async_mode="sync", storage_options=options) as remote:
        assert remote.list() == []  # the copy was never committed there
        assert len(remote.storage.incomplete()) == 1  # its data is a leftover purge removes
    with CheckpointManager(local, async_mode="sync", remote=url, remote_storage_options=options) as manager:
        pass  # a new run replicates what is missing
    assert manager.locations() == {"step_000000001": ("local", "remote")}


# -- the options the adapters share --------------------------------------------------------------------------
def test_remote_options_resolve_arguments_over_variables():
    from dcp_plugin.tiers.two_tiers import RemoteTier

    environ = {
        "DCP_PLUGIN_REMOTE": "s3://bucket/env",
        "DCP_PLUGIN_REMOTE_STORAGE_OPTIONS": '{"anon": true}',
        "DCP_PLUGIN_REPLICATE_EVERY_N_STEPS": "100",
        "DCP_PLUGIN_REMOTE_KEEP_LAST": "3",
    }
    tier = RemoteTier.resolve(environ, remote="s3://bucket/code", remote_keep_last=5)
    assert tier == RemoteTier("s3://bucket/code", {"anon": True}, 100, 5)
    options = tier.manager_options()
    assert options["replicate"].n == 100 and options["remote_retention"].k == 5
    assert RemoteTier.resolve({}) == RemoteTier()


@pytest.mark.parametrize(
    ("arguments", "environ", "message"),
    [
        ({"remote_keep_last": 0, "remote": "s3://b/r"}, {}, "remote_keep_last=0 must be an integer >= 1"),
        ({"replicate_every_n_steps": 10}, {}, "without a remote tier: pass remote="),
        ({}, {"DCP_PLUGIN_REMOTE": "s3://b/r", "DCP_PLUGIN_REMOTE_KEEP_LAST": "two"}, "must be an integer"),
        ({}, {"DCP_PLUGIN_REMOTE": "s3://b/r", "DCP_PLUGIN_REMOTE_STORAGE_OPTIONS": "{"}, "must be a JSON object"),
    ],
)
def test_bad_remote_options_say_what_is_wrong(arguments, environ, message):
    from dcp_plugin import ConfigError
    from dcp_plugin.tiers.two_tiers import RemoteTier

    with pytest.raises(ConfigError, match=message):
        RemoteTier.resolve(environ, **arguments)


def test_a_misspelt_remote_variable_names_the_right_one():
    from dcp_plugin import CheckpointConfig, ConfigError

    with pytest.raises(ConfigError, match="Did you mean DCP_PLUGIN_REMOTE_KEEP_LAST"):
        CheckpointConfig.from_env({"DCP_PLUGIN_REMOTE_KEEPLAST": "2"})
    assert CheckpointConfig.from_env({"DCP_PLUGIN_REMOTE": "s3://b/r"}) == CheckpointConfig()
