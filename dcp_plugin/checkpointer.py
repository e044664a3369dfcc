"""``Checkpointer``: save, load and read ONE checkpoint at a path or URL.

It owns the engine (how DCP writes), applies the checkpoint format (:mod:`dcp_plugin.format.packing`) and drives
the storage's commit protocol (``begin_write`` / ``writer`` / ``abort``). It knows nothing about
directories of checkpoints, schedules or retention (that is :class:`~dcp_plugin.manager.CheckpointManager`)
and nothing about Lightning or Accelerate.

A checkpoint is named by a reference: a path or URL (``"ckpts/step_000000042"``, ``"s3://b/run/last"``), or
``(storage, name)`` with a :class:`~dcp_plugin.storage.CheckpointStorage`. For loads the name may also be a
callable returning the :class:`~dcp_plugin.storage.CheckpointInfo` to read (asked on the coordinator, again
if the checkpoint is replaced while it is read).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import time
import uuid
from collections.abc import Callable, Mapping, MutableMapping, Sequence
from typing import Any, Union

import torch

from dcp_plugin.config import CheckpointConfig
from dcp_plugin.engine import inflight, plans, priority
from dcp_plugin.engine.checkpoint_engine import CheckpointEngine
from dcp_plugin.engine.groups import ProcessGroups
from dcp_plugin.engine.repeat import RepeatRequest
from dcp_plugin.engine.staging.waits import StagingWaits
from dcp_plugin.engine.stats import SaveStats
from dcp_plugin.errors import (
    CheckpointNotFoundError,
    CheckpointSaveError,
    ConfigError,
)
from dcp_plugin.format import packing
from dcp_plugin.format.incremental import Choice, IncrementalTracker
from dcp_plugin.format.state import models_in, optimizers_in, wrap_state
from dcp_plugin.loading import REPLACED_RETRIES, Resolver, collection_paused, load_committed, resolve_on_coordinator
from dcp_plugin.storage import CheckpointInfo, CheckpointStorage, PendingWrite, open_url
from dcp_plugin.storage.blobs import release

log = logging.getLogger(__name__)

Ref = Union[str, "os.PathLike[str]", tuple[CheckpointStorage, str]]


class Checkpointer:
    """Save, load and read single checkpoints with DCP.

    Args:
        config: the options (default :class:`CheckpointConfig`); not with ``engine``.
        engine: use this engine (shared, not closed here) instead of creating one.
        distributed: ``None`` saves collectively when ``torch.distributed`` is initialized (call every method
            on every rank); ``False`` makes this process save and load alone.
    """

    def __init__(
        self,
        config: CheckpointConfig | None = None,
        *,
        engine: CheckpointEngine | None = None,
        distributed: bool | None = None,
    ) -> None:
        if engine is not None and config is not None:
            raise ConfigError("Pass either engine= or config=, not both: a shared engine has its own config.")
        self.engine = engine or CheckpointEngine(config, distributed=distributed)
        """The engine that runs DCP for this checkpointer (shared when one was passed in)."""
        self.config = self.engine.config
        """The engine's options: async mode, staging, threads, storage options."""
        self.groups = self.engine.groups
        """Who saves together: this rank, the world size and the gloo groups saves and loads use."""
        self._owns_engine = engine is None
        self._staging_waits = StagingWaits(self.engine.wait_for_staging)
        self._incremental = IncrementalTracker(self.config)
        self.last_stats: SaveStats | None = None
        """The stats of the last save this checkpointer started (filled in further when it commits)."""

    # -- references ------------------------------------------------------------------------------
    def locate(self, ref: Ref, storage_options: Mapping[str, Any] | None = None) -> tuple[CheckpointStorage, str]:
        """``(storage, name)`` for a reference; ``storage_options`` are merged over the config's for a URL."""
        return locate(ref, self.config.storage_options, storage_options)

    def check_storage(self, storage: CheckpointStorage) -> None:
        """Fail early on a storage this configuration cannot write to."""
        if self.config.async_mode == "process" and storage.protocol == "memory":
            raise ConfigError(
                "memory:// lives inside one process, but async_mode='process' writes from a separate process; "
                "use async_mode='thread' or 'sync' with memory://."
            )

    # -- saving ----------------------------------------------------------------------------------
    def save(
        self,
        ref: Ref,
        state: Mapping[str, Any],
        *,
        step: int,
        metadata: Mapping[str, Any] | None = None,
        overwrite: bool = False,
        run_id: str | None = None,
        frozen_from: Sequence[torch.nn.Module] = (),
        after_commit: Callable[[], None] | None = None,
    ) -> SaveStats:
        """Checkpoint ``state`` as of now at ``ref``; returns when the snapshot is taken (see ``async_mode``).

        Collective when distributed: every rank calls it with the same ``ref``. ``metadata`` (JSON-like) and
        ``run_id`` go into the manifest. ``frozen_from``: modules a plain state dict in ``state`` was taken from
        (Lightning's module): their frozen parameters count for incremental saves, and with async staging their
        forward pass waits for the snapshot, as for a model in ``state``. The write continues in the
        background; the next call on this checkpointer waits for it and raises its error. ``after_commit()`` runs
        once the checkpoint is committed, where the write ends (in the background but before the next call here
        can start another save); its errors are logged.
        """
        started = time.perf_counter()
        storage, name = self.locate(ref)
        self.check_storage(storage)
        storage = scoped(storage, self.config, self.groups)
        self.engine.wait()
        inflight.wait_for(storage.url(name))  # another instance's write of this name: ours comes after it
        _check_json(dict(metadata or {}))
        wrapped = wrap_state(state)
        if self.config.stages_in_background:  # the next change of saved tensors waits for the snapshot copy
            self._staging_waits.hook(optimizers_in(wrapped), [*models_in(wrapped), *frozen_from])
        packed, pending, structure, choice, request = open_save(
            self.engine,
            self._incremental,
            storage,
            name,
            wrapped,
            overwrite,
            frozen_from,
            self.config.allow_pickle,
            self.config.replicas,
        )
        pending.manifest = {
            "step": step,
            "world_size": self.groups.world_size,
            "created": time.time(),
            "run_id": run_id,
            "save_id": pending.manifest["save_id"],  # the coordinator's, the same on every rank
            "mode": self.config.async_mode,
            "entries": packed.entries,
            "metadata": dict(metadata or {}),
        }
        plan, held = self._incremental.plan(storage, pending, choice, packed.tensors, self.groups.rank)
        if not request.repeat:
            self._incremental.stand_in(packed.state_dict, plan, packed.tensors)
        writer = storage.writer(
            pending,
            thread_count=self.config.thread_count,
            sync_files=self.config.sync_files,
            per_thread_copy_ahead=self.config.per_thread_copy_ahead,
            run_write=functools.partial(priority.run_lowered, self.config.background_nice),
            incremental=plan,
            direct_io=self.config.direct_io,
            aliases=dict(request.aliases),
        )
        stats = SaveStats(name=name, url=storage.url(name), step=step, mode=self.config.async_mode, blocking_s=0.0)
        self.engine.save(
            packed.flat,
            writer,
            stats=stats,
            started=started,
            on_failure=(lambda: storage.abort(pending)) if storage.cleans_up(self.groups.is_coordinator) else None,
            on_done=functools.partial(self._save_done, storage, plan, held, pending.manifest["save_id"], after_commit),
            structure=structure,
            repeat=request,
            on_written=storage.completion(pending),
        )
        self._incremental.saved(storage, name, pending.manifest["save_id"])
        self.last_stats = stats
        return stats

    def _save_done(
        self,
        storage: CheckpointStorage,
        plan: Any,
        held: list[tuple[str, str]],
        save_id: str,
        after_commit: Callable[[], None] | None,
        metadata: Any,
    ) -> None:
        """After a save's write ended (in the background): incremental bookkeeping, then its blobs are let go,
        then ``after_commit`` if it committed."""
        try:
            self._incremental.committed(storage, plan, metadata, save_id)
        finally:
            release(held)
        if after_commit is not None and metadata is not None:
            after_commit()

    def prepare(self, state: Mapping[str, Any]) -> None:
        """Set up the staging buffers for ``state`` (what later saves will hold) in the background now, so the
        first save blocks no longer than later ones. Call once the state is complete, e.g. after the first
        optimizer step (which creates the optimizer's moments); on the ranks that save. Not collective."""
        if not self.engine.needs_prepare:
            return
        packed = packing.pack(
            wrap_state(state), rank=self.groups.rank, world_size=self.groups.world_size, allow_pickle=True
        )
        self.engine.prepare(packed.flat)

    # -- loading ---------------------------------------------------------------------------------
    def load(
        self,
        ref: Ref | tuple[CheckpointStorage, Resolver],
        state: MutableMapping[str, Any],
        *,
        strict: bool | None = None,
        allow_pickle: bool | None = None,
    ) -> CheckpointInfo:
        """Load the checkpoint at ``ref`` into the live objects in ``state`` (in place) and return its info.

        Stateful objects are loaded in place (sharded models and optimizers reshard to the current layout);
        plain values are replaced in ``state``. With ``strict`` (the config's default), any missing,
        unexpected or differently shaped tensor is an error listing all of them; otherwise a warning.
        A load never hands out a mix of two checkpoints: if another process replaces the checkpoint while
        it is read, the load starts over.
        """
        strict = self.config.strict if strict is None else strict
        allow_pickle = self.config.allow_pickle if allow_pickle is None else allow_pickle
        storage, resolve = self._resolver(ref)
        self.engine.wait()
        self._wait_for_writes(ref, storage)
        loaded = load_committed(self.engine, storage, resolve, state, strict=strict, allow_pickle=allow_pickle)
        self._incremental.loaded(storage, loaded)
        return loaded

    def read(
        self,
        ref: Ref | tuple[CheckpointStorage, Resolver],
        entries: list[str] | None = None,
        allow_pickle: bool | None = None,
    ) -> dict[str, Any]:
        """Read a checkpoint without live objects: every (or the named) entry as plain values, with
        full-size tensors (sharded saves are gathered). For inspection, export and inference."""
        storage, resolve = self._resolver(ref)
        self._wait_for_writes(ref, storage)
        info = resolve_on_coordinator(self.groups, resolve)
        saved = list(info.manifest.get("entries", {}))
        missing = [entry for entry in entries or [] if entry not in saved]
        if missing:
            raise CheckpointNotFoundError(f"{info.url} has no entries {missing}; it has {saved}.")
        state: dict[str, Any] = {entry: None for entry in (entries or saved)}
        self.load((storage, resolve), state, allow_pickle=allow_pickle)
        return state

    def _wait_for_writes(self, ref: Any, storage: CheckpointStorage) -> None:
        """Before reading: wait for this process's writes of the checkpoint (or, when a resolver chooses it later,
        of any checkpoint in its directory), whichever engine started them."""
        if isinstance(ref, tuple) and callable(ref[1]):
            inflight.wait_under(storage.root_url)
        else:
            located, name = self.locate(ref)
            inflight.wait_for(located.url(name))

    def _resolver(self, ref: Ref | tuple[CheckpointStorage, Resolver]) -> tuple[CheckpointStorage, Resolver]:
        if isinstance(ref, tuple) and callable(ref[1]):
            return ref[0], ref[1]
        storage, name = self.locate(ref)  # type: ignore[arg-type]
        return storage, lambda: storage.info(name)

    # -- waiting and closing ---------------------------------------------------------------------
    def wait(self) -> SaveStats | None:
        """Block until the save in flight is committed; raises a failed save's error."""
        return self.engine.wait()

    def wait_for_staging(self) -> None:
        """With ``async_staging``: block until the snapshot is copied. Call before changing parameters."""
        self.engine.wait_for_staging()

    @property
    def in_flight(self) -> SaveStats | None:
        """The save being written right now, if any."""
        return self.engine.in_flight

    def drain_completed(self) -> list[SaveStats]:
        """Stats of saves finished since the last call; for the owner of this checkpointer only."""
        return self.engine.drain_completed()

    def close(self) -> None:
        """Wait for the save in flight, release the engine (if owned) and hooks; raise any background error."""
        try:
            if self._owns_engine:
                self.engine.close()
            else:
                self.engine.wait()
        finally:
            self._staging_waits.remove()


