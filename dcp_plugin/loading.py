"""Loading one committed checkpoint: read its skeleton, match it against the live state, read the tensors in
place, and start over if another process replaces the checkpoint while it is read (a load never hands out a mix
of two checkpoints)."""

from __future__ import annotations

import contextlib
import gc
import logging
import warnings
from collections.abc import Callable, Iterator, Mapping, MutableMapping
from typing import Any

from dcp_plugin.engine.checkpoint_engine import CheckpointEngine
from dcp_plugin.engine.failures import describe as _describe
from dcp_plugin.engine.groups import ProcessGroups
from dcp_plugin.errors import CheckpointCorruptError, CheckpointError, CheckpointLoadError, UnsafeCheckpointError
from dcp_plugin.format import dcp_layout, encoding, packing
from dcp_plugin.format.state import OptimizerState, wrap_state
from dcp_plugin.storage import CheckpointInfo, CheckpointStorage, direct_load
from dcp_plugin.storage.plain import LAYOUT

log = logging.getLogger(__name__)

Resolver = Callable[[], CheckpointInfo]

# How often a load starts over when the checkpoint it reads is replaced underneath it by another process.
REPLACED_RETRIES = 4


def load_committed(
    engine: CheckpointEngine,
    storage: CheckpointStorage,
    resolve: Resolver,
    state: MutableMapping[str, Any],
    *,
    strict: bool,
    allow_pickle: bool,
) -> CheckpointInfo:
    """Load the checkpoint ``resolve`` names (asked on the coordinator, again after a replacement) into
    ``state``; a damaged checkpoint's error names the newest older one that verifies."""
    for attempt in range(REPLACED_RETRIES + 1):
        info = resolve_on_coordinator(engine.groups, resolve)
        try:
            with collection_paused():
                return _load_once(engine, storage, state, info, strict=strict, allow_pickle=allow_pickle)
        except CheckpointCorruptError as err:
            if attempt < REPLACED_RETRIES and _replaced_since(engine.groups, storage, info):
                log.warning("%s was replaced while being read; reading it again.", info.url)
                continue
            raise CheckpointCorruptError(f"{err} {_fallback_hint(storage, info)}") from None
        except CheckpointLoadError:
            # Another process replaced the checkpoint (or deleted it) while we read it. Tensors may have been
            # partly overwritten in place, but no entry was handed back yet: resolve again and start over.
            # (If every attempt fails, the live state is undefined and the error says so.)
            if attempt == REPLACED_RETRIES or not _replaced_since(engine.groups, storage, info):
                raise
            log.warning("%s was replaced while being read; reading it again.", info.url)
    raise AssertionError("unreachable")


