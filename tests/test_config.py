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
        ({"max_staging_bytes": "lots"}, "not a size"),
        ({"max_staging_bytes": "12 parsecs"}, "not a size"),
        ({"max_staging_bytes": 0}, "positive size"),
        ({"async_mode": "process", "max_staging_bytes": "1GiB"}, "whole snapshot in shared memory"),
        ({"async_mode": "sync", "max_staging_bytes": "1GiB"}, "stages nothing"),
        ({"local_scope": "nodes"}, "'shared'.*'node'"),
        ({"peer_replicas": 1}, "needs local_scope='node'"),
        ({"local_scope": "node", "peer_replicas": -1}, "integer >= 0"),
        ({"local_scope": "node", "peer_replicas": True}, "integer >= 0"),
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


def test_node_scope_from_code_and_environment():
    assert CheckpointConfig().local_scope == "shared" and CheckpointConfig().replicas == 0
    config = CheckpointConfig(local_scope="node")
    assert config.replicas == 1 and config.incremental is False  # a node's part holds its own files
    env = {"DCP_PLUGIN_LOCAL_SCOPE": "node", "DCP_PLUGIN_PEER_REPLICAS": "2"}
    assert CheckpointConfig.from_env(env).replicas == 2
    assert CheckpointConfig.from_env({**env, "DCP_PLUGIN_PEER_REPLICAS": "auto"}).replicas == 1
    assert CheckpointConfig.from_env(env, peer_replicas=0).replicas == 0
    with pytest.raises(ConfigError, match="DCP_PLUGIN_PEER_REPLICAS"):
        CheckpointConfig.from_env({**env, "DCP_PLUGIN_PEER_REPLICAS": "two"})


def test_from_env_rejects_typos():
    with pytest.raises(ConfigError, match="DCP_PLUGIN_ASYNC_MODE"):
        CheckpointConfig.from_env({"DCP_PLUGIN_ASYNC_MOD": "thread"})
    with pytest.raises(ConfigError, match="integer"):
        CheckpointConfig.from_env({"DCP_PLUGIN_THREAD_COUNT": "many"})


def test_a_misspelt_variable_names_the_closest_one_and_all_known():
    with pytest.raises(ConfigError) as info:
        CheckpointConfig.from_env({"DCP_PLUGIN_ASYNC_MOD": "sync"})
    message = str(info.value)
    assert "Did you mean DCP_PLUGIN_ASYNC_MODE?" in message
    for known in ("DCP_PLUGIN_THREAD_COUNT", "DCP_PLUGIN_ENABLE", "DCP_PLUGIN_KEEP_LAST", "DCP_PLUGIN_DIR"):
        assert known in message
    with pytest.raises(ConfigError, match="Did you mean DCP_PLUGIN_KEEP_LAST"):
        CheckpointConfig.from_env({"DCP_PLUGIN_KEEPLAST": "3"})


def test_arguments_win_then_environment_then_defaults():
    env = {"DCP_PLUGIN_ASYNC_MODE": "sync", "DCP_PLUGIN_THREAD_COUNT": "5"}
    config = CheckpointConfig.resolve(env, async_mode=None, thread_count=3, strict=None)
    assert (config.async_mode, config.thread_count, config.strict) == ("sync", 3, True)
    assert CheckpointConfig.resolve({}, async_mode=None).async_mode == "thread"


def test_checkpoint_manager_reads_the_environment(tmp_path, monkeypatch):
    from dcp_plugin import CheckpointManager

    monkeypatch.setenv("DCP_PLUGIN_ASYNC_MODE", "sync")
    monkeypatch.setenv("DCP_PLUGIN_THREAD_COUNT", "3")
    manager = CheckpointManager(str(tmp_path / "a"), thread_count=1)
    try:
        assert manager.config.async_mode == "sync" and manager.config.thread_count == 1
    finally:
        manager.close()
    explicit = CheckpointManager(str(tmp_path / "b"), CheckpointConfig(async_mode="thread"))
    try:
        assert explicit.config.async_mode == "thread"  # a config given in code is explicit
    finally:
        explicit.close()
    monkeypatch.setenv("DCP_PLUGIN_ASYNC_MOOD", "sync")
    with pytest.raises(ConfigError, match="Did you mean DCP_PLUGIN_ASYNC_MODE"):
        CheckpointManager(str(tmp_path / "c"))


def test_lightning_plugin_reads_the_environment(monkeypatch):
    import inspect

    from dcp_plugin.lightning import DCPCheckpointIO

    monkeypatch.setenv("DCP_PLUGIN_ASYNC_MODE", "sync")
    monkeypatch.setenv("DCP_PLUGIN_ALLOW_PICKLE", "1")
    plugin = DCPCheckpointIO()
    assert plugin.config.async_mode == "sync" and plugin.config.allow_pickle is True
    assert DCPCheckpointIO(async_mode="process").config.async_mode == "process"
    # LightningCLI (jsonargparse) represents every default: they are plain None, no enum or object
    defaults = [p.default for p in inspect.signature(DCPCheckpointIO.__init__).parameters.values()][1:]
    assert all(d is None or isinstance(d, bool) for d in defaults)
    monkeypatch.delenv("DCP_PLUGIN_ASYNC_MODE")
    assert DCPCheckpointIO().config.async_mode == "thread"


@pytest.mark.parametrize(
    ("text", "size"),
    [("536870912", 2**29), ("512MiB", 2**29), ("512 mib", 2**29), ("1.5GiB", 3 * 2**29), ("2GB", 2 * 10**9)],
)
def test_the_staging_budget_takes_sizes_in_code_and_in_the_environment(text, size):
    assert CheckpointConfig(max_staging_bytes=text).max_staging_bytes == size
    assert CheckpointConfig.from_env({"DCP_PLUGIN_MAX_STAGING_BYTES": text}).max_staging_bytes == size


def test_an_empty_staging_budget_variable_means_no_bound():
    assert CheckpointConfig.from_env({"DCP_PLUGIN_MAX_STAGING_BYTES": ""}).max_staging_bytes is None
    assert CheckpointConfig.from_env({"DCP_PLUGIN_MAX_STAGING_BYTES": "none"}).max_staging_bytes is None
    assert CheckpointConfig().max_staging_bytes is None


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"DCP_PLUGIN_ASYNC_MODE": "proces"}, "DCP_PLUGIN_ASYNC_MODE='proces' is not supported; use one of sync"),
        ({"DCP_PLUGIN_THREAD_COUNT": "0"}, "DCP_PLUGIN_THREAD_COUNT='0' must be an integer >= 1"),
        (
            {"DCP_PLUGIN_ASYNC_MODE": "sync", "DCP_PLUGIN_ASYNC_STAGING": "1"},
            "DCP_PLUGIN_ASYNC_STAGING='1' needs a background writer",
        ),
        ({"DCP_PLUGIN_MAX_STAGING_BYTES": "12XB"}, "(set in the environment: DCP_PLUGIN_MAX_STAGING_BYTES='12XB')"),
    ],
)
def test_a_bad_value_from_the_environment_names_the_variable(env, expected):
    with pytest.raises(ConfigError) as info:
        CheckpointConfig.from_env(env)
    assert expected in str(info.value)


def test_a_value_given_in_code_is_not_blamed_on_the_environment():
    with pytest.raises(ConfigError) as info:
        CheckpointConfig.from_env({"DCP_PLUGIN_THREAD_COUNT": "2"}, async_mode="bogus")
    assert str(info.value).startswith("async_mode='bogus' is not supported") and "DCP_PLUGIN" not in str(info.value)
