"""Entry points: :func:`enable` installs DCP-backed ``save_state`` / ``load_state`` on an ``Accelerator``
instance; :class:`DCPAccelerator` is a drop-in subclass that does it in its constructor.

Why replace the methods instead of using Accelerate's hooks: ``register_save_state_pre_hook`` can keep
Accelerate from writing the model, but the optimizer is always written (and read back over whatever we
loaded), and the write is synchronous, local-disk only and not crash-safe.
"""

from __future__ import annotations

import logging
from typing import Any

from accelerate import Accelerator
from accelerate.utils import DistributedType

from dcp_plugin.accelerate import epochs
from dcp_plugin.accelerate.checkpointer import AccelerateCheckpointer
from dcp_plugin.accelerate.options import AccelerateOptions
from dcp_plugin.accelerate.state import collect
from dcp_plugin.config import CheckpointConfig, ConfigError
from dcp_plugin.engine.staging.warmup import prepare_after_first_step

log = logging.getLogger(__name__)

ATTRIBUTE = "_dcp_plugin_checkpointer"
_WRAPPED = (
    "save_state",
    "load_state",
    "wait_for_everyone",
    "end_training",
    "prepare_data_loader",
    "skip_first_batches",
    "log",
)
_UNSUPPORTED = {
    DistributedType.DEEPSPEED: "DeepSpeed saves through its own engine",
    DistributedType.MEGATRON_LM: "Megatron-LM saves through its own engine",
    DistributedType.XLA: "XLA devices are not supported by torch.distributed.checkpoint here",
}


def enable(
    accelerator: Accelerator,
    config: CheckpointConfig | None = None,
    *,
    directory: str | None = None,
    keep_last: int | None = None,
    log_metrics: bool | None = None,
    environ: dict[str, str] | None = None,
    **options: Any,
) -> AccelerateCheckpointer | None:
    """Make ``accelerator.save_state()`` / ``load_state()`` save and load through DCP.

    Args:
        accelerator: the ``Accelerator`` (before or after ``prepare``).
        config: a full :class:`~dcp_plugin.CheckpointConfig`; default: built from ``DCP_PLUGIN_*`` variables.
        directory: where automatically named checkpoints go (default ``<project_dir>/checkpoints``); may be
            a URL such as ``s3://bucket/run/checkpoints``. Env: ``DCP_PLUGIN_DIR``.
        keep_last: committed checkpoints to keep (overrides ``ProjectConfiguration.total_limit``).
            Env: ``DCP_PLUGIN_KEEP_LAST``.
        log_metrics: when the ``Accelerator`` has trackers, log each committed save's timings with
            ``accelerator.log`` (default on). Env: ``DCP_PLUGIN_LOG_METRICS``.
        environ: read these variables instead of ``os.environ`` (for tests).
        **options: single :class:`~dcp_plugin.CheckpointConfig` fields, e.g. ``async_mode="process"``, and
            the remote tier's: ``remote="s3://bucket/run1"`` (the automatically named checkpoints are replicated
            there in the background; ``load_state()`` takes the newest of either tier),
            ``remote_storage_options``, ``replicate_every_n_steps``, ``remote_keep_last``. Env:
            ``DCP_PLUGIN_REMOTE``, ``DCP_PLUGIN_REMOTE_STORAGE_OPTIONS`` (JSON), ``DCP_PLUGIN_REPLICATE_EVERY_N_STEPS``,
            ``DCP_PLUGIN_REMOTE_KEEP_LAST``.

    Arguments given here win over environment variables. With ``DCP_PLUGIN_ENABLE=0`` nothing is
    installed and ``None`` is returned, so a run can go back to Accelerate's own checkpoints without
    code changes. Returns the installed checkpointer otherwise.

    After this call, ``wait_for_everyone()`` first waits for the save in flight, and ``end_training()``
    flushes it and stops the writer. Errors of background writes are raised by the next ``save_state``,
    ``load_state``, ``wait_for_everyone`` or ``end_training``.
    """
    if not isinstance(accelerator, Accelerator):
        raise TypeError(f"enable() takes an accelerate.Accelerator, got {type(accelerator).__name__}.")
    existing = getattr(accelerator, ATTRIBUTE, None)
    if existing is not None and existing.installed_automatically:
        disable(accelerator)  # DCP_PLUGIN_ENABLE=1 enabled it; the script's own call and options win
    elif existing is not None:
        raise RuntimeError(
            "dcp-plugin is already enabled on this Accelerator; call "
            "dcp_plugin.accelerate.disable(accelerator) first to change its options."
        )
    settings = AccelerateOptions.from_env(
        environ, config=config, directory=directory, keep_last=keep_last, log_metrics=log_metrics, **options
    )
    if not settings.enable:
        log.info("DCP_PLUGIN_ENABLE is off: keeping Accelerate's own save_state/load_state.")
        return None
    reason = _UNSUPPORTED.get(accelerator.distributed_type)
    if reason is not None:
        raise ConfigError(
            f"dcp-plugin cannot checkpoint an Accelerator with "
            f"distributed_type={accelerator.distributed_type}: "
            f"{reason}. Use Accelerate's own save_state (DCP_PLUGIN_ENABLE=0)."
        )
    if accelerator.project_configuration.save_on_each_node:
        log.warning(
            "ProjectConfiguration(save_on_each_node=True) is ignored: DCP writes one checkpoint that "
            "all ranks share, so the checkpoint directory must be on storage every node sees (a shared "
            "filesystem or a URL)."
        )
    checkpointer = AccelerateCheckpointer(accelerator, settings)
    _install(accelerator, checkpointer)
    return checkpointer


