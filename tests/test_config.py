"""Options are validated when set, from code or from DCP_PLUGIN_* variables."""

from __future__ import annotations

import pytest

from dcp_plugin import CheckpointConfig, ConfigError


def test_defaults_are_valid_and_async():
    config = CheckpointConfig()
    assert config.async_mode == "thread" and config.is_async and config.sync_files


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"async_mode": "fast"}, "sync, thread, process"),
        ({"thread_count": 0}, "thread_count"),
        ({"async_mode": "sync", "async_staging": True}, "background writer"),
        ({"async_mode": "process", "shared_memory": False}, "shared memory"),
        ({"strict": "yes"}, "strict"),
    ],
)
def test_bad_values_are_rejected_with_the_fix(changes, message):
    with pytest.raises(ConfigError, match=message):
        CheckpointConfig(**changes)


def test_from_env_parses_and_code_overrides_win():
    env = {
        "DCP_PLUGIN_ASYNC_MODE": "process",
        "DCP_PLUGIN_THREAD_COUNT": "4",
        "DCP_PLUGIN_SYNC_FILES": "off",
        "DCP_PLUGIN_PINNED_MEMORY": "auto",
        "DCP_PLUGIN_STORAGE_OPTIONS": '{"anon": false}',
        "DCP_PLUGIN_ENABLE": "1",
        "UNRELATED": "x",
    }
    config = CheckpointConfig.from_env(env, thread_count=3)
    assert config.async_mode == "process" and config.thread_count == 3
    assert config.sync_files is False and config.pinned_memory is None
    assert config.storage_options == {"anon": False}


def test_from_env_rejects_typos():
    with pytest.raises(ConfigError, match="DCP_PLUGIN_ASYNC_MODE"):
        CheckpointConfig.from_env({"DCP_PLUGIN_ASYNC_MOD": "thread"})
    with pytest.raises(ConfigError, match="integer"):
        CheckpointConfig.from_env({"DCP_PLUGIN_THREAD_COUNT": "many"})
