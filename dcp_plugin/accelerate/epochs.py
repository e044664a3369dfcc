"""The shuffling generator as the epoch in progress began: what a checkpoint taken mid-epoch must hold.

A prepared data loader draws the whole epoch's order from its shuffling generator when the epoch begins
(right after Accelerate synchronized that generator across processes). Saved as it is in the middle of the
epoch, the generator is already past that draw: ``load_state()`` followed by
``skip_first_batches(dataloader, k)`` would draw a new order and skip into the wrong batches. So every data
loader the ``Accelerator`` prepares (or ``skip_first_batches`` returns) records its generator's state when an
epoch begins, and a save during that epoch stores the recorded state instead of the current one. At an epoch
boundary the current state is the right one, and it is what is stored.

"In progress" is Accelerate's own notion: the loader is among ``GradientState().dataloader_references``
(it began an epoch and has not reached its end). One position is special: when a loader hands out the last batch of
its epoch it has already set ``end_of_dataloader`` (as ``accelerator.gradient_state.end_of_dataloader`` says), but
it counts the epoch (``iteration``) and closes it only when the loop asks for one more batch. A save then is a save
after the epoch (:func:`at_epoch_end`): the order of the epoch is drawn and spent, the current generator is the one
the next epoch draws from, and the epoch counter is stored as it will be once the loop moves on, so a resumed run
starts the next epoch, as Accelerate's checkpointing example does (``starting_epoch = step // len(dataloader)``).
"""

from __future__ import annotations

from typing import Any

import torch

EPOCH_START = "_dcp_plugin_epoch_start"


def sampler_of(dataloader: Any) -> Any:
    """The sampler that orders ``dataloader``'s samples (inside Accelerate's ``BatchSamplerShard`` on several
    processes), or ``None``."""
    from accelerate.data_loader import get_sampler

    try:
        sampler = get_sampler(dataloader)
    except AttributeError:
        sampler = None
    if sampler is None:
        inner = getattr(getattr(dataloader, "batch_sampler", None), "batch_sampler", None)
        sampler = getattr(inner, "sampler", None)
    return sampler


def shuffling_generator(dataloader: Any, sampler: Any = None) -> torch.Generator | None:
    """The generator the epoch's order is drawn from: the one Accelerate synchronizes across processes, else
    the sampler's own."""
    generator = getattr(dataloader, "synchronized_generator", None)
    if not isinstance(generator, torch.Generator):
        generator = getattr(sampler if sampler is not None else sampler_of(dataloader), "generator", None)
    return generator if isinstance(generator, torch.Generator) else None


class _RecordEpochStart:
    """Replaces a loader's ``begin`` (called by its ``__iter__`` after the generator is synchronized and before
    the order is drawn): runs Accelerate's ``begin``, then records the generator's state.

    An object rather than a closure so that a prepared data loader still pickles and deep-copies."""

    def __init__(self, dataloader: Any) -> None:
        self.dataloader = dataloader

    def __call__(self) -> None:
        type(self.dataloader).begin(self.dataloader)
        generator = shuffling_generator(self.dataloader)
        if generator is not None:
            self.dataloader.__dict__[EPOCH_START] = generator.get_state()


def watch(dataloader: Any) -> Any:
    """Make ``dataloader`` record its generator's state whenever an epoch begins; returns ``dataloader``."""
    if callable(getattr(type(dataloader), "begin", None)) and not isinstance(
        dataloader.__dict__.get("begin"), _RecordEpochStart
    ):
        dataloader.begin = _RecordEpochStart(dataloader)
    return dataloader


def _in_progress() -> list[Any]:
    from accelerate.state import GradientState

    return [dataloader for dataloader in GradientState().dataloader_references if dataloader is not None]


def at_epoch_end(dataloader: Any) -> bool:
    """Whether ``dataloader`` is in an epoch and has handed out its last batch (only the closing of the epoch
    remains): a save now is a save after the epoch."""
    return bool(getattr(dataloader, "end_of_dataloader", False)) and any(d is dataloader for d in _in_progress())


def epoch_start_state(generator: torch.Generator) -> torch.Tensor | None:
    """``generator``'s state when the epoch in progress that draws from it began; ``None`` between epochs (and at an
    epoch's last batch, when the current state is the next epoch's)."""
    for dataloader in _in_progress():
        recorded = dataloader.__dict__.get(EPOCH_START)
        if recorded is not None and shuffling_generator(dataloader) is generator:
            return None if getattr(dataloader, "end_of_dataloader", False) else recorded
    return None
