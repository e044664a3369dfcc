"""Options of the Accelerate adapter: the checkpoint engine's config plus the adapter's own switches.

Everything can be set in code (arguments of :func:`dcp_plugin.accelerate.enable`) or, without editing
code, through ``DCP_PLUGIN_*`` environment variables, which ``accelerate launch`` and ``torchrun`` pass to
every rank. Arguments given in code win over the environment.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from dcp_plugin.config import ENV_PREFIX, CheckpointConfig, ConfigError, _parse_env_value
from dcp_plugin.tiers.two_tiers import RemoteTier

REMOTE_ARGUMENTS = ("remote", "remote_storage_options", "replicate_every_n_steps", "remote_keep_last")

ENABLE_ENV = ENV_PREFIX + "ENABLE"
DIR_ENV = ENV_PREFIX + "DIR"
KEEP_LAST_ENV = ENV_PREFIX + "KEEP_LAST"
LOG_METRICS_ENV = ENV_PREFIX + "LOG_METRICS"


@dataclass
class AccelerateOptions:
    """How ``accelerator.save_state()`` / ``load_state()`` behave once the adapter is enabled."""

    enable: bool = True
    """Route ``save_state`` / ``load_state`` through DCP. ``DCP_PLUGIN_ENABLE=0`` keeps Accelerate's own
    implementation (the call to ``enable()`` then changes nothing), so a run can switch back without edits."""

    directory: str | None = None
    """Where automatically named checkpoints (``checkpoint_<iteration>``) go: a local path or an fsspec URL
    such as ``s3://bucket/run/checkpoints``. Default: ``<project_dir>/checkpoints``, as Accelerate does.
    Setting it also lets ``save_state()`` without arguments name checkpoints automatically when the
    ``ProjectConfiguration`` does not ask for it."""

    keep_last: int | None = None
    """Keep this many committed automatically named checkpoints (overrides
    ``ProjectConfiguration.total_limit``).
    ``None``: use ``total_limit``; neither set: keep all."""

    log_metrics: bool = True
    """When the ``Accelerator`` has trackers, log each committed save's timings with ``accelerator.log``
    (``checkpoint/blocking_s``, ``checkpoint/durable_s``, ...; see :mod:`dcp_plugin.accelerate.metrics`)."""

    config: CheckpointConfig = field(default_factory=CheckpointConfig)
    """How checkpoints are written and read (async mode, staging, writer threads, storage options...)."""

    remote: RemoteTier = field(default_factory=RemoteTier)
    """A remote tier the automatically named checkpoints are replicated to in the background; ``load_state()``
    then takes the newest checkpoint of either tier (``DCP_PLUGIN_REMOTE*`` variables)."""

    def __post_init__(self) -> None:
        if not isinstance(self.enable, bool):
            raise ConfigError(f"enable={self.enable!r} must be True or False.")
        if not isinstance(self.log_metrics, bool):
            raise ConfigError(f"log_metrics={self.log_metrics!r} must be True or False.")
        if self.directory is not None:
            if not isinstance(self.directory, (str, os.PathLike)) or not os.fspath(self.directory):
                raise ConfigError(f"directory={self.directory!r} must be a non-empty local path or URL.")
            self.directory = os.fspath(self.directory)
        if self.keep_last is not None and (
            isinstance(self.keep_last, bool) or not isinstance(self.keep_last, int) or self.keep_last < 1
        ):
            raise ConfigError(f"keep_last={self.keep_last!r} must be an integer >= 1 (or None to keep all).")
        if not isinstance(self.config, CheckpointConfig):
            raise ConfigError(f"config must be a CheckpointConfig, got {type(self.config).__name__}.")
        if not isinstance(self.remote, RemoteTier):
            raise ConfigError(f"remote must be a RemoteTier, got {type(self.remote).__name__}.")

    @classmethod
    def from_env(
        cls,
        environ: Mapping[str, str] | None = None,
        *,
        config: CheckpointConfig | None = None,
        enable: bool | None = None,
        directory: str | None = None,
        keep_last: int | None = None,
        log_metrics: bool | None = None,
        **config_overrides: Any,
    ) -> AccelerateOptions:
        """Read ``DCP_PLUGIN_*`` variables; arguments that are not ``None`` win over them.

        ``config`` (a full :class:`CheckpointConfig`) replaces the environment's engine options;
        ``config_overrides`` (e.g. ``async_mode="process"``) override single fields of either; the remote tier's
        arguments among them (``remote``, ``remote_storage_options``, ``replicate_every_n_steps``,
        ``remote_keep_last``) configure :attr:`remote`.
        Unknown ``DCP_PLUGIN_*`` names and unparsable values are errors.
        """
        environ = os.environ if environ is None else environ
        remote = RemoteTier.resolve(
            environ, **{k: config_overrides.pop(k) for k in REMOTE_ARGUMENTS if k in config_overrides}
        )
        if config is None:
            config = CheckpointConfig.resolve(environ, **config_overrides)
        elif config_overrides:
            config = config.replace(**config_overrides)
        if enable is None and ENABLE_ENV in environ:
            enable = _parse_env_value(ENABLE_ENV, environ[ENABLE_ENV], False)
        if directory is None and environ.get(DIR_ENV, "").strip():
            directory = environ[DIR_ENV].strip()
        if log_metrics is None and environ.get(LOG_METRICS_ENV, "").strip():
            log_metrics = _parse_env_value(LOG_METRICS_ENV, environ[LOG_METRICS_ENV], True)
        if keep_last is None and environ.get(KEEP_LAST_ENV, "").strip():
            raw = environ[KEEP_LAST_ENV].strip()
            if raw.lower() not in {"none", "all"}:
                keep_last = _parse_env_value(KEEP_LAST_ENV, raw, 0)
                if keep_last < 1:
                    raise ConfigError(f"{KEEP_LAST_ENV}={raw!r} must be an integer >= 1 (or 'none' to keep all).")
        return cls(
            enable=True if enable is None else enable,
            directory=directory,
            keep_last=keep_last,
            log_metrics=True if log_metrics is None else log_metrics,
            config=config,
            remote=remote,
        )