def enable_automatically(accelerator: Accelerator) -> AccelerateCheckpointer | None:
    """What ``DCP_PLUGIN_ENABLE=1`` does for every new ``Accelerator`` (see ``_dcp_plugin_autoload``): enable
    dcp-plugin with options from ``DCP_PLUGIN_*`` variables, unless it is enabled already."""
    if getattr(accelerator, ATTRIBUTE, None) is not None:
        return None
    checkpointer = enable(accelerator)
    if checkpointer is not None:
        checkpointer.installed_automatically = True
    return checkpointer


def disable(accelerator: Accelerator) -> None:
    """Flush the save in flight, stop the writer and give ``accelerator`` its own methods back."""
    checkpointer = getattr(accelerator, ATTRIBUTE, None)
    if checkpointer is None:
        return
    try:
        checkpointer.close()
    finally:
        for name in _WRAPPED:
            accelerator.__dict__.pop(name, None)
        setattr(accelerator, ATTRIBUTE, None)


def checkpointer_of(accelerator: Accelerator) -> AccelerateCheckpointer | None:
    """The checkpointer installed on ``accelerator`` (``None`` when dcp-plugin is not enabled on it)."""
    return getattr(accelerator, ATTRIBUTE, None)


def _install(accelerator: Accelerator, checkpointer: AccelerateCheckpointer) -> None:
    for name in _WRAPPED:
        setattr(accelerator, name, _Method(accelerator, name))
    setattr(accelerator, ATTRIBUTE, checkpointer)
    for dataloader in accelerator._dataloaders:  # prepared before enable()
        epochs.watch(dataloader)
    if checkpointer.config.is_async and checkpointer.config.reuse_buffers:
        # the first save_state only copies into staging buffers prepared after the first optimizer step
        prepare_after_first_step(lambda: _checkpointer_for_prepare(accelerator), lambda: collect(accelerator, 0))


def _checkpointer_for_prepare(accelerator: Accelerator) -> Any:
    installed = checkpointer_of(accelerator)
    return None if installed is None or installed.closed else installed.checkpointer


class _Method:
    """One DCP-backed method on one ``Accelerator`` instance.

    A plain object rather than a closure, so that an ``Accelerator`` with dcp-plugin enabled can still be
    pickled and deep-copied (the copy gets its own methods, bound to the copy, and a fresh checkpointer).
    """

    def __init__(self, accelerator: Accelerator, name: str) -> None:
        self.accelerator = accelerator
        self.name = name
        self.__doc__ = getattr(_IMPLEMENTATIONS[name], "__doc__", None)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return _IMPLEMENTATIONS[self.name](self.accelerator, *args, **kwargs)

    def __repr__(self) -> str:
        return f"<dcp-plugin {self.name} of {type(self.accelerator).__name__}>"


def _checkpointer(accelerator: Accelerator) -> AccelerateCheckpointer:
    checkpointer = getattr(accelerator, ATTRIBUTE, None)
    if checkpointer is None:  # pragma: no cover - the methods are removed together with it
        raise RuntimeError("dcp-plugin is not enabled on this Accelerator.")
    return checkpointer