def scoped(storage: CheckpointStorage, config: CheckpointConfig, groups: ProcessGroups) -> CheckpointStorage:
    """``storage`` as ``config`` writes it: with ``local_scope="node"``, on every node's own disk with the commit
    across nodes (collective the first time: the ranks agree on their nodes)."""
    if config.local_scope != "node" or storage.node_layout is not None:
        return storage
    return storage.on_nodes(groups.node_layout(), groups)


def locate(
    ref: Ref, base_options: Mapping[str, Any], storage_options: Mapping[str, Any] | None = None
) -> tuple[CheckpointStorage, str]:
    """``(storage, name)`` for a reference; for a path or URL, ``storage_options`` (fsspec options for this
    call) are merged over ``base_options``."""
    if isinstance(ref, tuple):
        storage, name = ref
        return storage, name
    if storage_options is not None and not isinstance(storage_options, Mapping):
        raise TypeError(
            f"storage_options must be a mapping of fsspec options (got {type(storage_options).__name__}); "
            "they are merged over the configured storage_options."
        )
    return open_url(os.fspath(ref), {**base_options, **dict(storage_options or {})})


def open_save(
    engine: CheckpointEngine,
    incremental: IncrementalTracker,
    storage: CheckpointStorage,
    name: str,
    wrapped: Mapping[str, Any],
    overwrite: bool,
    frozen_from: Sequence[torch.nn.Module],
    allow_pickle: bool,
    replicas: int,
) -> tuple[packing.Packed, PendingWrite, str, Choice | None, RepeatRequest]:
    """Pack the state on every rank and open the write on the coordinator; any rank's failure fails all. Also agrees
    over all ranks, in one all-gather, on the save's structure (what its ``.metadata`` records besides the bytes) and
    on whether it repeats the structure of a save DCP planned, so that it can be written without DCP."""
    groups = engine.groups
    packed: packing.Packed | None = None
    pending: PendingWrite | None = None
    choice: Choice | None = None
    local_error: BaseException | None = None
    numbers: tuple[int, int] = (0, 0)
    aliases: dict[str, str] = {}
    try:
        with collection_paused():
            packed = packing.pack(wrapped, rank=groups.rank, world_size=groups.world_size, allow_pickle=allow_pickle)
            structure = engine.plan_keys.number(plans.structure(packed.state_dict))
            aliases = packing.tied(packed.tensors)
            choice = incremental.choose(storage, packed.tensors, wrapped, frozen_from)
            blobs = choice.keys if choice is not None else frozenset()
            numbers = (structure, engine.repeats.number(structure, packed.tensors, aliases, blobs, storage.root_url))
        storage.check_room(_tensor_bytes(packed), groups.world_size, replicas)  # /dev/shm: room?
        if groups.is_coordinator:
            pending = storage.begin_write(name, overwrite=overwrite)
            pending.manifest["save_id"] = uuid.uuid4().hex
    except Exception as err:  # noqa: BLE001 - reported on every rank below
        local_error = err
    outcomes = groups.all_gather((pending, _error_text(local_error), numbers, engine.repeats.ready()))
    pending = outcomes[0][0]
    failures = [(rank, text) for rank, (_, text, _, _) in enumerate(outcomes) if text]
    if failures:
        if groups.is_coordinator and pending is not None:
            storage.abort(pending)
        if local_error is not None:
            raise local_error
        raise CheckpointSaveError(f"Saving {storage.url(name)} failed on rank {failures[0][0]}: {failures[0][1]}")
    assert packed is not None and pending is not None
    agreed = plans.agreed([number for _, _, (number, _), _ in outcomes])
    key = f"{agreed}/{plans.agreed([repeat for _, _, (_, repeat), _ in outcomes])}"
    blobs = choice.keys if choice is not None else frozenset()
    # a commit across nodes runs where DCP's write ends: such saves are always written through DCP
    repeat = storage.node_layout is None and all(ready == key for _, _, _, ready in outcomes)
    request = RepeatRequest(packed.tensors, packed.plain, aliases, blobs, key, repeat)
    return packed, storage.here(pending), agreed, choice, request


def _tensor_bytes(packed: packing.Packed) -> int:
    """The bytes of tensor data this rank holds for a save (its shards of sharded tensors)."""
    total = 0
    for tensor in packed.tensors.values():
        local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
        total += local.numel() * local.element_size()
    return total


def _error_text(err: BaseException | None) -> str | None:
    if err is None:
        return None
    return f"{type(err).__name__}: {err}"


def _check_json(value: Any) -> None:
    try:
        json.dumps(value, allow_nan=True)
    except (TypeError, ValueError) as err:
        raise TypeError(
            f"Checkpoint metadata must be JSON-serializable (numbers, strings, lists, dicts): {err}"
        ) from None


__all__ = ["Checkpointer", "REPLACED_RETRIES", "Ref", "locate", "scoped"]
