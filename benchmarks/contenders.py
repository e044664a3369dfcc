"""The contenders: one small factory function each, registered with :func:`contender`.

A factory receives the :class:`Context` (the live model and optimizer, and a directory of its own) and
returns a :class:`Contender`: callables the worker uses to save, wait and load. Adding a contender is
one decorated function here. This module is the one place in the project that calls ``torch.save``,
``dcp.save`` and ``dcp.async_save`` directly: they are what dcp-plugin is compared with.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from benchmarks import diskio
from benchmarks.workload import Workload


def _noop(*_args: Any) -> None:
    return None


def _always() -> bool:
    return True


@dataclass
class Context:
    work: Workload
    directory: str
    """A directory of this contender's own (created, empty)."""


@dataclass
class Contender:
    """How the worker drives one way of checkpointing."""

    save: Callable[[int], None]
    """Checkpoint the live state as of now for ``step``; returns when the training loop may continue."""
    load: Callable[[int], None]
    """Load the checkpoint of ``step`` into the live model and optimizer, in place."""
    path: Callable[[int], str]
    """Local file or directory holding the checkpoint of ``step`` (once durable)."""
    wait_staging: Callable[[], None] = _noop
    """Block until the snapshot is copied (asynchronous staging); before the next optimizer step."""
    wait: Callable[[], None] = _noop
    """Block until the last save finished writing."""
    done: Callable[[], bool] = _always
    """Whether the last save finished writing."""
    delete: Callable[[int], None] | None = None
    """Remove the checkpoint of ``step``; default: remove ``path(step)``."""
    close: Callable[[], None] = _noop


@dataclass
class ContenderInfo:
    name: str
    factory: Callable[[Context], Contender]
    description: str
    background: bool
    """The write continues after ``save`` returns."""
    fsyncs: bool
    """The write is fsynced, so 'durable' really is durable (False: data may still be in the page cache)."""
    requires: list[str] = field(default_factory=list)
    """Modules that must be importable (an adapter not built yet is skipped, with the reason)."""
    requires_env: list[str] = field(default_factory=list)
    """Environment variables that must be set (e.g. a server that ``benchmarks/replication.py`` starts)."""

    def unavailable(self) -> str | None:
        missing = [m for m in self.requires if not _importable(m)] + [
            v for v in self.requires_env if v not in os.environ
        ]
        return f"needs {', '.join(missing)}" if missing else None


CONTENDERS: dict[str, ContenderInfo] = {}


def contender(
    name: str,
    description: str,
    *,
    background: bool,
    fsyncs: bool,
    requires: tuple[str, ...] = (),
    requires_env: tuple[str, ...] = (),
) -> Callable[[Callable[[Context], Contender]], Callable[[Context], Contender]]:
    """Register a contender factory under ``name`` (the order of registration is the report's order)."""

    def register(factory: Callable[[Context], Contender]) -> Callable[[Context], Contender]:
        info = ContenderInfo(name, factory, description, background, fsyncs, list(requires), list(requires_env))
        CONTENDERS[name] = info
        return factory

    return register


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def _file_in(ctx: Context, suffix: str) -> Callable[[int], str]:
    return lambda step: os.path.join(ctx.directory, f"step_{step:06d}{suffix}")


def _plain_state_dicts(work: Workload) -> dict[str, Any]:
    return {"model": work.model.state_dict(), "optimizer": work.optimizer.state_dict()}


def _restore_plain(work: Workload, loaded: dict[str, Any]) -> None:
    work.model.load_state_dict(loaded["model"])
    work.optimizer.load_state_dict(loaded["optimizer"])


# -- what users use today ------------------------------------------------------------------------


@contender("torch.save", "torch.save of the model and optimizer state_dicts", background=False, fsyncs=False)
def torch_save(ctx: Context) -> Contender:
    path = _file_in(ctx, ".pt")
    return Contender(
        save=lambda step: torch.save(_plain_state_dicts(ctx.work), path(step)),
        load=lambda step: _restore_plain(ctx.work, torch.load(path(step), map_location="cpu", weights_only=True)),
        path=path,
    )


