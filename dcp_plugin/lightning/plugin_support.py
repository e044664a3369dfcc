"""What ``DCPCheckpointIO`` needs besides the translation itself: reading ``torch.save`` files, placing loaded
tensors, closing checkpointers, the optimizer hook of async staging, and what a copy of the plugin keeps."""

from __future__ import annotations

import logging
import os
import time
import warnings
import weakref
from collections.abc import Callable, Mapping
from typing import Any, Optional

import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch.optim.optimizer import register_optimizer_step_pre_hook

from dcp_plugin.checkpointer import Checkpointer
from dcp_plugin.engine import inflight
from dcp_plugin.engine.stats import SaveStats
from dcp_plugin.errors import CheckpointNotFoundError
from dcp_plugin.format.state import RNGState
from dcp_plugin.lightning import layout as lay
from dcp_plugin.lightning.nodes import node_directories
from dcp_plugin.logs import ROOT
from dcp_plugin.storage import CheckpointInfo, CheckpointStorage

log = logging.getLogger(__name__)


def wait_for_staging_before_optimizer_steps(writers: Any) -> Any:
    """Stock strategies hand the plugin plain state dicts, not the optimizers; a global step pre-hook makes every
    optimizer wait until the background copy of the snapshot is done before it changes parameters (``writers``:
    anything with ``wait_for_staging()``, held weakly)."""
    ref = weakref.ref(writers)

    def wait_for_staging(*_args: Any, **_kwargs: Any) -> None:
        live = ref()
        if live is not None:
            live.wait_for_staging()

    return register_optimizer_step_pre_hook(wait_for_staging)


def load_dict(plugin: Any, path: Any, storage: CheckpointStorage, name: str, *, allow_pickle: bool) -> dict[str, Any]:
    """Read the committed checkpoint ``name`` (at ``path``) with ``plugin``'s checkpointer as a Lightning dict."""
    started = time.perf_counter()
    nodes = plugin.config.local_scope == "node"  # node-local disks: found and restored across the nodes
    info = node_directories(plugin).info(storage, name) if nodes else committed_info(storage, name, path)
    layout = lay.Layout.from_manifest(info.manifest, info.url)
    state = lay.load_targets(info.manifest, rng=RNGState() if layout.rng and plugin.save_rng else None)
    if nodes:
        node_directories(plugin).load(storage, name, state, allow_pickle=allow_pickle)
    else:
        plugin.checkpointer().load((storage, name), state, allow_pickle=allow_pickle)
    report("Loaded checkpoint %s (step %s) in %.2f s", info.url, info.step, time.perf_counter() - started)
    return lightning_dict(state, layout)


def committed_info(storage: CheckpointStorage, name: str, path: str | os.PathLike[str]) -> CheckpointInfo:
    """The committed checkpoint ``name``; if there is none, the project's :class:`CheckpointNotFoundError` (a
    ``FileNotFoundError``) that also starts with Lightning's own text for a missing checkpoint
    (``Checkpoint file not found: <path>``), which code written for Lightning's default plugin matches on."""
    try:
        return storage.info(name)
    except CheckpointNotFoundError as err:
        raise CheckpointNotFoundError(f"Checkpoint file not found: {os.fspath(path)}. {err}") from err


def wait_for_write(checkpointers: list[Checkpointer], url: str) -> None:
    """Wait until ``url`` is not being written: by one of ``checkpointers`` (raising its error), or by any other
    instance in this process."""
    for checkpointer in checkpointers:
        if checkpointer.in_flight is not None and checkpointer.in_flight.url == url:
            checkpointer.wait()
    inflight.wait_for(url)


def deprecated_manager_for(checkpointer: Checkpointer, directory: Any) -> Any:
    from dcp_plugin.manager import CheckpointManager

    warnings.warn(
        "DCPCheckpointIO.manager_for() is deprecated: use CheckpointManager(directory, "
        "checkpointer=plugin.checkpointer(collective)).",
        DeprecationWarning,
        stacklevel=3,
    )
    root = directory.root_url if isinstance(directory, CheckpointStorage) else os.fspath(directory)
    return CheckpointManager(root, checkpointer=checkpointer)


def lightning_dict(entries: Mapping[str, Any], layout: lay.Layout) -> dict[str, Any]:
    """The Lightning checkpoint dict of loaded entries (optimizer states keyed by parameter id, as
    ``Optimizer.load_state_dict`` wants them, whatever strategy wrote them)."""
    checkpoint = lay.join_checkpoint(entries, layout)
    if layout.kind == lay.SHARDED:  # written by a sharded strategy with FQN keys
        checkpoint["optimizer_states"] = [lay.id_keyed_optimizer_state(o) for o in checkpoint["optimizer_states"]]
    return checkpoint


def report(message: str, *args: Any) -> None:
    """A line Lightning users see by default: logged through Lightning's own rank-zero info logging (the
    ``lightning.pytorch`` logger, which Lightning gives a handler unless the application configured logging), like
    Lightning's own "Restoring states from the checkpoint path at ..." line. The library installs no handler;
    hide these lines with the ``lightning.pytorch`` logger's level, or by raising the ``dcp_plugin`` logger's
    level above INFO (``DCP_PLUGIN_LOG_LEVEL=WARNING``)."""
    if logging.getLogger(ROOT).level > logging.INFO:
        return
    rank_zero_info(message % args)


def log_save(stats: SaveStats, mode: str) -> None:
    """One line per save: where, which step, and how long training waited."""
    if mode == "sync":
        report("Saved checkpoint %s (step %s) in %.2f s", stats.url, stats.step, stats.blocking_s)
    else:
        report(
            "Saving checkpoint %s (step %s) in the background (%s mode); training waited %.3f s",
            stats.url,
            stats.step,
            mode,
            stats.blocking_s,
        )


def close_all(checkpointers: list[Checkpointer]) -> None:
    """Close every checkpointer, then raise the first error."""
    first: BaseException | None = None
    for checkpointer in checkpointers:
        try:
            checkpointer.close()
        except BaseException as err:  # noqa: BLE001 - close the rest, then raise the first
            first = first or err
    if first is not None:
        raise first


def load_torch_file(
    storage: CheckpointStorage, name: str, map_location: Any, weights_only: Optional[bool]
) -> dict[str, Any]:
    log.info("%s is a file, not a DCP checkpoint directory; reading it with torch.load.", storage.url(name))
    with storage.open_file(name) as handle:
        try:
            return torch.load(handle, map_location=map_location, weights_only=weights_only)
        except Exception as err:
            raise lay.LightningCheckpointError(
                f"{storage.url(name)} is a file, not a dcp-plugin checkpoint directory, and torch.load could not "
                f"read it ({type(err).__name__}: {err}). If you trust the file and it holds Python objects, load "
                "it with weights_only=False; otherwise pass the directory of a checkpoint written by DCPCheckpointIO."
            ) from err


def map_tensors(value: Any, map_location: Any) -> Any:
    if map_location is None or callable(map_location):
        return value  # loaded on CPU; torch.load-style callables have no storages to remap here
    if isinstance(map_location, Mapping):
        target = map_location.get("cpu")
        if target is None:
            return value
        map_location = target
    device = torch.device(map_location)
    if device.type == "cpu":
        return value
    return _apply(value, lambda t: t.to(device))


def _apply(value: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, dict):
        mapped = {k: _apply(v, fn) for k, v in value.items()}
        return mapped if type(value) is dict else type(value)(mapped)
    if isinstance(value, list):
        return [_apply(v, fn) for v in value]
    if isinstance(value, tuple):
        return tuple(_apply(v, fn) for v in value)
    return value
