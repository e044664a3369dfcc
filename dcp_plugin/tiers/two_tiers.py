"""Two tiers: fast local checkpoints, replicated to a remote tier (object storage) in the background.

Every save commits to the local tier as usual. Checkpoints chosen by the ``replicate`` policy are handed to a
:class:`~dcp_plugin.tiers.replication.Replicator` once they committed locally; the local tier's retention never
deletes one that is still queued or being copied, and each tier has its own retention. Listing merges both
tiers; a load takes the local copy when it is there (and reads back intact), otherwise the remote one, so a job
restarted on a machine with an empty disk resumes from the remote tier.

Local layout: one directory every rank can read (one node, or a shared filesystem), or, with
``local_scope="node"``, each node's own disk (:mod:`dcp_plugin.tiers.nodes` lists and restores across the nodes;
this class then only replicates). On several ranks each rank uploads the files it wrote (on node-local disks, from
its own node's directory) and rank 0 commits the remote copy once every rank's files are uploaded and checked
(:mod:`dcp_plugin.tiers.rank_copy`).

:class:`RemoteTier` holds the options the adapters share (``remote``, ``remote_storage_options``,
``replicate_every_n_steps``, ``remote_keep_last``), also read from ``DCP_PLUGIN_REMOTE*`` variables.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from dcp_plugin.config import ENV_PREFIX, _parse_env_value
from dcp_plugin.engine.groups import ProcessGroups
from dcp_plugin.errors import CheckpointCorruptError, CheckpointError, CheckpointNotFoundError, ConfigError
from dcp_plugin.policies import EveryNSteps, SaveContext, SavePolicy, decide
from dcp_plugin.policies.retention import KeepLast, RetentionPolicy
from dcp_plugin.policies.schedule import Schedule
from dcp_plugin.storage import CheckpointInfo, CheckpointStorage
from dcp_plugin.tiers.rank_copy import RankCopies
from dcp_plugin.tiers.replication import Replicator

if TYPE_CHECKING:
    from dcp_plugin.checkpointer import Checkpointer

log = logging.getLogger(__name__)


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
        groups: ProcessGroups | None = None,
    ) -> None:
        if replicate is not None and not isinstance(replicate, SavePolicy):
            raise TypeError(f"replicate must be a SavePolicy (e.g. EveryNSteps(1000)), got {type(replicate).__name__}.")
        self.local = local
        self.remote = remote
        self.replicate = replicate
        several = groups is not None and groups.collective and groups.world_size > 1
        self.ranks = RankCopies(local, remote) if several else None  # collective: every rank builds TwoTiers
        """On several ranks: the exchange through which each rank uploads its own files."""
        self.replicator = Replicator(local, remote, retention=remote_retention, run_id=run_id, ranks=self.ranks)
        self._due: list[str] = []
        self._protected: set[str] = set()

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
            # a save that failed has nothing to copy (its error is raised); on several ranks rank 0 checks that,
            # as the others may get here before rank 0 committed
            if self.ranks is not None or self.local.is_committed(name):
                self.replicator.enqueue(name)  # all of them: on several ranks the queues must stay alike
        self.replicator.raise_error()

    def after_commit(self, schedule: Schedule, *, coordinator: bool, writing: bool) -> None:
        """Retention of the local tier (never of what is still to be copied), then hand over what committed."""
        protected = self.protected()
        if self._protected - protected:  # copies finished: what retention had to keep may go now
            schedule.request_retention()
        self._protected = protected
        schedule.after_commit(self.local, coordinator=coordinator, writing=writing, protected=protected)
        if not writing:
            self.committed()

    def protected(self) -> set[str]:
        """Local checkpoints retention must keep: chosen for replication and not yet copied."""
        return set(self._due) | self.replicator.busy()

    def catch_up(self, groups: ProcessGroups | None = None) -> list[str]:
        """Queue the local checkpoints the remote tier lacks (e.g. after a crash or an outage); collective with
        ``groups``: rank 0 decides, every rank queues them. An unreachable remote tier is logged, not raised."""
        missing: list[str] = []
        if groups is None or groups.is_coordinator:
            try:
                missing = self.replicator.missing()
            except CheckpointError as err:
                url = self.remote.root_url
                log.warning("The remote tier %s is not reachable now (%s); replication resumes later.", url, err)
        if groups is not None:
            missing = groups.broadcast(missing)
        for name in missing:
            self.replicator.enqueue(name)
        return missing

    def catch_up_and_report(self, groups: ProcessGroups) -> None:
        """:meth:`catch_up`, saying on the coordinator how many checkpoints are to be copied."""
        missing = self.catch_up(groups)
        if missing and groups.is_coordinator:
            log.info("Replicating %d checkpoint(s) missing from %s.", len(missing), self.remote.root_url)

    def load(
        self,
        checkpointer: Checkpointer,
        state: MutableMapping[str, Any],
        step: int | None,
        name: str | None,
        **options: Any,
    ) -> CheckpointInfo:
        """Load with ``checkpointer``: the local copy when present; the remote one when not, or when the local
        one is damaged."""
        storage, chosen = self.choose(step, name)
        try:
            return checkpointer.load((storage, chosen), state, **options)
        except CheckpointCorruptError as err:
            if storage is not self.local or not self.remote_copy_of(chosen):
                raise
            log.warning("%s; loading the remote copy instead.", err)
            return checkpointer.load((self.remote, chosen), state, **options)

    def close(self) -> None:
        try:
            try:
                self.committed()
            finally:
                self.replicator.close()  # waits for every copy queued, on every rank
        finally:
            if self.ranks is not None:
                self.ranks.close()

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
        return {**self.__dict__, "ranks": None}


REMOTE_ENV = {
    "url": ENV_PREFIX + "REMOTE",
    "storage_options": ENV_PREFIX + "REMOTE_STORAGE_OPTIONS",
    "replicate_every_n_steps": ENV_PREFIX + "REPLICATE_EVERY_N_STEPS",
    "keep_last": ENV_PREFIX + "REMOTE_KEEP_LAST",
}


@dataclass(frozen=True)
class RemoteTier:
    """A remote tier as the adapters configure it: plain values (a LightningCLI YAML file can write them)."""

    url: str | None = None
    """Where checkpoints are replicated (``s3://bucket/run1``); ``None``: one tier. Env ``DCP_PLUGIN_REMOTE``."""
    storage_options: dict[str, Any] | None = None
    """fsspec options for ``url`` (default: the local tier's). Env ``DCP_PLUGIN_REMOTE_STORAGE_OPTIONS`` (JSON)."""
    replicate_every_n_steps: int | None = None
    """Replicate only checkpoints of steps that are a multiple of N (``EveryNSteps``); ``None``: every checkpoint.
    Env ``DCP_PLUGIN_REPLICATE_EVERY_N_STEPS``."""
    keep_last: int | None = None
    """The remote tier keeps this run's N newest checkpoints (``KeepLast``); ``None``: all. Env
    ``DCP_PLUGIN_REMOTE_KEEP_LAST``."""

    def __post_init__(self) -> None:
        if self.url is not None and (not isinstance(self.url, (str, os.PathLike)) or not os.fspath(self.url)):
            raise ConfigError(f"remote={self.url!r} must be a non-empty path or URL (e.g. 's3://bucket/run1').")
        if self.storage_options is not None and not isinstance(self.storage_options, Mapping):
            raise ConfigError("remote_storage_options must be a mapping of fsspec keyword arguments.")
        counts = {"replicate_every_n_steps": self.replicate_every_n_steps, "remote_keep_last": self.keep_last}
        for label, value in counts.items():
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ConfigError(f"{label}={value!r} must be an integer >= 1 (or None).")
        given = [name for name, value in {"remote_storage_options": self.storage_options, **counts}.items() if value]
        if self.url is None and given:
            raise ConfigError(
                f"{', '.join(given)} given without a remote tier: pass remote= (or set DCP_PLUGIN_REMOTE) too."
            )

    @classmethod
    def resolve(
        cls,
        environ: Mapping[str, str] | None = None,
        *,
        remote: str | os.PathLike[str] | None = None,
        remote_storage_options: Mapping[str, Any] | None = None,
        replicate_every_n_steps: int | None = None,
        remote_keep_last: int | None = None,
    ) -> RemoteTier:
        """Arguments that were given (not ``None``) win, then ``DCP_PLUGIN_REMOTE*`` variables, then none."""
        environ = os.environ if environ is None else environ
        given: dict[str, Any] = {
            "url": os.fspath(remote) if isinstance(remote, os.PathLike) else remote,
            "storage_options": remote_storage_options,
            "replicate_every_n_steps": replicate_every_n_steps,
            "keep_last": remote_keep_last,
        }
        defaults: dict[str, Any] = {"url": "", "storage_options": {}, "replicate_every_n_steps": 0, "keep_last": 0}
        for field, key in REMOTE_ENV.items():
            raw = environ.get(key, "").strip()
            if given[field] is None and raw and raw.lower() not in {"none", "all"}:
                given[field] = _parse_env_value(key, raw, defaults[field])
        if given["storage_options"] is not None:
            given["storage_options"] = dict(given["storage_options"])
        return cls(**given)

    def manager_options(self) -> dict[str, Any]:
        """The ``CheckpointManager`` arguments for this remote tier (``remote=None`` without ``url``)."""
        return {
            "remote": self.url,
            "remote_storage_options": self.storage_options,
            "replicate": None if self.replicate_every_n_steps is None else EveryNSteps(self.replicate_every_n_steps),
            "remote_retention": None if self.keep_last is None else KeepLast(self.keep_last),
        }

    def open(
        self,
        local: CheckpointStorage,
        local_options: Mapping[str, Any],
        *,
        run_id: str | None,
        groups: ProcessGroups | None,
    ) -> TwoTiers | None:
        """The two tiers over ``local`` (``None`` without ``url``); collective when ``groups`` is."""
        if self.url is None:
            return None
        options = self.manager_options()
        remote_options = dict(local_options) if self.storage_options is None else self.storage_options
        return TwoTiers(
            local,
            CheckpointStorage(self.url, remote_options),
            replicate=options["replicate"],
            remote_retention=options["remote_retention"],
            run_id=run_id,
            groups=groups,
        )


def _same(a: CheckpointInfo, b: CheckpointInfo) -> bool:
    return a.manifest.get("save_id") == b.manifest.get("save_id")


def _step(info: CheckpointInfo) -> int:
    return info.step if isinstance(info.step, int) else -1


__all__ = ["REMOTE_ENV", "Located", "RemoteTier", "TwoTiers"]
