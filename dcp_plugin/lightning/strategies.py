"""Strategy glue for sharded training: every rank saves its own shards through ``DCPCheckpointIO``.

Lightning's ``ModelParallelStrategy`` and ``FSDPStrategy`` bypass the ``CheckpointIO`` plugin and call
``dcp.save`` synchronously. Their subclasses here route ``save_checkpoint`` / ``load_checkpoint`` through
the plugin instead: all ranks join one asynchronous collective save, each writing its own shards; the
model and optimizers are stored by parameter name (live objects, no extra copy before the stager's), and
loading happens in place after setup, resharding to the current number of ranks.

Use: ``Trainer(strategy=DCPModelParallelStrategy(...), plugins=[DCPCheckpointIO(...)])`` — the plugin is
optional (defaults apply without it).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Mapping
from typing import Any, Optional

from lightning.pytorch.accelerators import CUDAAccelerator
from lightning.pytorch.core.optimizer import LightningOptimizer
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
from lightning.pytorch.trainer.states import TrainerFn
from torch.optim import Optimizer

from dcp_plugin.engine import inflight
from dcp_plugin.format.state import ModelState, OptimizerState, RNGState
from dcp_plugin.lightning import compat
from dcp_plugin.lightning import layout as lay
from dcp_plugin.lightning.checkpoint_io import DCPCheckpointIO
from dcp_plugin.lightning.nodes import node_directories
from dcp_plugin.lightning.plugin_support import committed_info, report


class _LiveState(Mapping):
    """A Stateful that is also a read-only mapping, so hooks reading ``checkpoint["state_dict"]`` still
    see tensors; the state dict is only computed if someone looks (the save expands it itself)."""

    _cache: dict[str, Any] | None = None

    def _materialized(self) -> dict[str, Any]:
        if self._cache is None:
            self._cache = self.state_dict()  # type: ignore[attr-defined]
        return self._cache

    def __getitem__(self, key: str) -> Any:
        return self._materialized()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._materialized())

    def __len__(self) -> int:
        return len(self._materialized())


class LiveModelState(_LiveState, ModelState):
    """The model's sharded state under FQN keys, taken when the checkpoint is written."""


class LiveOptimizerState(_LiveState, OptimizerState):
    """An optimizer's sharded state under FQN keys, taken when the checkpoint is written."""