def _lightning_checkpoint(work: Workload, step: int) -> dict[str, Any]:
    """The dict a Lightning Trainer hands to its CheckpointIO (the parts carrying tensors, and counters)."""
    import lightning

    return {
        "epoch": 0,
        "global_step": step,
        "pytorch-lightning_version": lightning.__version__,
        "state_dict": work.model.state_dict(),
        "loops": {},
        "callbacks": {},
        "optimizer_states": [work.optimizer.state_dict()],
        "lr_schedulers": [],
    }


def _lightning_restore(work: Workload, checkpoint: dict[str, Any]) -> None:
    work.model.load_state_dict(checkpoint["state_dict"])
    work.optimizer.load_state_dict(checkpoint["optimizer_states"][0])


@contender(
    "Lightning TorchCheckpointIO",
    "Lightning's default CheckpointIO (torch.save into memory, then an fsspec write)",
    background=False,
    fsyncs=False,
    requires=("lightning",),
)
def lightning_torch_io(ctx: Context) -> Contender:
    from lightning.pytorch.plugins.io import TorchCheckpointIO

    io = TorchCheckpointIO()
    path = _file_in(ctx, ".ckpt")
    return Contender(
        save=lambda step: io.save_checkpoint(_lightning_checkpoint(ctx.work, step), path(step)),
        load=lambda step: _lightning_restore(ctx.work, io.load_checkpoint(path(step), weights_only=True)),
        path=path,
    )


@contender(
    "Lightning AsyncCheckpointIO",
    "Lightning's AsyncCheckpointIO around TorchCheckpointIO (clones the state, writes in a thread)",
    background=True,
    fsyncs=False,
    requires=("lightning",),
)
def lightning_async_io(ctx: Context) -> Contender:
    from lightning.pytorch.plugins.io import AsyncCheckpointIO, TorchCheckpointIO

    io = AsyncCheckpointIO(TorchCheckpointIO())
    path = _file_in(ctx, ".ckpt")
    marker: list[Any] = []

    def save(step: int) -> None:
        io.save_checkpoint(_lightning_checkpoint(ctx.work, step), path(step))
        # AsyncCheckpointIO keeps no handle on the write; its executor has one worker, so a no-op queued
        # behind the write completes exactly when the write does.
        marker[:] = [io._executor.submit(_noop)]

    def wait() -> None:
        if marker:
            marker[0].result()
        if io._error is not None:
            raise io._error

    return Contender(
        save=save,
        load=lambda step: _lightning_restore(ctx.work, io.load_checkpoint(path(step), weights_only=True)),
        path=path,
        wait=wait,
        done=lambda: not marker or marker[0].done(),
        close=io.teardown,
    )


@contender(
    "Accelerate save_state",
    "Accelerator.save_state (safetensors model, torch.save optimizer, RNG states)",
    background=False,
    fsyncs=False,
    requires=("accelerate",),
)
def accelerate_save_state(ctx: Context) -> Contender:
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    ctx.work.model, ctx.work.optimizer = accelerator.prepare(ctx.work.model, ctx.work.optimizer)
    path = _file_in(ctx, "")
    return Contender(
        save=lambda step: accelerator.save_state(path(step)),
        load=lambda step: accelerator.load_state(path(step)),
        path=path,
    )


def _dcp_state(work: Workload) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(work.model, work.optimizer)
    return {"model": model_sd, "optimizer": optim_sd}


