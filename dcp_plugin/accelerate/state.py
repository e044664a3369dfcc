"""What an Accelerate checkpoint contains, gathered from a live ``Accelerator`` and given back to it.

The same things Accelerate's ``save_state`` writes, under the same names, but as one DCP checkpoint:

=========================  =========================================================  ==========
entry                      content                                                    per rank
=========================  =========================================================  ==========
``model``, ``model_1``..   prepared models, FQN keys (sharded when the model is)      no
``optimizer``, ...         optimizers, keyed by parameter FQN                          no
``optimizer_parameters``   parameters optimizers train outside the prepared models    no
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

from dcp_plugin.accelerate.epochs import at_epoch_end, epoch_start_state, sampler_of, shuffling_generator
from dcp_plugin.accelerate.hooks import HOOK_FILES_ENTRY
from dcp_plugin.format.state import ModelState, OptimizerState, PerRank, RNGState

ACCELERATOR_ENTRY = "accelerator"
RNG_ENTRY = "random_states"
OPTIMIZER_PARAMETERS_ENTRY = "optimizer_parameters"
"""Values of the parameters an optimizer trains outside every prepared model (one entry per such optimizer)."""
OUTSIDE_PARAMETERS = "outside_models"


def indexed(name: str, index: int) -> str:
    """Accelerate's naming: the first object has the bare name, later ones ``_<index>``."""
    return name if index == 0 else f"{name}_{index}"


class DataLoaderProgress:
    """Where a prepared data loader is in its epochs: what decides the next shuffle order.

    Accelerate's ``save_state`` keeps only a ``SeedableRandomSampler``; the loader's epoch counter
    (``iteration``, which re-seeds that sampler) and the shuffling generator it synchronizes across
    processes are lost, so a resumed run shuffles differently. Both are kept here; during an epoch, the
    generator as that epoch began; at its last batch the epoch counts as finished (see
    :mod:`dcp_plugin.accelerate.epochs`).
    """

    def __init__(self, dataloader: Any, *, for_load: bool = False) -> None:
        self.dataloader = dataloader
        # As a load target, offer no tensors: a checkpoint from another world size may lack the
        # generator (one process shuffles with the global RNG) and that is not an error.
        self.for_load = for_load

    def state_dict(self) -> dict[str, Any]:
        from accelerate.data_loader import SeedableRandomSampler

        state: dict[str, Any] = {}
        iteration = getattr(self.dataloader, "iteration", None)
        if isinstance(iteration, int):
            state["iteration"] = iteration + 1 if at_epoch_end(self.dataloader) else iteration
        sampler = sampler_of(self.dataloader)
        if isinstance(sampler, SeedableRandomSampler):
            state["sampler_epoch"] = int(sampler.epoch)
            state["sampler_initial_seed"] = int(sampler.initial_seed)
        generator = shuffling_generator(self.dataloader, sampler)
        if generator is not None and not self.for_load:
            # mid-epoch: the state the epoch's order was drawn from, so that it can be drawn again on resume
            started = epoch_start_state(generator)
            state["generator"] = started if started is not None else generator.get_state()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if "iteration" in state:
            self.dataloader.iteration = int(state["iteration"])
        sampler = sampler_of(self.dataloader)
        if "sampler_epoch" in state and sampler is not None:
            sampler.epoch = int(state["sampler_epoch"])
            sampler.initial_seed = int(state["sampler_initial_seed"])
        generator = shuffling_generator(self.dataloader, sampler)
        if "generator" in state and generator is not None:
            generator.set_state(state["generator"])


def _inner_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    # AcceleratedOptimizer wraps the real one; keying and loading work on the real one.
    return getattr(optimizer, "optimizer", optimizer)


def _model_for(
    optimizer: torch.optim.Optimizer, models: list[torch.nn.Module]
) -> tuple[torch.nn.Module, torch.nn.Module | None]:
    """The module whose parameter names key ``optimizer``'s state, and the module holding the parameters it trains
    that no prepared model holds (``None`` when there are none).

    The keying module is the prepared model holding all its parameters or, for an optimizer over several prepared
    models (allowed by Accelerate) or over parameters outside every prepared model (CLIP's ``logit_scale``), a
    container named as Accelerate names the models (``model.<param>``, ``model_1.<param>``) plus
    ``outside_models.g<group>_<position>`` for the others: they are keyed by where they sit in the optimizer, as
    Accelerate keys all optimizer state.
    """
    wanted = {id(p) for group in optimizer.param_groups for p in group["params"]}
    for model in models:
        if wanted <= {id(p) for p in model.parameters()}:
            return model, None
    owners: dict[str, torch.nn.Module] = {
        indexed("model", i): model for i, model in enumerate(models) if wanted & {id(p) for p in model.parameters()}
    }
    held = set().union(*({id(p) for p in m.parameters()} for m in owners.values())) if owners else set()
    outside = torch.nn.Module()
    for g, group in enumerate(optimizer.param_groups):
        for position, param in enumerate(group["params"]):
            if id(param) not in held:
                # registering keeps the very Parameter object: loading into it updates what the optimizer trains
                outside.register_parameter(f"g{g}_{position}", param)
    if not list(outside.parameters()):
        return torch.nn.ModuleDict(owners), None
    return torch.nn.ModuleDict({**owners, OUTSIDE_PARAMETERS: outside}), outside


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
        keyed_by, outside = _model_for(inner, prepared)
        state[indexed("optimizer", i)] = OptimizerState(keyed_by, inner)
        if outside is not None:
            state[indexed(OPTIMIZER_PARAMETERS_ENTRY, i)] = ModelState(outside)
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
