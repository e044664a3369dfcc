"""Where a ``CheckpointManager``'s checkpoints live: its storage alone, or two tiers (local + remote).

:class:`RunTiers` answers the manager's questions the same way in both cases: what is committed and where, which
checkpoint a load or read takes, and what runs once a save committed (retention; with two tiers also the
replication). ``DCPCheckpoint`` has its counterpart in :mod:`dcp_plugin.lightning.tiers`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, MutableMapping
from typing import TYPE_CHECKING, Any

from dcp_plugin.engine.groups import ProcessGroups
from dcp_plugin.errors import CheckpointNotFoundError
from dcp_plugin.policies import RetentionPolicy, SavePolicy
from dcp_plugin.policies.schedule import Schedule
from dcp_plugin.storage import CheckpointInfo, CheckpointStorage
from dcp_plugin.tiers.nodes import NodeTiers
from dcp_plugin.tiers.two_tiers import TwoTiers

if TYPE_CHECKING:
    from dcp_plugin.checkpointer import Checkpointer


class RunTiers:
    """A manager's storage, and its :class:`~dcp_plugin.tiers.two_tiers.TwoTiers` when it has a remote tier."""

    def __init__(self, storage: CheckpointStorage, tiers: TwoTiers | None = None) -> None:
        self.storage = storage
        self.tiers = tiers

    @classmethod
    def open(
        cls,
        storage: CheckpointStorage,
        remote: str | None,
        remote_storage_options: Mapping[str, Any],
        *,
        replicate: SavePolicy | None,
        remote_retention: RetentionPolicy | None,
        run_id: str | None,
        groups: ProcessGroups,
        schedule: Schedule | None = None,
        copies: int = 0,
    ) -> RunTiers | NodeTiers:
        """With ``remote``: the two tiers over ``storage``, with what an earlier run never replicated queued; on
        node-local disks (a ``storage`` committed across nodes): :class:`NodeTiers`, with ``copies`` peer replicas
        (collective: every rank calls it)."""
        if remote is None and storage.node_layout is None:
            return cls(storage)
        tiers = (
            None
            if remote is None
            else TwoTiers(
                storage,
                CheckpointStorage(remote, remote_storage_options),
                replicate=replicate,
                remote_retention=remote_retention,
                run_id=run_id,
                groups=groups,
            )
        )
        if storage.node_layout is not None:
            schedule = schedule or Schedule(run_id=run_id)
            nodes = NodeTiers(storage, groups, copies=copies, schedule=schedule, remote=tiers)
            if tiers is not None:
                tiers.catch_up_and_report(groups)
            return nodes
        assert tiers is not None
        tiers.catch_up_and_report(groups)
        return cls(storage, tiers)

    def saved(self, step: int, name: str) -> None:
        """A save of ``step`` as ``name`` was started (every rank: on several ranks each uploads its own files)."""
        if self.tiers is not None:
            self.tiers.saved(step, name)

    def after_commit(self, schedule: Schedule, *, coordinator: bool, writing: bool) -> None:
        """Retention once the previous save committed; with two tiers also hand it to the replication."""
        if self.tiers is not None:
            self.tiers.after_commit(schedule, coordinator=coordinator, writing=writing)
        else:
            schedule.after_commit(self.storage, coordinator=coordinator, writing=writing)

    def load(
        self,
        checkpointer: Checkpointer,
        state: MutableMapping[str, Any],
        step: int | None,
        name: str | None,
        **options: Any,
    ) -> CheckpointInfo:
        """Load the checkpoint called ``name``, or of ``step``, or the latest, with ``checkpointer``."""
        if self.tiers is not None:
            return self.tiers.load(checkpointer, state, step, name, **options)
        resolve = _resolver(self.storage, step, name)  # asked again if the checkpoint is replaced
        return checkpointer.load((self.storage, resolve), state, **options)

    def read(self, checkpointer: Checkpointer, step: int | None, name: str | None, **options: Any) -> dict[str, Any]:
        """Read the checkpoint called ``name``, or of ``step``, or the latest, without live objects."""
        storage, chosen = (self.storage, None) if self.tiers is None else self.tiers.choose(step, name)
        return checkpointer.read((storage, _resolver(storage, step, chosen or name)), **options)

    def latest(self) -> CheckpointInfo | None:
        """The newest committed checkpoint (with two tiers: of either), or ``None``."""
        infos = self.list()
        return infos[-1] if infos else None

    def replaces(self, name: str) -> bool:
        """Whether a save of ``name`` replaces what is there without being asked to (never, with one tier or two)."""
        return False

    def delete(self, name: str) -> None:
        """Delete committed checkpoint ``name`` of the local tier (on the coordinator)."""
        self.storage.delete(name)

    def list(self) -> list[CheckpointInfo]:
        """Committed checkpoints, oldest first (with two tiers: of both)."""
        if self.tiers is not None:
            return [located.info for located in self.tiers.list()]
        return self.storage.list()

    def locations(self) -> dict[str, tuple[str, ...]]:
        """Where each committed checkpoint lives: ``("local",)``, ``("remote",)`` or both."""
        if self.tiers is None:
            return {info.name: ("local",) for info in self.storage.list()}
        return {located.info.name: located.tiers for located in self.tiers.list()}


def _resolver(storage: CheckpointStorage, step: int | None, name: str | None) -> Callable[[], CheckpointInfo]:
    return lambda: find(storage, step, name)


def find(storage: CheckpointStorage, step: int | None, name: str | None) -> CheckpointInfo:
    """The checkpoint called ``name``, or of ``step``, or the latest."""
    if name is not None:
        return storage.info(name)
    if step is not None:
        return storage.find_step(step)
    latest = storage.latest()
    if latest is None:
        leftovers = storage.incomplete()
        detail = f" ({len(leftovers)} incomplete write(s) ignored)" if leftovers else ""
        raise CheckpointNotFoundError(f"No committed checkpoint in {storage.root_url}{detail}.")
    return latest


__all__ = ["RunTiers", "find"]