@contextlib.contextmanager
def collection_paused() -> Iterator[None]:
    """Python's cyclic garbage collector off while a load runs or a save takes its state apart: both make many
    small objects per tensor (metadata, plans, skeletons) and no cycles, and each of them counts towards a full pass
    over the training process's whole heap (measured: 40 ms to unpickle the metadata of 4,096 tensors, 430 ms with
    the collector on; torch pauses it in get_state_dict too)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def resolve_on_coordinator(groups: ProcessGroups, resolve: Resolver) -> CheckpointInfo:
    result: CheckpointInfo | None = None
    error: BaseException | None = None
    if groups.is_coordinator:
        try:
            result = resolve()
        except Exception as err:  # noqa: BLE001 - re-raised on every rank
            error = err
    result, error = groups.broadcast((result, error))
    if error is not None:
        raise error
    assert result is not None
    return result


def _fallback_hint(storage: CheckpointStorage, info: CheckpointInfo) -> str:
    fallback = storage.newest_verified_before(info)
    if fallback is None:
        return "No older checkpoint in this directory verifies."
    return f"The newest older checkpoint that verifies is {fallback.url} (load it by name: {fallback.name!r})."


def _replaced_since(groups: ProcessGroups, storage: CheckpointStorage, info: CheckpointInfo) -> bool:
    """Whether ``info`` is no longer the committed checkpoint under its name (decided on every rank alike)."""
    try:
        replaced = _save_id(storage.read_manifest(info.name)) != _save_id(info.manifest)
    except (FileNotFoundError, ValueError):
        replaced = True
    return any(groups.all_gather(replaced))


def _load_once(
    engine: CheckpointEngine,
    storage: CheckpointStorage,
    state: MutableMapping[str, Any],
    info: CheckpointInfo,
    *,
    strict: bool,
    allow_pickle: bool,
) -> CheckpointInfo:
    """One attempt, reading every file through one descriptor (see ``holding_files``); live optimizers given
    state to load into get none back if the attempt fails."""
    wrapped = wrap_state(state)
    reader = storage.metadata_reader(info)
    try:
        with reader.holding_files():
            if info.layout == LAYOUT:
                return _load_dcp_layout(engine, storage, state, wrapped, reader, info, strict=strict)
            return _load_skeleton_layout(
                engine, storage, state, wrapped, reader, info, strict=strict, allow_pickle=allow_pickle
            )
    except BaseException:
        for obj in wrapped.values():
            if isinstance(obj, OptimizerState):
                obj.discard_load_targets()
        raise


def _load_skeleton_layout(
    engine: CheckpointEngine,
    storage: CheckpointStorage,
    state: MutableMapping[str, Any],
    wrapped: Mapping[str, Any],
    reader: Any,
    info: CheckpointInfo,
    *,
    strict: bool,
    allow_pickle: bool,
) -> CheckpointInfo:
    """Read the skeleton, match it against the live state, read the tensors in place."""
    groups = engine.groups
    source_rank = packing.skeleton_source_rank(groups.rank, int(info.manifest.get("world_size", 1)))
    metadata, missing = None, None
    try:
        metadata = reader.read_metadata()
    except FileNotFoundError as err:
        missing = f"FileNotFoundError: {err}"
    missing = next((m for m in groups.all_gather(missing) if m), None)  # every rank fails alike, or none
    if missing is not None or metadata is None:
        raise CheckpointLoadError(f"Loading checkpoint {info.url} failed: {missing}")
    skeleton = packing.skeleton_target(metadata, source_rank)
    if source_rank != 0:
        skeleton.update(packing.skeleton_target(metadata, 0))  # values saved once are rank 0's
    try:
        # the tensor read below hashes these files anyway; the rest is checked last
        _read_tensors(engine, reader, metadata, skeleton, info.url, verify=False)
    except CheckpointLoadError:
        _raise_if_damaged(groups, reader)  # damaged bytes explain the failure better than what they broke
        raise
    damage, plan = None, packing.LoadPlan()
    try:
        document = encoding.loads(skeleton[packing.skeleton_key(source_rank)])
        damage = packing.document_problem(document)
        if damage is None and source_rank != 0:
            coordinator = encoding.loads(skeleton[packing.skeleton_key(0)])
            damage = packing.document_problem(coordinator)
            document = document if damage else packing.take_replicated(document, coordinator)
        if damage is None:
            plan = packing.plan_load(wrapped, document, metadata, source_rank=source_rank, strict=strict)
    except (ValueError, TypeError, KeyError, AttributeError) as err:  # torn read, or a damaged checkpoint
        damage = f"{type(err).__name__}: {err}"
    damage = next((d for d in groups.all_gather(damage) if d), None)
    if damage is not None:
        _raise_if_damaged(groups, reader)
        if _replaced_since(groups, storage, info):
            raise CheckpointLoadError(f"Loading checkpoint {info.url} failed: it was replaced while being read.")
        raise CheckpointCorruptError(
            f"The skeleton of checkpoint {info.url} (its non-tensor state) is unreadable ({damage}); the checkpoint "
            "is damaged or forged. Load an earlier checkpoint."
        )
    all_problems = groups.all_gather(plan.problems)
    if any(all_problems) and _replaced_since(groups, storage, info):
        raise CheckpointLoadError(f"Loading checkpoint {info.url} failed: it was replaced while being read.")
    if any(all_problems):
        raise packing.mismatch_error(info.url, all_problems)
    for warning in plan.warnings:
        warnings.warn(f"Loading {info.url}: {warning}", stacklevel=6)
    _read_tensors(engine, reader, metadata, plan.flat, info.url, verify=True)
    _raise_if_damaged(groups, reader)
    if _replaced_since(groups, storage, info):  # the reads above may have mixed two checkpoints: never hand out
        raise CheckpointLoadError(f"Loading checkpoint {info.url} failed: it was replaced while being read.")
    try:
        plain = packing.finish_load(plan, wrapped, strict=strict, allow_pickle=allow_pickle)
    except encoding.EncodingError as err:
        kind = UnsafeCheckpointError if "pickle" in str(err).lower() else CheckpointCorruptError
        raise kind(f"Loading checkpoint {info.url} failed: {err}") from None
    for key, value in plain.items():
        state[key] = value
    return info


def _load_dcp_layout(
    engine: CheckpointEngine,
    storage: CheckpointStorage,
    state: MutableMapping[str, Any],
    wrapped: Mapping[str, Any],
    reader: Any,
    info: CheckpointInfo,
    *,
    strict: bool,
) -> CheckpointInfo:
    """A checkpoint written by plain ``dcp.save`` (no skeleton): matched by DCP's keys, as ``dcp.load`` does."""
    groups = engine.groups
    metadata = reader.read_metadata()
    plan = dcp_layout.plan_dcp_load(wrapped, metadata, strict=strict)
    all_problems = groups.all_gather(plan.problems)
    if any(all_problems):
        raise packing.mismatch_error(info.url, all_problems)
    for warning in plan.warnings:
        warnings.warn(f"Loading {info.url}: {warning}", stacklevel=6)
    _read_tensors(engine, reader, metadata, plan.flat, info.url, verify=True)
    _raise_if_damaged(groups, reader)
    if _replaced_since(groups, storage, info):
        raise CheckpointLoadError(f"Loading checkpoint {info.url} failed: it was replaced while being read.")
    for key, value in dcp_layout.finish_dcp_load(plan, wrapped, strict=strict).items():
        state[key] = value
    return info


