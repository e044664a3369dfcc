"""Entry points: :func:`enable` installs DCP-backed ``save_state`` / ``load_state`` on an ``Accelerator``
instance; :class:`DCPAccelerator` is a drop-in subclass that does it in its constructor.

Why replace the methods instead of using Accelerate's hooks: ``register_save_state_pre_hook`` can keep
Accelerate from writing the model, but the optimizer is always written (and read back over whatever we
loaded), and the write is synchronous, local-disk only and not crash-safe.
"""

from __future__ import annotations

import logging
import types
from typing import Any

from accelerate import Accelerator
from accelerate.utils import DistributedType

from dcp_plugin.accelerate.checkpointer import AccelerateCheckpointer
from dcp_plugin.accelerate.options import AccelerateOptions
from dcp_plugin.config import CheckpointConfig, ConfigError
from dcp_plugin.storage import CheckpointInfo

log = logging.getLogger(__name__)

ATTRIBUTE = "_dcp_plugin_checkpointer"
_WRAPPED = ("save_state", "load_state", "wait_for_everyone", "end_training")
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
        environ: read these variables instead of ``os.environ`` (for tests).
        **options: single :class:`~dcp_plugin.CheckpointConfig` fields, e.g. ``async_mode="process"``.

    Arguments given here win over environment variables. With ``DCP_PLUGIN_ENABLE=0`` nothing is
    installed and ``None`` is returned, so a run can go back to Accelerate's own checkpoints without
    code changes. Returns the installed checkpointer otherwise.

    After this call, ``wait_for_everyone()`` first waits for the save in flight, and ``end_training()``
    flushes it and stops the writer. Errors of background writes are raised by the next ``save_state``,
    ``load_state``, ``wait_for_everyone`` or ``end_training``.
    """
    if not isinstance(accelerator, Accelerator):
        raise TypeError(f"enable() takes an accelerate.Accelerator, got {type(accelerator).__name__}.")
    if getattr(accelerator, ATTRIBUTE, None) is not None:
        raise RuntimeError(
            "dcp-plugin is already enabled on this Accelerator; call "
            "dcp_plugin.accelerate.disable(accelerator) first to change its options."
        )
    settings = AccelerateOptions.from_env(environ, config=config, directory=directory, keep_last=keep_last, **options)
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
    cls = type(accelerator)
    original_wait = cls.wait_for_everyone
    original_end = cls.end_training

    def save_state(self: Accelerator, output_dir: Any = None, safe_serialization: bool = True, **kwargs: Any) -> str:
        """DCP-backed :meth:`accelerate.Accelerator.save_state` (dcp-plugin); returns the checkpoint's URL."""
        if kwargs:
            raise TypeError(
                f"save_state() got {sorted(kwargs)}: these are for DeepSpeed's save_checkpoint, which "
                "dcp-plugin does not use. Remove them, or disable dcp-plugin (DCP_PLUGIN_ENABLE=0)."
            )
        return checkpointer.save_state(output_dir)

    def load_state(
        self: Accelerator, input_dir: Any = None, load_kwargs: dict | None = None, **kwargs: Any
    ) -> CheckpointInfo:
        """DCP-backed :meth:`accelerate.Accelerator.load_state` (dcp-plugin): loads in place, resharding."""
        strict = kwargs.pop("strict", None)
        kwargs.pop("map_location", None)  # tensors load into the live (already placed) objects
        if kwargs or load_kwargs:
            raise TypeError(
                f"load_state() got {sorted(kwargs) + sorted(load_kwargs or {})}; dcp-plugin loads in "
                "place and accepts only strict= (and ignores map_location)."
            )
        return checkpointer.load_state(input_dir, strict=strict)

    def wait_for_everyone(self: Accelerator) -> None:
        """Wait for the checkpoint save in flight on this rank, then for all processes (dcp-plugin)."""
        checkpointer.flush()
        original_wait(self)

    def end_training(self: Accelerator) -> None:
        """Commit the last checkpoint and stop its writer, then Accelerate's own end_training (dcp-plugin)."""
        try:
            checkpointer.close()
        finally:
            original_end(self)

    for function in (save_state, load_state, wait_for_everyone, end_training):
        setattr(accelerator, function.__name__, types.MethodType(function, accelerator))
    setattr(accelerator, ATTRIBUTE, checkpointer)


class DCPAccelerator(Accelerator):
    """An ``Accelerator`` whose ``save_state`` / ``load_state`` go through dcp-plugin.

    Takes every ``Accelerator`` argument, plus ``dcp_config`` (a :class:`~dcp_plugin.CheckpointConfig`),
    ``dcp_directory`` and ``dcp_keep_last`` (see :func:`enable`); ``DCP_PLUGIN_*`` variables fill the rest.
    """

    def __init__(
        self,
        *args: Any,
        dcp_config: CheckpointConfig | None = None,
        dcp_directory: str | None = None,
        dcp_keep_last: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.dcp_checkpointer = enable(self, dcp_config, directory=dcp_directory, keep_last=dcp_keep_last)