class _DCPStrategyMixin:
    """Overrides shared by the DCP strategies (placed before the Lightning strategy in the MRO)."""

    _checkpoint_io: Any
    lightning_strategy: type
    """The Lightning strategy this one extends (named in error messages)."""
    saves_collectively = True
    """Every rank joins each save, each writing its own shards (see :mod:`dcp_plugin.lightning.first_save`)."""

    @property
    def checkpoint_io(self) -> DCPCheckpointIO:
        plugin = self._checkpoint_io = compat.without_async(self._checkpoint_io)
        if plugin is None:
            plugin = self._checkpoint_io = DCPCheckpointIO()
        if not isinstance(plugin, DCPCheckpointIO):
            raise TypeError(
                f"{type(self).__name__} saves through DCPCheckpointIO, but the Trainer was given "
                f"{type(plugin).__name__}. Pass plugins=[DCPCheckpointIO(...)] (or none for the defaults), or use "
                f"Lightning's own {self.lightning_strategy.__name__} with other CheckpointIO plugins."
            )
        return plugin

    @checkpoint_io.setter
    def checkpoint_io(self, plugin: Any) -> None:
        self._checkpoint_io = plugin

    # -- what dump_checkpoint collects: live objects, expanded only when the save stages them ----
    def lightning_module_state_dict(self) -> Any:
        return LiveModelState(self.model)  # type: ignore[attr-defined]

    def optimizer_state(self, optimizer: Optimizer) -> Any:
        if isinstance(optimizer, LightningOptimizer):
            optimizer = optimizer.optimizer
        return LiveOptimizerState(self.model, optimizer)  # type: ignore[attr-defined]

    def load_model_state_dict(self, checkpoint: Mapping[str, Any], strict: bool = True) -> None:
        pass  # loaded in place by load_checkpoint()

    def load_optimizer_state_dict(self, checkpoint: Mapping[str, Any]) -> None:
        pass  # loaded in place by load_checkpoint()

    # -- saving ----------------------------------------------------------------------------------
    def save_checkpoint(
        self,
        checkpoint: dict[str, Any],
        filepath: str | os.PathLike[str],
        storage_options: Optional[Any] = None,
    ) -> None:
        """Called on every rank: all ranks join one collective save, each writing its own shards."""
        plugin = self.checkpoint_io
        path = self.broadcast(os.fspath(filepath))  # type: ignore[attr-defined]
        checkpoint = dict(checkpoint)
        metadata, run_id = lay.pop_manifest_metadata(checkpoint)
        optimizers = list(checkpoint.get("optimizer_states", []))
        names = tuple(lay.optimizer_entry(i) for i in range(len(optimizers)))
        entries, has_extra = lay.split_checkpoint(checkpoint, skip=("optimizer_states",), reserved=names)
        entries.update(zip(names, optimizers))
        if plugin.save_rng:
            entries[lay.RNG_ENTRY] = RNGState()
        layout = lay.Layout(kind=lay.SHARDED, optimizers=len(optimizers), rng=plugin.save_rng, extra=has_extra)
        plugin.save_entries(
            path,
            lay.step_of(checkpoint),
            entries,
            layout,
            collective=True,
            storage_options=storage_options,
            metadata=metadata,
            run_id=run_id,
        )

    def remove_checkpoint(self, filepath: str | os.PathLike[str]) -> None:
        if self.is_global_zero:  # type: ignore[attr-defined]
            self.checkpoint_io.remove_checkpoint(filepath)

    # -- loading ---------------------------------------------------------------------------------
    def load_checkpoint(self, checkpoint_path: str | os.PathLike[str], weights_only: Optional[bool] = None) -> dict:
        """Called on every rank after setup: load in place into the sharded model (and optimizers when
        fitting), whatever number of ranks wrote the checkpoint."""
        plugin = self.checkpoint_io
        path = self.broadcast(os.fspath(checkpoint_path))  # type: ignore[attr-defined]
        started = time.perf_counter()
        storage, name = plugin.locate(path)
        inflight.wait_for(storage.url(name))  # a save of this path still in flight in this process
        if storage.is_file(name) or (not storage.is_committed(name) and _is_lightning_sharded(storage, path)):
            # a torch.save file or Lightning's own sharded format: Lightning's loader handles both
            return super().load_checkpoint(path, weights_only=weights_only)  # type: ignore[misc]
        nodes = plugin.config.local_scope == "node"  # node-local disks: found and restored across the nodes
        info = node_directories(plugin).info(storage, name) if nodes else committed_info(storage, name, path)
        layout = lay.Layout.from_manifest(info.manifest, info.url)
        module = self.lightning_module  # type: ignore[attr-defined]
        fitting = module.trainer.state.fn == TrainerFn.FITTING
        live_optimizers = list(self.optimizers) if fitting else []  # type: ignore[attr-defined]
        saved = info.manifest.get("entries", {})

        state: dict[str, Any] = {}
        for entry in saved:
            if entry == lay.RNG_ENTRY or (layout.kind == lay.SHARDED and entry.startswith(lay.OPTIMIZER_PREFIX)):
                continue
            state[entry] = ModelState(self.model) if entry == "state_dict" else None  # type: ignore[attr-defined]
        if layout.kind == lay.SHARDED:
            for index, optimizer in enumerate(live_optimizers[: layout.optimizers]):
                state[lay.optimizer_entry(index)] = OptimizerState(self.model, optimizer)  # type: ignore[attr-defined]
        elif live_optimizers and "optimizer_states" in saved:
            raise lay.LightningCheckpointError(
                f"{info.url} was written by a single-device/DDP run: its optimizer state is keyed by parameter id "
                "and cannot be resharded. Resume it with the strategy that wrote it, or start a new fit from its "
                "weights (trainer.validate/test can load it)."
            )
        if layout.rng and plugin.save_rng and fitting:
            state[lay.RNG_ENTRY] = RNGState()
        options = {"strict": module.strict_loading, "allow_pickle": plugin.allow_pickle_for(weights_only)}
        if nodes:
            node_directories(plugin).load(storage, name, state, **options)
        else:
            plugin.checkpointer(collective=True).load((storage, name), state, **options)

        values = {k: v for k, v in state.items() if not isinstance(v, (ModelState, OptimizerState, RNGState))}
        checkpoint = lay.join_checkpoint(values, layout)
        checkpoint["state_dict"] = ModelState(self.model).state_dict()  # type: ignore[attr-defined]
        checkpoint["optimizer_states"] = [OptimizerState(self.model, o).state_dict() for o in live_optimizers]  # type: ignore[attr-defined]
        if self.is_global_zero:  # type: ignore[attr-defined]
            report("Loaded checkpoint %s (step %s) in %.2f s", info.url, info.step, time.perf_counter() - started)
        return checkpoint

    # -- lifecycle -------------------------------------------------------------------------------
    def teardown(self) -> None:
        """Flush the save in flight and raise its error (Lightning's sharded strategies skip this)."""
        try:
            if self._checkpoint_io is not None:
                self.checkpoint_io.teardown()
        finally:
            super().teardown()  # type: ignore[misc]