def _read_tensors(
    engine: CheckpointEngine, reader: Any, metadata: Any, flat: dict[str, Any], url: str, *, verify: bool
) -> None:
    """Fill ``flat`` in place: what the reader's direct path takes first (local files: every record straight
    into its tensor, no per-tensor Python), the rest (DTensors, resharding, casts, object stores...) with
    ``dcp.load``, which every rank joins when any rank has something left. ``verify=False`` defers the files'
    checks to ``finish_verification``. A failure on any rank fails the read on every rank alike."""
    rest: dict[str, Any] = {}
    failure: Exception | None = None
    try:
        rest = direct_load.read_direct(reader, flat, metadata, verify=verify)
    except Exception as err:  # noqa: BLE001 - every rank raises below
        failure = err
    line = None if failure is None else (_kind(failure), _describe(failure))
    outcomes = engine.groups.all_gather((line, bool(rest)))
    failed = [(rank, failed_line) for rank, (failed_line, _) in enumerate(outcomes) if failed_line]
    if failed:
        if isinstance(failure, CheckpointError) and len(outcomes) == 1:
            raise failure
        kind = _KINDS[failed[0][1][0]]
        lines = "; ".join(f"rank {rank}: {text}" if len(outcomes) > 1 else text for rank, (_, text) in failed)
        raise kind(f"Loading checkpoint {url} failed: {lines}") from failure
    if any(has_rest for _, has_rest in outcomes):
        reader.defer_verification = not verify
        try:
            engine.load(rest, reader, url=url)
        finally:
            reader.defer_verification = False
        flat.update(rest)  # DCP replaces plain values (byte items) in the dict it is given


_KINDS: dict[str, type[CheckpointError]] = {
    "corrupt": CheckpointCorruptError,
    "unsafe": UnsafeCheckpointError,
    "load": CheckpointLoadError,
}


def _kind(err: BaseException) -> str:
    if isinstance(err, CheckpointCorruptError):
        return "corrupt"
    return "unsafe" if isinstance(err, UnsafeCheckpointError) else "load"


def _raise_if_damaged(groups: Any, reader: Any) -> None:
    """Raise :class:`CheckpointCorruptError` naming the damaged file if a file the load used fails its checksum."""
    damage = next((d for d in groups.all_gather(reader.finish_verification()) if d), None)
    if damage is not None:
        raise CheckpointCorruptError(f"{damage[0]}. It was not loaded.")


def _save_id(manifest: Mapping[str, Any]) -> Any:
    return manifest.get("save_id", manifest.get("created"))
