"""Which run a :class:`~dcp_plugin.lightning.DCPCheckpoint` continues and which of its checkpoints count: the run
id (retention never deletes another run's checkpoints), the latest and the best checkpoint, the name of the next
save, and Lightning's resume from the latest when ``fit`` gets no ``ckpt_path``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Checkpoint
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from dcp_plugin.lightning.tiers import CallbackTiers, lightning_checkpoints
from dcp_plugin.policies.retention import RetentionOptions, best_first
from dcp_plugin.policies.schedule import Schedule
from dcp_plugin.storage import CheckpointInfo, CheckpointStorage, step_name

_T = TypeVar("_T")


class RunCheckpoints(Checkpoint):
    """The half of :class:`~dcp_plugin.lightning.DCPCheckpoint` that knows its run: which checkpoints in
    ``dirpath`` are this run's, the latest and the best of them, and what ``fit`` resumes from."""

    dirpath: str | None
    schedule: Schedule
    retention_options: RetentionOptions
    tiers: CallbackTiers
    _storage: CheckpointStorage | None

    @property
    def run_id(self) -> str | None:
        """Identifies this run's checkpoints (retention never deletes others)."""
        return self.schedule.run_id

    @run_id.setter
    def run_id(self, run_id: str | None) -> None:
        self.schedule.run_id = run_id

    def latest_checkpoint(self) -> CheckpointInfo | None:
        """The latest committed Lightning checkpoint in ``dirpath`` (any run; with a remote tier: of either tier,
        copied into ``dirpath`` if only the remote one has it), or ``None``."""
        return self.tiers.latest(required_storage(self._storage))

    @property
    def best_model_path(self) -> str:
        """This run's best checkpoint by ``monitor`` (without ``monitor``: the latest); ``""`` if none.

        Lets ``trainer.test(ckpt_path="best")`` use this callback like ``ModelCheckpoint``."""
        if self._storage is None:
            return ""
        options = self.retention_options
        return best_checkpoint_url(self._storage, self.run_id, options.monitor, options.mode)

    def state_dict(self) -> dict[str, Any]:
        """The run id and checkpoint directory, saved in each checkpoint so a resumed run continues it."""
        return {"run_id": self.run_id, "dirpath": self._storage.root_url if self._storage else self.dirpath}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Continue the run of the checkpoint resumed from when it lies in this callback's directory (retention too)."""
        ours = self._storage is not None and state_dict.get("dirpath") == self._storage.root_url
        if ours and state_dict.get("run_id"):
            self.run_id = state_dict["run_id"]


def required_storage(storage: _T | None) -> _T:
    if storage is None:
        raise RuntimeError("DCPCheckpoint is not set up yet; it is used by Trainer.fit().")
    return storage


def resume_path(self: RunCheckpoints, trainer: pl.Trainer) -> str | None:
    """Where auto-resume restores from: the latest checkpoint (rank 0 decides); continues its run."""
    if self.tiers.collective:  # node-local disks: every rank asks (the answer is agreed, the same everywhere)
        latest = self.latest_checkpoint()
    else:
        latest = trainer.strategy.broadcast(self.latest_checkpoint() if trainer.is_global_zero else None)
    if latest is None:
        return None
    self.run_id = latest.manifest.get("run_id") or self.run_id
    url = required_storage(self._storage).url(latest.name)  # the checkpoint's name (on object stores not its data)
    rank_zero_info(f"DCPCheckpoint: resuming from {url} (the latest checkpoint in {self.dirpath}).")
    return url


def best_checkpoint_url(storage: CheckpointStorage, run_id: str | None, monitor: str | None, mode: Any) -> str:
    """The run's best checkpoint by ``monitor`` (without ``monitor``: the latest); ``""`` if none."""
    ours = [info for info in lightning_checkpoints(storage) if info.manifest.get("run_id") == run_id]
    best = best_first(ours, monitor, mode) if monitor else []
    if best:
        return storage.url(best[0].name)
    return storage.url(ours[-1].name) if ours else ""


def free_name(storage: CheckpointStorage, step: int, run_id: str | None) -> str:
    """``step_<N>``, or ``step_<N>-v<k>`` when another run already committed that name here."""
    base = name = step_name(step)
    version = 0
    while storage.is_committed(name) and storage.info(name).manifest.get("run_id") != run_id:
        version += 1
        name = f"{base}-v{version}"
    return name


def wrap_resume_start(trainer: pl.Trainer, find: Callable[[pl.Trainer], str | None]) -> None:
    """Make Lightning resume from ``find(trainer)`` when ``fit`` was given no checkpoint path.

    Lightning resolves ``ckpt_path`` before any callback runs and has no public way for a callback to supply
    one, so the (private) checkpoint connector's ``resume_start`` is wrapped on this instance: when it is
    called with no path (none passed, or ``"last"`` found no ModelCheckpoint file), ``find`` supplies one.
    This is the point at which Lightning restores, for every strategy.
    """
    connector = trainer._checkpoint_connector
    original = connector.resume_start

    def resume_start(checkpoint_path: Any = None, weights_only: Any = None) -> None:
        unwrap_resume_start(trainer)  # once
        if checkpoint_path is None:
            checkpoint_path = find(trainer)
        return original(checkpoint_path, weights_only=weights_only)

    connector.resume_start = resume_start


def unwrap_resume_start(trainer: pl.Trainer) -> None:
    trainer._checkpoint_connector.__dict__.pop("resume_start", None)


__all__ = [
    "RunCheckpoints",
    "best_checkpoint_url",
    "free_name",
    "required_storage",
    "resume_path",
    "unwrap_resume_start",
    "wrap_resume_start",
]