def _save_state(
    accelerator: Accelerator, output_dir: Any = None, safe_serialization: bool = True, **kwargs: Any
) -> str:
    """DCP-backed :meth:`accelerate.Accelerator.save_state` (dcp-plugin); returns the checkpoint's URL."""
    if kwargs:
        raise TypeError(
            f"save_state() got {sorted(kwargs)}: these are for DeepSpeed's save_checkpoint, which "
            "dcp-plugin does not use. Remove them, or disable dcp-plugin (DCP_PLUGIN_ENABLE=0)."
        )
    return _checkpointer(accelerator).save_state(output_dir)


def _load_state(accelerator: Accelerator, input_dir: Any = None, load_kwargs: dict | None = None, **kwargs: Any) -> Any:
    """DCP-backed :meth:`accelerate.Accelerator.load_state` (dcp-plugin): loads in place, resharding."""
    strict = kwargs.pop("strict", None)
    kwargs.pop("map_location", None)  # tensors load into the live (already placed) objects
    if kwargs or load_kwargs:
        raise TypeError(
            f"load_state() got {sorted(kwargs) + sorted(load_kwargs or {})}; dcp-plugin loads in "
            "place and accepts only strict= (and ignores map_location)."
        )
    return _checkpointer(accelerator).load_state(input_dir, strict=strict)


def _wait_for_everyone(accelerator: Accelerator) -> None:
    """Wait for the checkpoint save in flight on this rank (it is committed when this returns), then for
    all processes (dcp-plugin)."""
    _checkpointer(accelerator).flush()
    type(accelerator).wait_for_everyone(accelerator)


def _end_training(accelerator: Accelerator) -> None:
    """Commit the last checkpoint and stop its writer, then Accelerate's own end_training (dcp-plugin)."""
    try:
        _checkpointer(accelerator).close()
    finally:
        type(accelerator).end_training(accelerator)


def _log(accelerator: Accelerator, values: dict, step: int | None = None, log_kwargs: dict | None = None) -> None:
    """:meth:`accelerate.Accelerator.log`; checkpoint timings committed by now are logged first, at the step logged
    before, and the new step is noted (dcp-plugin)."""
    metrics = _checkpointer(accelerator).metrics
    metrics.log_committed(accelerator)
    metrics.note_step(step)
    type(accelerator).log(accelerator, values, step=step, log_kwargs=log_kwargs)


def _prepare_data_loader(accelerator: Accelerator, *args: Any, **kwargs: Any) -> Any:
    """:meth:`accelerate.Accelerator.prepare_data_loader`; the prepared loader also records its shuffling
    generator as each epoch begins, so that a save in mid-epoch can be resumed with ``skip_first_batches``
    (dcp-plugin)."""
    return epochs.watch(type(accelerator).prepare_data_loader(accelerator, *args, **kwargs))


def _skip_first_batches(accelerator: Accelerator, *args: Any, **kwargs: Any) -> Any:
    """:meth:`accelerate.Accelerator.skip_first_batches`; the new loader records its shuffling generator as
    its epoch begins, like the prepared ones, so a resumed run can save again in mid-epoch (dcp-plugin)."""
    return epochs.watch(type(accelerator).skip_first_batches(accelerator, *args, **kwargs))


_IMPLEMENTATIONS = {
    "save_state": _save_state,
    "load_state": _load_state,
    "wait_for_everyone": _wait_for_everyone,
    "end_training": _end_training,
    "prepare_data_loader": _prepare_data_loader,
    "skip_first_batches": _skip_first_batches,
    "log": _log,
}


class DCPAccelerator(Accelerator):
    """An ``Accelerator`` whose ``save_state`` / ``load_state`` go through dcp-plugin.

    Takes every ``Accelerator`` argument, plus ``dcp_config`` (a :class:`~dcp_plugin.CheckpointConfig`),
    ``dcp_directory``, ``dcp_keep_last`` and ``dcp_log_metrics`` (see :func:`enable`); ``DCP_PLUGIN_*`` variables
    fill the rest.
    """

    def __init__(
        self,
        *args: Any,
        dcp_config: CheckpointConfig | None = None,
        dcp_directory: str | None = None,
        dcp_keep_last: int | None = None,
        dcp_log_metrics: bool | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.dcp_checkpointer = enable(
            self, dcp_config, directory=dcp_directory, keep_last=dcp_keep_last, log_metrics=dcp_log_metrics
        )
        """The :class:`AccelerateCheckpointer` serving this accelerator's saves and loads."""
