"""``CheckpointManager``: a directory (or URL) of checkpoints for one run.

It is a :class:`~dcp_plugin.checkpointer.Checkpointer` (saving, loading and reading one checkpoint), a
:class:`~dcp_plugin.policies.schedule.Schedule` (when to save, what to keep) and the directory's listing
(:class:`~dcp_plugin.tiers.run_tiers.RunTiers`: one tier or two). Every adapter that manages a directory goes
through it or through the same parts.
"""

from __future__ import annotations

import functools
import logging
import threading
import uuid
from collections import deque
from collections.abc import Callable, Mapping, MutableMapping
from typing import Any

from dcp_plugin.checkpointer import Checkpointer, scoped
from dcp_plugin.config import CheckpointConfig
from dcp_plugin.engine.checkpoint_engine import CheckpointEngine
from dcp_plugin.engine.stats import SaveStats
from dcp_plugin.errors import ConfigError
from dcp_plugin.policies import RetentionPolicy, SaveContext, SaveDecision, SaveEvent, SavePolicy, as_metrics
from dcp_plugin.policies.schedule import Schedule
from dcp_plugin.storage import CheckpointInfo, CheckpointStorage, step_name
from dcp_plugin.tiers.nodes import NodeTiers
from dcp_plugin.tiers.run_tiers import RunTiers
from dcp_plugin.tiers.two_tiers import TwoTiers

log = logging.getLogger(__name__)

HISTORY_LIMIT = 1000
""":attr:`CheckpointManager.history` keeps the stats of this many most recent saves."""


class CheckpointListing:
    """The committed checkpoints of one directory or URL, in one tier or two: list, locate, read, delete.

    The part of :class:`CheckpointManager` that reads what its directory holds and never writes to it, except
    for :meth:`delete`; the manager adds saving on a schedule and loading into live objects.
    """

    checkpointer: Checkpointer
    storage: CheckpointStorage
    _where: RunTiers | NodeTiers

    @property
    def directory(self) -> str:
        """The checkpoint directory: a plain path when local, otherwise its URL (``s3://bucket/run``)."""
        return self.storage.root_url

    @property
    def tiers(self) -> TwoTiers | None:
        """With ``remote``: the local and remote tiers and the replication between them."""
        return self._where.tiers

    @property
    def nodes(self) -> NodeTiers | None:
        """With ``local_scope="node"``: what every node holds, the copies between nodes and restores."""
        return self._where if isinstance(self._where, NodeTiers) else None

    def read(
        self,
        step: int | None = None,
        *,
        name: str | None = None,
        entries: list[str] | None = None,
        allow_pickle: bool | None = None,
    ) -> dict[str, Any]:
        """Read a checkpoint without live objects: every (or the named) entry as plain values, with
        full-size tensors (sharded saves are gathered). For inspection, export and inference."""
        return self._where.read(self.checkpointer, step, name, entries=entries, allow_pickle=allow_pickle)

    # -- listing and deleting --------------------------------------------------------------------
    def list(self) -> list[CheckpointInfo]:
        """Committed checkpoints, oldest first (with ``remote``: of both tiers; see :meth:`locations`)."""
        return self._where.list()

    def locations(self) -> dict[str, tuple[str, ...]]:
        """Where each committed checkpoint lives: ``("local",)``, ``("remote",)`` or both."""
        return self._where.locations()

    def latest(self) -> CheckpointInfo | None:
        """The newest committed checkpoint (with ``remote``: of either tier), or ``None`` if there is none. With
        ``local_scope="node"``: the newest complete across the nodes; when the nodes hold only checkpoints that
        lack a part (a lost disk, no copy, no remote tier) it raises :class:`CheckpointIncompleteError`."""
        return self._where.latest()

    @property
    def steps(self) -> list[int]:
        """The steps of the committed checkpoints, oldest first (checkpoints saved without a step left out)."""
        return [info.step for info in self.list() if info.step is not None]

    def delete(self, step: int | None = None, *, name: str | None = None) -> None:
        """Delete a committed checkpoint (waits for a save in flight first; call it on every rank)."""
        if (step is None) == (name is None):
            raise ValueError("Pass exactly one of step or name.")
        self.checkpointer.wait()
        if self.nodes is not None or self.checkpointer.groups.is_coordinator:  # on node-local disks: every node
            self._where.delete(name or step_name(step))  # type: ignore[arg-type]