def _is_lightning_sharded(storage: Any, path: str) -> bool:
    """Whether ``path`` holds Lightning's own sharded format: a local directory with a DCP ``.metadata``
    (the test Lightning's loader applies; written here so no private Lightning helper is needed)."""
    return storage.is_local and os.path.isfile(os.path.join(path, ".metadata"))


class DCPModelParallelStrategy(_DCPStrategyMixin, ModelParallelStrategy):
    """``ModelParallelStrategy`` (FSDP2 / tensor parallel) whose checkpoints go through ``DCPCheckpointIO``:
    asynchronous, every rank writing its own shards, committed atomically, resharding on load.

    Takes the same arguments as ``ModelParallelStrategy``; ``save_distributed_checkpoint`` is ignored
    (checkpoints are always sharded DCP directories, which any number of ranks can load).
    """

    lightning_strategy = ModelParallelStrategy
    """Lightning's ``ModelParallelStrategy``, which this one extends (named in error messages)."""


class DCPFSDPStrategy(_DCPStrategyMixin, FSDPStrategy):
    """``FSDPStrategy`` whose checkpoints go through ``DCPCheckpointIO`` (sharded, asynchronous, resharding).

    Takes the same arguments as ``FSDPStrategy``; ``state_dict_type`` is ignored (checkpoints are always
    sharded DCP directories, which any number of ranks can load). Like Lightning's, it needs CUDA: FSDP (the first
    version, ``FullyShardedDataParallel``) does not run on CPU, so a CPU accelerator is refused when the ``Trainer``
    is built. On CPU, ``DCPModelParallelStrategy`` shards with FSDP2 (``fully_shard``) over gloo.
    """

    lightning_strategy = FSDPStrategy
    """Lightning's ``FSDPStrategy``, which this one extends (named in error messages)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        _require_cuda(self._accelerator)

    @property
    def accelerator(self) -> Any:
        """The Lightning accelerator; setting one that is not CUDA raises ``ValueError`` (FSDP needs CUDA)."""
        return self._accelerator

    @accelerator.setter
    def accelerator(self, accelerator: Any) -> None:
        _require_cuda(accelerator)  # the Trainer sets it while it is built
        self._accelerator = accelerator


def _require_cuda(accelerator: Any) -> None:
    """Refuse what Lightning refuses for its own ``FSDPStrategy`` (it checks the exact class, so not subclasses)."""
    if accelerator is not None and not isinstance(accelerator, CUDAAccelerator):
        raise ValueError(
            f"DCPFSDPStrategy needs a CUDA accelerator, got {type(accelerator).__name__}: FSDP "
            "(FullyShardedDataParallel) does not run on CPU, and training would fail inside torch at setup. On CPU, "
            "use strategy=DCPModelParallelStrategy() with a LightningModule whose configure_model() shards with "
            "torch.distributed.fsdp.fully_shard (FSDP2 runs with gloo); on GPUs, pass accelerator='cuda'."
        )
