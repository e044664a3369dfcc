"""``CheckpointManager``: the framework-agnostic object every adapter talks to.

It ties together the engine (how to write), the storage (where, and the commit protocol) and the
checkpoint format (what goes into a checkpoint).
"""

from __future__ import annotations

import logging
import time
import uuid
import warnings
from collections.abc import Mapping, MutableMapping
from typing import Any

from dcp_plugin import encoding, packing
from dcp_plugin.config import CheckpointConfig, ConfigError
from dcp_plugin.engine import CheckpointEngine, CheckpointLoadError, CheckpointSaveError, SaveStats
from dcp_plugin.policies import (
    SAVE_EVENTS,
    RetentionPolicy,
    SaveContext,
    SaveDecision,
    SaveEvent,
    SavePolicy,
    apply_retention,
    as_metrics,
    decide,
)
from dcp_plugin.state import models_in, optimizers_in, wrap_state
from dcp_plugin.storage import (
    CheckpointInfo,
    CheckpointNotFoundError,
    CheckpointStorage,
    PendingWrite,
    step_name,
)

log = logging.getLogger(__name__)

# How often a load starts over when the checkpoint it reads is replaced underneath it by another process.
_REPLACED_RETRIES = 4


class CheckpointManager:
    """Save and load training state as DCP checkpoints under one directory or URL.

    Args:
        directory: local path or fsspec URL (``s3://bucket/run``, ``memory://run``...). Created if missing.
        config: options; keyword arguments (e.g. ``async_mode="process"``) override its fields.
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

    ``state`` passed to :meth:`save` and :meth:`load` maps names to models, optimizers, other
    ``Stateful`` objects (anything with ``state_dict``/``load_state_dict``) and plain values.
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
        **overrides: Any,
    ) -> None:
        if save_policy is not None and not isinstance(save_policy, SavePolicy):
            raise TypeError(
                f"save_policy must be a SavePolicy (e.g. EveryNSteps(100)), got {type(save_policy).__name__}."
            )
        if retention is not None and not isinstance(retention, RetentionPolicy):
            raise TypeError(f"retention must be a RetentionPolicy (e.g. KeepLast(3)), got {type(retention).__name__}.")
        if engine is not None and (config is not None or overrides):
            raise ConfigError("Pass either engine= or config options, not both: a shared engine has its own config.")
        if engine is not None:
            config = engine.config
        else:
            config = (
                (config or CheckpointConfig()).replace(**overrides) if overrides else (config or CheckpointConfig())
            )
        self.config = config
        self.storage = CheckpointStorage(directory, config.storage_options)
        if config.async_mode == "process" and self.storage.protocol == "memory":
            raise ConfigError(
                "memory:// lives inside one process, but async_mode='process' writes from a separate process; "
                "use async_mode='thread' or 'sync' with memory://."
            )
        self.storage.check_root()
        self.engine = engine or CheckpointEngine(config, distributed=distributed)
        self._owns_engine = engine is None
        self.run_id = run_id or uuid.uuid4().hex
        self._staging_hooks: dict[int, Any] = {}
        self.history: list[SaveStats] = []
        self.save_policy = save_policy
        self.retention = retention
        self.should_stop = False
        """Set by :meth:`maybe_save` after a preemption save committed: the loop should exit now."""
        self.last_decision: SaveDecision | None = None
        self._last_saved_step: int | None = None
        self._retention_due = False
        if save_policy is not None:
            save_policy.install()

    @property
    def directory(self) -> str:
        return self.storage.root_url

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

        Returns when the snapshot is taken (with ``async_staging``: when it was started) and the write
        continues in the background. The next ``save``, ``load``, ``delete`` and ``close`` wait for it; its
        errors are raised by the next call. ``metadata`` (JSON-like, e.g. metrics) is stored in the
        manifest. ``name`` overrides the directory name (default ``step_000000042``).
        """
        started = time.perf_counter()
        self.engine.wait()
        self._retain()
        _check_json(dict(metadata or {}))
        name = name or step_name(step)
        wrapped = wrap_state(state)
        if self.config.async_staging:
            self._hook_optimizers(wrapped)

        engine = self.engine
        packed: packing.Packed | None = None
        pending: PendingWrite | None = None
        local_error: BaseException | None = None
        try:
            packed = packing.pack(
                wrapped, rank=engine.rank, world_size=engine.world_size, allow_pickle=self.config.allow_pickle
            )
            if engine.is_coordinator:
                pending = self.storage.begin_write(name, overwrite=overwrite)
        except Exception as err:  # noqa: BLE001 - reported on every rank below
            local_error = err
        outcomes = engine.all_gather((pending, _error_text(local_error)))
        pending = outcomes[0][0]
        failures = [(rank, text) for rank, (_, text) in enumerate(outcomes) if text]
        if failures:
            if engine.is_coordinator and pending is not None:
                self.storage.abort(pending)
            if local_error is not None:
                raise local_error
            raise CheckpointSaveError(
                f"Saving {self.storage.url(name)} failed on rank {failures[0][0]}: {failures[0][1]}"
            )
        assert packed is not None and pending is not None
        pending.manifest = {
            "step": step,
            "world_size": engine.world_size,
            "created": time.time(),
            "run_id": self.run_id,
            "save_id": uuid.uuid4().hex,
            "mode": self.config.async_mode,
            "entries": packed.entries,
            "metadata": dict(metadata or {}),
        }
        writer = self.storage.writer(
            pending,
            thread_count=self.config.thread_count,
            sync_files=self.config.sync_files,
            per_thread_copy_ahead=self.config.per_thread_copy_ahead,
        )
        stats = SaveStats(name=name, url=self.storage.url(name), step=step, mode=self.config.async_mode, blocking_s=0.0)
        on_failure = (lambda: self.storage.abort(pending)) if engine.is_coordinator else None
        engine.save(packed.flat, writer, stats=stats, started=started, on_failure=on_failure)
        self.history.append(stats)
        self._last_saved_step = step
        self._retention_due = True
        return stats

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
        if event not in SAVE_EVENTS:
            raise ValueError(f"event must be one of {', '.join(SAVE_EVENTS)}; got {event!r}.")
        self._retain()
        ctx = SaveContext(step=step, event=event, epoch=epoch, world_size=self.engine.world_size)
        # While an exception propagates the other ranks may not be here: no collectives then.
        gather = None if event == "exception" else self.engine.all_gather_control
        decision = decide(self.save_policy, ctx, gather)
        self.last_decision = decision
        if not decision:
            return None
        if event == "exception" and ctx.world_size > 1:
            log.warning("Not saving step %s on exception: the other ranks cannot join a save now.", step)
            return None
        stats = None
        if step != self._last_saved_step:
            metadata: dict[str, Any] = {"reasons": list(decision.reasons)}
            if metrics:
                metadata["metrics"] = as_metrics(metrics)
            stats = self.save(step, state, metadata=metadata)
        if self.save_policy is not None:
            self.save_policy.saved(ctx)  # also when this step was already saved: a checkpoint exists
        if decision.preemption or event == "exception":
            self.wait()
            self.should_stop = self.should_stop or decision.preemption
        return stats

    def _retain(self) -> None:
        """Apply the retention policy on the coordinator once the last save has committed."""
        if self.retention is None or not self._retention_due or not self.engine.is_coordinator:
            return
        if self.engine.in_flight is not None:
            return
        self._retention_due = False
        apply_retention(self.retention, self.storage, run_id=self.run_id)

    def wait_for_staging(self) -> None:
        """With ``async_staging``: block until the snapshot is copied. Call before changing parameters."""
        self.engine.wait_for_staging()

    def wait(self) -> SaveStats | None:
        """Block until the save in flight is committed, then apply retention; raises a failed save's error."""
        stats = self.engine.wait()
        self._retain()
        return stats

    def _hook_optimizers(self, state: Mapping[str, Any]) -> None:
        """With async staging, make the next mutation of saved tensors wait for the snapshot copy: every
        optimizer step, and the forward pass of models whose buffers change in forward (BatchNorm statistics)."""
        for optimizer in optimizers_in(state):
            if id(optimizer) not in self._staging_hooks:
                handle = optimizer.register_step_pre_hook(lambda *_args, **_kw: self.engine.wait_for_staging())
                self._staging_hooks[id(optimizer)] = handle
        for model in models_in(state):
            if id(model) not in self._staging_hooks and _has_persistent_buffers(model):
                handle = model.register_forward_pre_hook(lambda *_args: self.engine.wait_for_staging())
                self._staging_hooks[id(model)] = handle

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

        Default: the latest committed checkpoint. Stateful objects are loaded in place (sharded models
        and optimizers reshard to the current layout); plain values are replaced in ``state``.
        With ``strict`` (the config's default), any missing, unexpected or differently shaped tensor is an
        error listing all of them; otherwise they are reported as a warning.
        """
        strict = self.config.strict if strict is None else strict
        allow_pickle = self.config.allow_pickle if allow_pickle is None else allow_pickle
        self.engine.wait()
        for attempt in range(_REPLACED_RETRIES + 1):
            info = self._resolve_on_coordinator(step, name)
            try:
                return self._load_into(state, info, strict=strict, allow_pickle=allow_pickle)
            except CheckpointLoadError:
                # Another process replaced the checkpoint (or deleted it) while we read it. Tensors may have been
                # partly overwritten in place, but no entry was handed back yet: resolve again and start over.
                # (If every attempt fails, the live state is undefined and the error says so.)
                if attempt == _REPLACED_RETRIES or not self._replaced_since(info):
                    raise
                log.warning("%s was replaced while being read; reading it again.", info.url)
        raise AssertionError("unreachable")

    def _replaced_since(self, info: CheckpointInfo) -> bool:
        """Whether ``info`` is no longer the committed checkpoint under its name (decided on every rank alike)."""
        try:
            replaced = _save_id(self.storage.read_manifest(info.name)) != _save_id(info.manifest)
        except (FileNotFoundError, ValueError):
            replaced = True
        return any(self.engine.all_gather(replaced))

    def _load_into(
        self, state: MutableMapping[str, Any], info: CheckpointInfo, *, strict: bool, allow_pickle: bool
    ) -> CheckpointInfo:
        engine = self.engine
        source_rank = packing.skeleton_source_rank(engine.rank, int(info.manifest.get("world_size", 1)))
        metadata, missing = None, None
        try:
            metadata = self.storage.metadata_reader(info.name).read_metadata()
        except FileNotFoundError as err:
            missing = f"FileNotFoundError: {err}"
        missing = next((m for m in engine.all_gather(missing) if m), None)  # every rank fails alike, or none
        if missing is not None or metadata is None:
            raise CheckpointLoadError(f"Loading checkpoint {info.url} failed: {missing}")
        skeleton = packing.skeleton_target(metadata, source_rank)
        engine.load(skeleton, self.storage.metadata_reader(info.name), url=info.url)
        wrapped = wrap_state(state)
        try:
            document = encoding.loads(next(iter(skeleton.values())))
        except ValueError as err:  # torn read (replaced underneath us) or a damaged checkpoint
            plan = packing.LoadPlan(problems=[f"the checkpoint's skeleton is unreadable ({err})"])
        else:
            plan = packing.plan_load(wrapped, document, metadata, source_rank=source_rank, strict=strict)
        all_problems = engine.all_gather(plan.problems)
        if any(all_problems) and self._replaced_since(info):
            raise CheckpointLoadError(f"Loading checkpoint {info.url} failed: it was replaced while being read.")
        if any(all_problems):
            lines = []
            for rank, problems in enumerate(all_problems):
                prefix = f"rank {rank}: " if len(all_problems) > 1 else ""
                lines.extend(f"  - {prefix}{p}" for p in problems)
            raise packing.StateMismatchError(
                f"Checkpoint {info.url} does not match the state being loaded:\n" + "\n".join(lines) + "\n"
                "Load with strict=False to take what matches, or pass the state the checkpoint was saved from."
            )
        for warning in plan.warnings:
            warnings.warn(f"Loading {info.url}: {warning}", stacklevel=3)
        engine.load(plan.flat, self.storage.metadata_reader(info.name), url=info.url)
        if self._replaced_since(info):  # the reads above may have mixed two checkpoints: never hand that out
            raise CheckpointLoadError(f"Loading checkpoint {info.url} failed: it was replaced while being read.")
        plain = packing.finish_load(plan, wrapped, strict=strict, allow_pickle=allow_pickle)
        for key, value in plain.items():
            state[key] = value
        return info

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
        info = self._resolve_on_coordinator(step, name)
        saved = list(info.manifest.get("entries", {}))
        missing = [entry for entry in entries or [] if entry not in saved]
        if missing:
            raise CheckpointNotFoundError(f"{info.url} has no entries {missing}; it has {saved}.")
        state: dict[str, Any] = {entry: None for entry in (entries or saved)}
        self.load(state, name=info.name, allow_pickle=allow_pickle)
        return state

    def _resolve_on_coordinator(self, step: int | None, name: str | None) -> CheckpointInfo:
        result: CheckpointInfo | None = None
        error: BaseException | None = None
        if self.engine.is_coordinator:
            try:
                result = self._resolve(step, name)
            except Exception as err:  # noqa: BLE001 - re-raised on every rank
                error = err
        result, error = self.engine.broadcast((result, error))
        if error is not None:
            raise error
        assert result is not None
        return result

    def _resolve(self, step: int | None, name: str | None) -> CheckpointInfo:
        if name is not None:
            return self.storage.info(name)
        if step is not None:
            return self.storage.find_step(step)
        latest = self.storage.latest()
        if latest is None:
            leftovers = self.storage.incomplete()
            detail = f" ({len(leftovers)} incomplete write(s) ignored)" if leftovers else ""
            raise CheckpointNotFoundError(f"No committed checkpoint in {self.storage.root_url}{detail}.")
        return latest

    # -- listing and deleting --------------------------------------------------------------------
    def list(self) -> list[CheckpointInfo]:
        """Committed checkpoints, oldest first."""
        return self.storage.list()

    def latest(self) -> CheckpointInfo | None:
        return self.storage.latest()

    @property
    def steps(self) -> list[int]:
        return [info.step for info in self.list() if info.step is not None]

    def delete(self, step: int | None = None, *, name: str | None = None) -> None:
        """Delete a committed checkpoint (waits for a save in flight first). Coordinator only."""
        if (step is None) == (name is None):
            raise ValueError("Pass exactly one of step or name.")
        self.engine.wait()
        if self.engine.is_coordinator:
            self.storage.delete(name or step_name(step))  # type: ignore[arg-type]

    # -- lifecycle -------------------------------------------------------------------------------
    def close(self) -> None:
        """Wait for the save in flight, release resources, and raise any background error."""
        try:
            try:
                self.engine.wait()
                self._retain()
            finally:
                if self._owns_engine:
                    self.engine.close()
        finally:
            if self.save_policy is not None:
                self.save_policy.uninstall()
            for handle in self._staging_hooks.values():
                handle.remove()
            self._staging_hooks.clear()

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            try:
                self.close()
            except Exception as err:  # noqa: BLE001 - keep the original exception primary
                log.error("While handling an earlier error, closing the checkpoint manager failed: %s", err)


def _has_persistent_buffers(model: Any) -> bool:
    return any(
        name not in module._non_persistent_buffers_set
        for module in model.modules()
        for name, buffer in module._buffers.items()
        if buffer is not None
    )


def _save_id(manifest: Mapping[str, Any]) -> Any:
    return manifest.get("save_id", manifest.get("created"))


def _error_text(err: BaseException | None) -> str | None:
    if err is None:
        return None
    return f"{type(err).__name__}: {err}"


def _check_json(value: Any) -> None:
    import json

    try:
        json.dumps(value, allow_nan=True)
    except (TypeError, ValueError) as err:
        raise TypeError(
            f"Checkpoint metadata must be JSON-serializable (numbers, strings, lists, dicts): {err}"
        ) from None
