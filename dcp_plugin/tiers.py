"""Two tiers: fast local checkpoints, replicated to a remote tier (object storage) in the background.

Every save commits to the local tier as usual. Checkpoints chosen by the ``replicate`` policy are handed to a
:class:`~dcp_plugin.replication.Replicator` once they committed locally; the local tier's retention never
deletes one that is still queued or being copied, and each tier has its own retention. Listing merges both
tiers; a load takes the local copy when it is there (and reads back intact), otherwise the remote one, so a job
restarted on a machine with an empty disk resumes from the remote tier.

Supported layout: one directory every rank can read (one node, or a shared filesystem). The coordinator copies
the whole checkpoint; on several nodes with node-local disks each node holds only its ranks' files, which this
does not replicate.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dcp_plugin.errors import CheckpointNotFoundError
from dcp_plugin.policies import SaveContext, SavePolicy, decide
from dcp_plugin.replication import Replicator
from dcp_plugin.retention import RetentionPolicy
from dcp_plugin.storage import CheckpointInfo, CheckpointStorage


@dataclass(frozen=True)
class Located:
    """A checkpoint and the tiers that hold it (``"local"``, ``"remote"``)."""

    info: CheckpointInfo
    tiers: tuple[str, ...]


class TwoTiers:
    """The local tier, the remote tier and the replication between them (used by ``CheckpointManager``)."""

    def __init__(
        self,
        local: CheckpointStorage,
        remote: CheckpointStorage,
        *,
        replicate: SavePolicy | None = None,
        remote_retention: RetentionPolicy | None = None,
        run_id: str | None = None,
    ) -> None:
        if replicate is not None and not isinstance(replicate, SavePolicy):
            raise TypeError(f"replicate must be a SavePolicy (e.g. EveryNSteps(1000)), got {type(replicate).__name__}.")
        self.local = local
        self.remote = remote
        self.replicate = replicate
        self.replicator = Replicator(local, remote, retention=remote_retention, run_id=run_id)
        self._due: list[str] = []

    # -- replication ----------------------------------------------------------------------------------
    def saved(self, step: int, name: str) -> None:
        """A save of ``step`` as ``name`` was started: replicate it once committed, if the policy says so."""
        ctx = SaveContext(step=step)
        if self.replicate is None or decide(self.replicate, ctx):
            self._due.append(name)
            if self.replicate is not None:
                self.replicate.saved(ctx)

    def committed(self) -> None:
        """The saves started so far have committed locally: hand them to the replicator."""
        due, self._due = self._due, []
        for name in due:
            if self.local.is_committed(name):  # a save that failed has nothing to copy (its error is raised)
                self.replicator.submit(name)

    def protected(self) -> set[str]:
        """Local checkpoints retention must keep: chosen for replication and not yet copied."""
        return set(self._due) | self.replicator.busy()

    def catch_up(self) -> list[str]:
        """Queue the local checkpoints the remote tier lacks (e.g. after a crash or an outage)."""
        return self.replicator.catch_up()

    def close(self) -> None:
        self.committed()
        self.replicator.close()

    # -- listing and choosing -------------------------------------------------------------------------
    def list(self) -> list[Located]:
        """Every committed checkpoint of either tier, oldest first, with where it lives."""
        local = {info.name: info for info in self.local.list()}
        remote = {info.name: info for info in self.remote.list()}
        merged = []
        for name in set(local) | set(remote):
            here, there = local.get(name), remote.get(name)
            same = here is not None and there is not None and _same(here, there)
            tiers = ("local", "remote") if same else ("local",) if here is not None else ("remote",)
            merged.append(Located(here or there, tiers))  # type: ignore[arg-type]
        return sorted(merged, key=lambda item: (_step(item.info), item.info.created, item.info.name))

    def choose(self, step: int | None, name: str | None) -> tuple[CheckpointStorage, str]:
        """Which tier to load ``name`` / ``step`` / the newest checkpoint from: local when it has it."""
        candidates = self.list()
        if name is not None:
            found = [c for c in candidates if c.info.name == name]
        elif step is not None:
            found = [c for c in candidates if c.info.step == step]
        else:
            found = candidates[-1:]
        if not found:
            wanted = f"called {name!r}" if name else f"of step {step}" if step is not None else "at all"
            raise CheckpointNotFoundError(
                f"No committed checkpoint {wanted} in {self.local.root_url} or {self.remote.root_url}."
            )
        chosen = found[-1]
        return (self.local if "local" in chosen.tiers else self.remote), chosen.info.name

    def remote_copy_of(self, name: str) -> bool:
        try:
            self.remote.info(name)
        except Exception:  # noqa: BLE001 - not there, or not readable: no fallback
            return False
        return True

    def __getstate__(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _same(a: CheckpointInfo, b: CheckpointInfo) -> bool:
    return a.manifest.get("save_id") == b.manifest.get("save_id")


def _step(info: CheckpointInfo) -> int:
    return info.step if isinstance(info.step, int) else -1


__all__ = ["Located", "TwoTiers"]