class CheckpointManager(CheckpointListing):
    """Save and load training state as DCP checkpoints under one directory or URL.

    Args:
        directory: local path or fsspec URL (``s3://bucket/run``, ``memory://run``...). Created if missing.
        config: options; keyword arguments (e.g. ``async_mode="process"``) override its fields. Without
            ``config``, options not given here come from ``DCP_PLUGIN_*`` variables, then the defaults.
        engine: share one :class:`CheckpointEngine` between managers (one staging buffer, one daemon).
        distributed: ``None`` saves collectively when ``torch.distributed`` is initialized (call every
            method on every rank); ``False`` makes this process save and load alone.
        run_id: identifies checkpoints this manager wrote (retention deletes only those). Default: new;
            pass the same id when resuming a run so its earlier checkpoints stay under retention.
        save_policy: when :meth:`maybe_save` saves (see :mod:`dcp_plugin.policies`), e.g.
            ``EveryNSteps(500) | EveryNSeconds(1800) | OnPreemption()``. Signal handlers are installed
            here and removed by :meth:`close`.
        retention: which committed checkpoints of this run to keep, e.g. ``KeepLast(3)``; applied on the
            coordinator after each save committed. ``None`` keeps everything.
        checkpointer: share a :class:`Checkpointer` (not closed by :meth:`close`) instead of creating one.
        schedule: a ready :class:`Schedule` instead of ``save_policy`` / ``retention`` / ``run_id``.
        remote: a second tier (e.g. ``s3://bucket/run``): committed checkpoints are copied there in the
            background (see :mod:`dcp_plugin.tiers.two_tiers`); :meth:`load` falls back to it when the local
            tier lacks a checkpoint; :meth:`close` waits for the copies.
        remote_storage_options: fsspec options for ``remote`` (default: ``storage_options``).
        replicate: which checkpoints to copy, e.g. ``EveryNSteps(1000)`` (``None``: every one).
        remote_retention: which replicated checkpoints of this run the remote tier keeps (``None``: all). The
            local tier's ``retention`` never deletes a checkpoint still waiting to be copied.

    ``state`` passed to :meth:`save` and :meth:`load` maps names to models, optimizers, other ``Stateful`` objects
    (anything with ``state_dict``/``load_state_dict``) and plain values.
    """

    def __init__(
        self,
        directory: str,
        config: CheckpointConfig | None = None,
        *,
        engine: CheckpointEngine | None = None,
        distributed: bool | None = None,
        run_id: str | None = None,
        save_policy: SavePolicy | None = None,
        retention: RetentionPolicy | None = None,
        checkpointer: Checkpointer | None = None,
        schedule: Schedule | None = None,
        remote: str | None = None,
        remote_storage_options: dict[str, Any] | None = None,
        replicate: SavePolicy | None = None,
        remote_retention: RetentionPolicy | None = None,
        **overrides: Any,
    ) -> None:
        if schedule is not None and (save_policy is not None or retention is not None or run_id is not None):
            raise ConfigError("Pass either schedule= or save_policy/retention/run_id, not both.")
        schedule = schedule or Schedule(save_policy, retention, run_id or uuid.uuid4().hex)
        self._owns_checkpointer = checkpointer is None
        self.checkpointer = _checkpointer(config, engine, checkpointer, distributed, overrides)
        """Saves, loads and reads single checkpoints for this manager (shared when passed in)."""
        self.config = self.checkpointer.config
        """The options in effect: the checkpointer's, after keyword overrides and ``DCP_PLUGIN_*`` variables."""
        self.storage = CheckpointStorage(directory, self.config.storage_options)
        """The local tier: the directory's committed checkpoints, their manifests and deletion."""
        self.checkpointer.check_storage(self.storage)
        self.storage.check_root()
        self.storage = scoped(self.storage, self.config, self.checkpointer.groups)  # node-local disks: per node
        if self._owns_checkpointer:
            self.checkpointer.engine.warm_up()  # process mode: the writer daemon starts now, not at the first save
        self.schedule = schedule
        """The save policy, retention, run id and last saved step of this run."""
        self._where = RunTiers.open(
            self.storage,
            remote,
            self.config.storage_options if remote_storage_options is None else remote_storage_options,
            replicate=replicate,
            remote_retention=remote_retention,
            run_id=schedule.run_id,
            groups=self.checkpointer.groups,
            schedule=schedule,
            copies=self.config.replicas,
        )
        self.history: deque[SaveStats] = deque(maxlen=HISTORY_LIMIT)
        """Stats of this manager's most recent saves (oldest dropped after 1000)."""
        self.should_stop = False
        """Set by :meth:`maybe_save` after a preemption save committed: the loop should exit now."""
        self._retention_lock = threading.Lock()
        schedule.install()

    @property
    def engine(self) -> CheckpointEngine:
        """The engine under :attr:`checkpointer`: its rank, world size and the save in flight."""
        return self.checkpointer.engine

    @property
    def run_id(self) -> str | None:
        """The id written into each checkpoint's manifest; retention deletes only this run's checkpoints."""
        return self.schedule.run_id

    @run_id.setter
    def run_id(self, run_id: str) -> None:
        self.schedule.run_id = run_id

    @property
    def save_policy(self) -> SavePolicy | None:
        """When :meth:`maybe_save` saves (``None``: only explicit :meth:`save` calls)."""
        return self.schedule.save_policy

    @property
    def retention(self) -> RetentionPolicy | None:
        """Which committed checkpoints of this run are kept (``None``: all)."""
        return self.schedule.retention

    @property
    def last_decision(self) -> SaveDecision | None:
        """What the save policy decided at the last :meth:`maybe_save` (``None`` before the first)."""
        return self.schedule.last_decision

    # -- saving ----------------------------------------------------------------------------------
    def save(
        self,
        step: int,
        state: Mapping[str, Any],
        *,
        metadata: Mapping[str, Any] | None = None,
        name: str | None = None,
        overwrite: bool = False,
    ) -> SaveStats:
        """Checkpoint ``state`` as of now, for ``step``.

        Returns when the snapshot copy was started (with ``async_staging=False``: when it is taken; in ``sync``
        mode: when the checkpoint is committed) and the write continues in the background. The next ``save``,
        ``load``, ``delete`` and ``close`` wait for it; its errors are raised by the next call. ``metadata``
        (JSON-like, e.g. metrics) is stored in the manifest. ``name`` overrides the directory name (default
        ``step_000000042``).
        """
        self.wait()  # the previous save committed: its retention (if not done in the background) runs first
        stats = self.checkpointer.save(
            (self.storage, name or step_name(step)),
            state,
            step=step,
            metadata=metadata,
            overwrite=overwrite or self._where.replaces(name or step_name(step)),
            run_id=self.run_id,
            after_commit=_background_retention(self),
        )
        self.history.append(stats)
        self.schedule.saved(step)
        self._where.saved(step, name or step_name(step))
        return stats

    def prepare(self, state: Mapping[str, Any]) -> None:
        """Set up the staging buffers for ``state`` in the background now, so the first save blocks no longer
        than later ones (call once the state is complete, e.g. after the first optimizer step; on every rank
        that saves). :meth:`maybe_save` does this by itself at the first step it does not save."""
        self.checkpointer.prepare(state)

    def maybe_save(
        self,
        step: int,
        state: Mapping[str, Any],
        *,
        metrics: Mapping[str, Any] | None = None,
        event: SaveEvent = "step",
        epoch: int | None = None,
    ) -> SaveStats | None:
        """Save ``state`` for ``step`` if the save policy says so; call it on every rank at the same points.

        ``event`` says where the loop is: after a training step (``"step"``), at the end of a training
        epoch (``"epoch_end"``, with ``epoch``) or while an exception propagates (``"exception"``).
        ``metrics`` (numbers or one-element tensors) are stored with the checkpoint for ``KeepBest``.
        After a preemption signal the save completes synchronously and :attr:`should_stop` becomes
        ``True``. Also applies retention once the previous save has committed. Returns the save's stats,
        or ``None`` when nothing was saved.
        """
        self._after_commit()
        groups = self.checkpointer.groups
        ctx = SaveContext(step=step, event=event, epoch=epoch, world_size=groups.world_size)
        verdict = self.schedule.decide(ctx, groups.all_gather_control)
        stats = None
        if verdict.save:
            metadata: dict[str, Any] = {"reasons": list(verdict.decision.reasons)}
            if metrics:
                metadata["metrics"] = as_metrics(metrics)
            stats = self.save(step, state, metadata=metadata)
        elif self.checkpointer.engine.needs_prepare:
            self.prepare(state)  # once per engine, at the first step that does not save
        self.schedule.acknowledge(ctx, verdict)
        if verdict.flush:
            self.wait()
        self.should_stop = self.should_stop or verdict.stop
        return stats

    def _after_commit(self, writing: bool | None = None) -> None:
        """Retention once the last save committed (background modes: called where the write ends, off the loop)."""
        writing = self.checkpointer.in_flight is not None if writing is None else writing
        with self._retention_lock:  # the loop's thread and the thread a background save ended in
            self._where.after_commit(self.schedule, coordinator=self.engine.groups.is_coordinator, writing=writing)

    def wait_for_staging(self) -> None:
        """With ``async_staging``: block until the snapshot is copied. Call before changing parameters."""
        self.checkpointer.wait_for_staging()

    def wait(self) -> SaveStats | None:
        """Block until the save in flight is committed, then apply retention; raises a failed save's error."""
        stats = self.checkpointer.wait()
        self._after_commit()
        return stats

    # -- loading ---------------------------------------------------------------------------------
    def load(
        self,
        state: MutableMapping[str, Any],
        step: int | None = None,
        *,
        name: str | None = None,
        strict: bool | None = None,
        allow_pickle: bool | None = None,
    ) -> CheckpointInfo:
        """Load a checkpoint into the live objects in ``state`` (in place) and return its info.

        Default: the latest committed checkpoint; or the one of ``step``, or called ``name`` (not both). A live
        tensor whose dtype differs from the stored one is cast to the live dtype, with a warning naming it. See
        :meth:`Checkpointer.load <dcp_plugin.checkpointer.Checkpointer.load>`.
        """
        if step is not None and name is not None:
            raise ConfigError(f"load() got step={step} and name={name!r}: pass one of them (or neither: the latest).")
        return self._where.load(self.checkpointer, state, step, name, strict=strict, allow_pickle=allow_pickle)

    # -- lifecycle -------------------------------------------------------------------------------
    def close(self) -> None:
        """Wait for the save in flight, release resources, and raise any background error."""
        try:
            try:
                self.wait()
                copies = self.nodes or self.tiers
                if copies is not None:
                    copies.close()  # waits for the copies of everything committed (to peers, to the remote tier)
                    self._after_commit()  # retention of what was kept only until it was copied
            finally:
                if self._owns_checkpointer:
                    self.checkpointer.close()
        finally:
            self.schedule.uninstall()

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        try:
            self.close()
        except Exception as err:
            if exc_type is None:
                raise
            log.error("While handling an earlier error, closing the checkpoint manager failed: %s", err)


def _background_retention(manager: CheckpointManager) -> Callable[[], None] | None:
    """Retention where a background save ends (off the training loop), for a directory of its own: with a remote
    tier or node-local disks it stays on the loop's thread (it hands work to the copies and raises their errors)."""
    if not manager.config.is_async or manager.tiers is not None or manager.nodes is not None:
        return None
    return functools.partial(manager._after_commit, False)


def _checkpointer(
    config: CheckpointConfig | None,
    engine: CheckpointEngine | None,
    checkpointer: Checkpointer | None,
    distributed: bool | None,
    overrides: dict[str, Any],
) -> Checkpointer:
    """The manager's checkpointer: the one given, or one made from the engine or the options given."""
    shared = [name for name, given in (("engine", engine), ("checkpointer", checkpointer)) if given is not None]
    if shared and (config is not None or overrides or len(shared) > 1):
        raise ConfigError(f"Pass either {shared[0]}= or config options, not both: it has its own config.")
    if checkpointer is not None:
        return checkpointer
    if engine is None:  # explicit arguments win, then DCP_PLUGIN_* variables, then the defaults
        config = config.replace(**overrides) if config is not None else CheckpointConfig.resolve(**overrides)
    return Checkpointer(config, engine=engine, distributed=distributed)