def _dcp_load(work: Workload, path: str) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    state = _dcp_state(work)
    dcp.load(state, checkpoint_id=path)
    set_state_dict(work.model, work.optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


@contender(
    "dcp.save",
    "torch.distributed.checkpoint.save of get_state_dict(model, optimizer)",
    background=False,
    fsyncs=True,
)
def dcp_save(ctx: Context) -> Contender:
    import torch.distributed.checkpoint as dcp

    path = _file_in(ctx, "")
    return Contender(
        save=lambda step: dcp.save(_dcp_state(ctx.work), checkpoint_id=path(step)),
        load=lambda step: _dcp_load(ctx.work, path(step)),
        path=path,
    )


@contender(
    "dcp.async_save",
    "torch.distributed.checkpoint.async_save with defaults (thread, internal stager per call)",
    background=True,
    fsyncs=True,
)
def dcp_async_save(ctx: Context) -> Contender:
    import torch.distributed.checkpoint as dcp

    path = _file_in(ctx, "")
    futures: list[Any] = []

    def save(step: int) -> None:
        futures[:] = [dcp.async_save(_dcp_state(ctx.work), checkpoint_id=path(step))]

    return Contender(
        save=save,
        load=lambda step: _dcp_load(ctx.work, path(step)),
        path=path,
        wait=lambda: futures[0].result() if futures else None,
        done=lambda: not futures or futures[0].done(),
    )


@contender(
    "dcp.async_save process",
    "torch.distributed.checkpoint.async_save in DCP's writer process, one reused shared-memory DefaultStager",
    background=True,
    fsyncs=True,
)
def dcp_async_save_process(ctx: Context) -> Contender:
    import tempfile

    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
    from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType

    if not dist.is_initialized():  # DCP's writer process needs a process group, even for one rank
        store = os.path.join(tempfile.mkdtemp(prefix="dcp-store-"), "store")
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    path = _file_in(ctx, "")
    stager = DefaultStager(StagingOptions(False, True, False, False))  # shared memory, synchronous copy
    futures: list[Any] = []

    def save(step: int) -> None:
        response = dcp.async_save(
            _dcp_state(ctx.work),
            checkpoint_id=path(step),
            async_checkpointer_type=AsyncCheckpointerType.PROCESS,
            async_stager=stager,
        )
        futures[:] = [getattr(response, "upload_completion", response)]

    return Contender(
        save=save,
        load=lambda step: _dcp_load(ctx.work, path(step)),
        path=path,
        wait=lambda: futures[0].result() if futures else None,
        done=lambda: not futures or futures[0].done(),
        close=stager.close,
    )


# -- dcp-plugin ----------------------------------------------------------------------------------


def _manager_contender(ctx: Context, **options: Any) -> Contender:
    from dcp_plugin import CheckpointManager

    manager = CheckpointManager(ctx.directory, distributed=False, **options)
    state = {"model": ctx.work.model, "optimizer": ctx.work.optimizer}
    return Contender(
        save=lambda step: manager.save(step, state),
        load=lambda step: manager.load(state, step=step),
        path=lambda step: manager.storage.find_step(step).url,
        wait_staging=manager.wait_for_staging,
        wait=manager.wait,
        done=lambda: manager.engine.in_flight is None,
        delete=lambda step: manager.delete(step),
        close=manager.close,
    )


def _plugin(name: str, description: str, *, background: bool, **options: Any) -> None:
    contender(name, description, background=background, fsyncs=True)(lambda ctx: _manager_contender(ctx, **options))


_plugin("dcp-plugin sync", "CheckpointManager(async_mode='sync')", background=False, async_mode="sync")
_plugin(
    "dcp-plugin thread",
    "CheckpointManager(async_mode='thread', async_staging=False): the snapshot copied before save returns",
    background=True,
    async_mode="thread",
    async_staging=False,
)
_plugin(
    "dcp-plugin thread+staging",
    "CheckpointManager(async_mode='thread', async_staging=True): the defaults",
    background=True,
    async_mode="thread",
    async_staging=True,
)
_plugin(
    "dcp-plugin process",
    "CheckpointManager(async_mode='process', async_staging=False): the snapshot copied before save returns",
    background=True,
    async_mode="process",
    async_staging=False,
)
_plugin(
    "dcp-plugin thread, writer_nice=0",
    "CheckpointManager(async_mode='thread', async_staging=False, writer_nice=0): the writer at the training priority",
    background=True,
    async_mode="thread",
    async_staging=False,
    writer_nice=0,
)
_plugin(
    "dcp-plugin process, writer_nice=0",
    "CheckpointManager(async_mode='process', async_staging=False, writer_nice=0): the writer at the training priority",
    background=True,
    async_mode="process",
    async_staging=False,
    writer_nice=0,
)
_plugin(
    "dcp-plugin process+staging",
    "CheckpointManager(async_mode='process', async_staging=True)",
    background=True,
    async_mode="process",
    async_staging=True,
)


REMOTE_URL_ENV = "BENCH_REMOTE_URL"
REMOTE_OPTIONS_ENV = "BENCH_REMOTE_OPTIONS"


@contender(
    "dcp-plugin thread+staging, replicated",
    "CheckpointManager(async_mode='thread', async_staging=True, remote=$BENCH_REMOTE_URL): every checkpoint is "
    "copied to the remote tier in the background (benchmarks/replication.py starts an S3 server for it)",
    background=True,
    fsyncs=True,
    requires_env=(REMOTE_URL_ENV,),
)
def replicated(ctx: Context) -> Contender:
    import json
    import uuid

    remote = f"{os.environ[REMOTE_URL_ENV].rstrip('/')}/{uuid.uuid4().hex[:8]}"
    options = json.loads(os.environ.get(REMOTE_OPTIONS_ENV) or "{}")
    return _manager_contender(
        ctx, async_mode="thread", async_staging=True, remote=remote, remote_storage_options=options
    )


@contender(
    "dcp-plugin Lightning DCPCheckpointIO",
    "DCPCheckpointIO(async_mode='thread') given the dict a Lightning Trainer saves",
    background=True,
    fsyncs=True,
    requires=("lightning", "dcp_plugin.lightning"),
)
def lightning_dcp_io(ctx: Context) -> Contender:
    from dcp_plugin.lightning import DCPCheckpointIO

    io = DCPCheckpointIO(async_mode="thread")
    path = _file_in(ctx, ".ckpt")
    return Contender(
        save=lambda step: io.save_checkpoint(_lightning_checkpoint(ctx.work, step), path(step)),
        load=lambda step: _lightning_restore(ctx.work, io.load_checkpoint(path(step), weights_only=True)),
        path=path,
        wait_staging=io.wait_for_staging,
        wait=io.wait,
        done=lambda: io.in_flight is None,
        delete=lambda step: io.remove_checkpoint(path(step)),
        close=io.teardown,
    )


@contender(
    "dcp-plugin Accelerate save_state",
    "Accelerator.save_state with dcp_plugin.accelerate.enable(async_mode='thread')",
    background=True,
    fsyncs=True,
    requires=("accelerate", "dcp_plugin.accelerate"),
)
def accelerate_dcp(ctx: Context) -> Contender:
    from accelerate import Accelerator

    from dcp_plugin.accelerate import enable

    accelerator = Accelerator(cpu=True)
    ctx.work.model, ctx.work.optimizer = accelerator.prepare(ctx.work.model, ctx.work.optimizer)
    checkpointer = enable(accelerator, async_mode="thread")
    assert checkpointer is not None, "DCP_PLUGIN_ENABLE=0 is set in the environment"
    path = _file_in(ctx, "")
    return Contender(
        save=lambda step: accelerator.save_state(path(step)),
        load=lambda step: accelerator.load_state(path(step)),
        path=path,
        wait_staging=checkpointer.engine.wait_for_staging,
        wait=checkpointer.engine.wait,
        done=lambda: checkpointer.engine.in_flight is None,
        close=accelerator.end_training,
    )


RAW_DISK = "raw disk"
"""Not a contender: sequential write + fsync (and read) of the same number of bytes, run interleaved."""


def remove_checkpoint(c: Contender, step: int) -> None:
    if c.delete is not None:
        c.delete(step)
    else:
        diskio.remove(c.path(step))
