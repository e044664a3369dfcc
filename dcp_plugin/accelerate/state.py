"""What an Accelerate checkpoint contains, gathered from a live ``Accelerator`` and given back to it.

The same things Accelerate's ``save_state`` writes, under the same names, but as one DCP checkpoint:

=========================  =========================================================  ==========
entry                      content                                                    per rank
=========================  =========================================================  ==========
``model``, ``model_1``..   prepared models, FQN keys (sharded when the model is)      no
``optimizer``, ...         optimizers, keyed by parameter FQN                          no
``scheduler``, ...         ``scheduler.state_dict()``                                  no
``dataloader``, ...        epoch counter, sampler seed/epoch and shuffling generator  no
``dataloader_state``, ...  ``state_dict()`` of stateful data loaders                   yes
``scaler``                 ``GradScaler.state_dict()``                                 no
``custom_checkpoint_0``..  objects passed to ``register_for_checkpointing``            no
``random_states``          Python, NumPy, torch (and CUDA) generators                  yes
``save_state_hook_files``  files written by ``register_save_state_pre_hook`` hooks       no
``accelerator``            ``accelerator.step`` and the save ``iteration``            no
=========================  =========================================================  ==========
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from dcp_plugin.accelerate.hooks import HOOK_FILES_ENTRY
from dcp_plugin.format.state import ModelState, OptimizerState, PerRank, RNGState

ACCELERATOR_ENTRY = "accelerator"
RNG_ENTRY = "random_states"


def indexed(name: str, index: int) -> str:
    """Accelerate's naming: the first object has the bare name, later ones ``_<index>``."""
    return name if index == 0 else f"{name}_{index}"


class DataLoaderProgress:
    """Where a prepared data loader is in its epochs: what decides the next shuffle order.

    Accelerate's ``save_state`` keeps only a ``SeedableRandomSampler``; the loader's epoch counter
    (``iteration``, which re-seeds that sampler) and the shuffling generator it synchronizes across
    processes are lost, so a resumed run shuffles differently. Both are kept here.
    """

    def __init__(self, dataloader: Any, *, for_load: bool = False) -> None:
        self.dataloader = dataloader
        # As a load target, offer no tensors: a checkpoint from another world size may lack the
        # generator (one process shuffles with the global RNG) and that is not an error.
        self.for_load = for_load

    def _sampler(self) -> Any:
        from accelerate.data_loader import get_sampler

        try:
            sampler = get_sampler(self.dataloader)
        except AttributeError:
            sampler = None
        if sampler is None:
            # On several processes the batch sampler is a BatchSamplerShard around the original one.
            inner = getattr(getattr(self.dataloader, "batch_sampler", None), "batch_sampler", None)
            sampler = getattr(inner, "sampler", None)
        return sampler

    def _generator(self, sampler: Any) -> torch.Generator | None:
        generator = getattr(self.dataloader, "synchronized_generator", None)
        if not isinstance(generator, torch.Generator):
            generator = getattr(sampler, "generator", None)
        return generator if isinstance(generator, torch.Generator) else None

    def state_dict(self) -> dict[str, Any]:
        from accelerate.data_loader import SeedableRandomSampler

        state: dict[str, Any] = {}
        iteration = getattr(self.dataloader, "iteration", None)
        if isinstance(iteration, int):
            state["iteration"] = iteration
        sampler = self._sampler()
        if isinstance(sampler, SeedableRandomSampler):
            state["sampler_epoch"] = int(sampler.epoch)
            state["sampler_initial_seed"] = int(sampler.initial_seed)
        generator = self._generator(sampler)
        if generator is not None and not self.for_load:
            state["generator"] = generator.get_state()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if "iteration" in state:
            self.dataloader.iteration = int(state["iteration"])
        sampler = self._sampler()
        if "sampler_epoch" in state and sampler is not None:
            sampler.epoch = int(state["sampler_epoch"])
            sampler.initial_seed = int(state["sampler_initial_seed"])
        generator = self._generator(sampler)
        if "generator" in state and generator is not None:
            generator.set_state(state["generator"])


def _inner_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    # AcceleratedOptimizer wraps the real one; keying and loading work on the real one.
    return getattr(optimizer, "optimizer", optimizer)


def _model_for(optimizer: torch.optim.Optimizer, models: list[torch.nn.Module]) -> torch.nn.Module:
    """The module whose parameter names key ``optimizer``'s state: the prepared model holding all its
    parameters or, for an optimizer over several prepared models (allowed by Accelerate), a container of those
    models named as Accelerate names them (``model.<param>``, ``model_1.<param>``)."""
    wanted = {id(p) for group in optimizer.param_groups for p in group["params"]}
    for model in models:
        if wanted <= {id(p) for p in model.parameters()}:
            return model
    owners = {
        indexed("model", i): model for i, model in enumerate(models) if wanted & {id(p) for p in model.parameters()}
    }
    held = set().union(*({id(p) for p in m.parameters()} for m in owners.values())) if owners else set()
    if not wanted <= held:
        raise ValueError(
            f"An optimizer trains {len(wanted - held)} parameter(s) that no prepared model holds: prepare every "
            "model whose parameters an optimizer trains (accelerator.prepare(model, optimizer))."
        )
    return torch.nn.ModuleDict(owners)


def collect(
    accelerator: Any,
    iteration: int,
    *,
    for_load: bool = False,
    models: set[int] | None = None,
    hook_files: list | None = None,
) -> dict[str, Any]:
    """The state mapping for ``CheckpointManager.save`` / ``load`` (live objects, loaded in place).

    ``models``: indices of the prepared models to include (default all; Accelerate's state hooks may take some
    over). ``hook_files``: what save hooks wrote (see :mod:`dcp_plugin.accelerate.hooks`).
    """
    state: dict[str, Any] = {}
    prepared = list(accelerator._models)
    for i, model in enumerate(prepared):
        if models is None or i in models:
            state[indexed("model", i)] = ModelState(model)
    # GradScaler before the optimizers: loading a sharded optimizer may step it (see Accelerate's FSDP2 note).
    if accelerator.scaler is not None:
        state["scaler"] = accelerator.scaler
    for i, optimizer in enumerate(accelerator._optimizers):
        inner = _inner_optimizer(optimizer)
        state[indexed("optimizer", i)] = OptimizerState(_model_for(inner, prepared), inner)
    for i, scheduler in enumerate(accelerator._schedulers):
        state[indexed("scheduler", i)] = scheduler
    for i, dataloader in enumerate(accelerator._dataloaders):
        state[indexed("dataloader", i)] = DataLoaderProgress(dataloader, for_load=for_load)
        if getattr(dataloader, "use_stateful_dataloader", False):
            state[indexed("dataloader_state", i)] = PerRank(dataloader)
    for i, obj in enumerate(accelerator._custom_objects):
        state[f"custom_checkpoint_{i}"] = obj
    if hook_files is not None:
        state[HOOK_FILES_ENTRY] = hook_files
    state[RNG_ENTRY] = RNGState()
    state[ACCELERATOR_ENTRY] = {"step": int(accelerator.step), "iteration": int(iteration)}
    return state
