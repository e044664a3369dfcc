"""Incremental saves: which tensors a save keeps in shared blobs, and which earlier bytes it may refer to.

The rule (see docs/incremental.md):

* **Placement** (cost only, never correctness): a tensor is kept in a shared blob when it views the bytes of a
  frozen parameter (``requires_grad=False``) of a model in the state (``ModelState``, or a module passed to
  ``save``) or of a module passed as ``frozen_from`` (Lightning's module), or when the base checkpoint kept it
  in a blob. Everything else goes to the checkpoint's own files, as without incremental saves; a state without
  frozen parameters is saved exactly as before.
* **Reuse** (correctness): a chunk kept in a blob is not written again only when the fingerprint of the bytes
  being saved (xxh3-128 of dtype, shape and content, computed by the writer on the snapshot) equals the
  fingerprint recorded when those blob bytes were committed, in the base checkpoint this save refers to. A
  changed tensor never matches, however it was changed (in place under ``no_grad``, through ``.data``,
  ``load_state_dict``, a new dtype or device).
* **Unchanged without reading** (cost): a frozen tensor whose memory the kernel watches for writes
  (:mod:`dcp_plugin.format.write_watch`) and that was not written since before the base's snapshot is neither
  staged nor fingerprinted: DCP is handed a one-element stand-in of its shape and dtype, and the writer refers
  to the base's bytes and carries their fingerprint over. Every other candidate is fingerprinted as above.
* The **base** is the checkpoint this checkpointer last saved or loaded in the same root, only while it is
  still committed with the same ``save_id`` and its blobs are there with their committed sizes.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from dcp_plugin.config import CheckpointConfig
from dcp_plugin.errors import CheckpointError
from dcp_plugin.format import write_watch
from dcp_plugin.format.state import models_in
from dcp_plugin.storage import CheckpointInfo, CheckpointStorage, PendingWrite
from dcp_plugin.storage import blobs as shared
from dcp_plugin.storage.blob_checks import BlobChecks
from dcp_plugin.storage.dcp_io import IncrementalPlan

log = logging.getLogger(__name__)


@dataclass
class Choice:
    """Which tensors a save keeps in blobs, and what its base offers, decided before the save's write is opened."""

    keys: frozenset[str]
    """The tensors (by checkpoint key) kept in shared blobs."""
    reuse: dict[str, Any] = field(default_factory=dict)
    records: dict[str, Any] = field(default_factory=dict)
    base_number: int | None = None


class IncrementalTracker:
    """One checkpointer's memory between saves: the base checkpoint and the identity of each saved tensor."""

    def __init__(self, config: CheckpointConfig) -> None:
        self.enabled = config.incremental
        self.full_save_every = config.full_save_every
        self._base: tuple[str, str, str, int | None] | None = None  # (root URL, name, save_id, save number)
        self._known: tuple[str, str, dict[str, Any], dict[str, Any]] | None = None  # (root, save_id, reuse, records)
        self._saves = 0
        self._watches: dict[str, tuple[write_watch.Watch, int]] = {}  # key -> (watch, save number it was armed at)
        self._checks = BlobChecks(config.blob_check_interval)

    def choose(
        self,
        storage: CheckpointStorage,
        tensors: Mapping[str, Any],
        state: Mapping[str, Any],
        frozen_from: Sequence[torch.nn.Module] = (),
    ) -> Choice | None:
        """Which tensors this save keeps in blobs and what the base offers (``None`` when saves are not
        incremental). ``frozen_from``: more modules whose frozen parameters count, besides the models in ``state``."""
        if not self.enabled:
            return None
        frozen = _frozen_storages([*models_in(state), *frozen_from])
        keys = _viewing(tensors, frozen) if frozen else set()
        full = self.full_save_every is not None and self._saves % self.full_save_every == 0
        choice = Choice(frozenset())
        if not full and self._base is not None and self._base[0] == storage.root_url:
            choice.reuse, choice.records = self._reusable(storage)
            keys |= {key.rsplit("@", 1)[0] for key in choice.reuse}
            choice.base_number = self._base[3]
        choice.keys = frozenset(key for key in keys if isinstance(tensors.get(key), torch.Tensor))
        return choice

    def plan(
        self,
        storage: CheckpointStorage,
        pending: PendingWrite,
        choice: Choice | None,
        tensors: Mapping[str, Any],
        rank: int,
    ) -> tuple[IncrementalPlan | None, list[tuple[str, str]]]:
        """The writer's plan for this save and the blobs it holds until the save is done (release them then)."""
        if choice is None:
            return None, []
        write_id = shared.write_id_of_entry(pending.write_name)
        held = shared.hold(storage.root_url, [write_id])
        held += shared.hold(storage.root_url, choice.records)
        unchanged = self._unchanged(tensors, set(choice.keys), choice.reuse, choice.base_number)
        self._saves += 1
        plan = IncrementalPlan(write_id, rank, choice.keys, choice.reuse, choice.records, frozenset(unchanged))
        return plan, held

    def _reusable(self, storage: CheckpointStorage) -> tuple[dict[str, Any], dict[str, Any]]:
        """What the base keeps in blobs known intact: from this process's memory of its commit, or read back."""
        assert self._base is not None
        known = self._known
        if known is None or known[:2] != (storage.root_url, self._base[2]):
            return _reusable(storage, self._base[1], self._base[2], self._checks)
        area = storage.blob_area
        intact = {
            name: record
            for name, record in known[3].items()
            if self._checks.intact(storage.fs, f"{area}/{name}", record, is_local=storage.is_local)
        }
        reuse = {key: where for key, where in known[2].items() if where[0].relative_path in intact}
        return reuse, {name: intact[name] for name in {where[0].relative_path for where in reuse.values()}}

    def _unchanged(
        self, tensors: Mapping[str, Any], keys: set[str], reuse: Mapping[str, Any], base_number: int | None
    ) -> set[str]:
        """The keys whose tensors nobody wrote since before the base's snapshot, and whose every chunk the base
        keeps in a blob. Every other watchable tensor is armed now, before this save's snapshot."""
        number, unchanged = self._saves, set()
        trusted = write_watch.trustworthy()
        for key in sorted(keys):
            tensor = tensors[key]
            known = self._watches.get(key)
            if trusted and known is not None and known[0].unwritten(tensor):
                if base_number is not None and known[1] <= base_number and _chunk_key(key, tensor) in reuse:
                    unchanged.add(key)
                continue
            armed = write_watch.watch(tensor) if trusted else None
            if armed is None:
                self._watches.pop(key, None)
            else:
                self._watches[key] = (armed, number)
        for key in self._watches.keys() - keys:
            del self._watches[key]
        if not write_watch.trustworthy():  # memory was pinned while the watches were read: none of them counts
            self._watches.clear()
            return set()
        return unchanged

    def stand_in(self, state_dict: dict[str, Any], plan: IncrementalPlan | None, tensors: Mapping[str, Any]) -> None:
        """Replace, in the nested dict handed to DCP, each unchanged tensor by a one-element stand-in of its
        shape and dtype: it is neither staged nor read (the writer refers to the base's bytes instead)."""
        if plan is None or not plan.unchanged:
            return
        stand_ins = {id(tensors[key]): _stand_in(tensors[key]) for key in plan.unchanged}
        _replace(state_dict, stand_ins)

    def committed(self, storage: CheckpointStorage, plan: IncrementalPlan | None, metadata: Any, save_id: str) -> None:
        """A save ended (``metadata``: ``None`` if it failed): remember what it keeps in blobs (the next save's base,
        without reading it back), the blobs it wrote as checked (its writer read them back before committing), and
        check again the blobs it refers to whose last check is getting old, so that the next save finds them known
        intact. Runs after the write, off the training thread."""
        if plan is None or metadata is None:
            return
        self._remember(storage, plan, metadata, save_id)
        area = storage.blob_area
        for name, (found, digest) in (getattr(metadata, "dcp_plugin_blobs_checked", None) or {}).items():
            self._checks.checked(f"{area}/{name}", found, digest)
        for name, record in plan.records.items():
            path = f"{area}/{name}"
            if self._checks.due(path):
                self._checks.recheck(storage.fs, path, record, is_local=storage.is_local)

    def _remember(self, storage: CheckpointStorage, plan: IncrementalPlan, metadata: Any, save_id: str) -> None:
        blobs = getattr(metadata, "dcp_plugin_blobs", None)
        fingerprints = getattr(metadata, "dcp_plugin_fingerprints", None)
        if blobs is None or fingerprints is None:
            self._known = None
            return
        reuse: dict[str, Any] = {}
        if plan.blob_keys:
            for index, where in (metadata.storage_data or {}).items():
                if index.fqn in plan.blob_keys and where.relative_path in blobs:
                    key = shared.chunk_key(index.fqn, index.offset)
                    if key in fingerprints:
                        reuse[key] = (where, fingerprints[key])
        self._known = (storage.root_url, save_id, reuse, dict(blobs))

    def saved(self, storage: CheckpointStorage, name: str, save_id: str) -> None:
        """The next save may refer to this one (checked against the storage when it does)."""
        if self.enabled:
            self._base = (storage.root_url, name, save_id, self._saves - 1)

    def loaded(self, storage: CheckpointStorage, info: CheckpointInfo) -> None:
        """A resumed run's first save may refer to the checkpoint it resumed from."""
        save_id = info.manifest.get("save_id")
        if self.enabled and isinstance(save_id, str):
            self._base = (storage.root_url, info.name, save_id, None)  # its bytes are fingerprinted once


def _reusable(
    storage: CheckpointStorage, name: str, save_id: str, checks: BlobChecks
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Per chunk key, where the base keeps its bytes in a blob and their fingerprint; and those blobs' records.
    Only blobs known intact count (see :class:`~dcp_plugin.storage.blob_checks.BlobChecks`). Empty when the base
    is gone, replaced or unreadable (the save then writes everything)."""
    try:
        info = storage.info(name)
        manifest = info.manifest
        fingerprints, blobs = manifest.get("fingerprints") or {}, manifest.get("blobs") or {}
        if manifest.get("save_id") != save_id or not fingerprints or not blobs:
            return {}, {}
        area = storage.blob_area
        present = {
            n: r for n, r in blobs.items() if checks.intact(storage.fs, f"{area}/{n}", r, is_local=storage.is_local)
        }
        metadata = storage.metadata_reader(info).read_metadata()
    except (CheckpointError, OSError, ValueError) as err:
        log.info("Writing every tensor of this save: the previous checkpoint %s cannot be used (%s).", name, err)
        return {}, {}
    own = manifest.get("files") or {}
    reuse: dict[str, Any] = {}
    records: dict[str, Any] = {}
    for index, where in (metadata.storage_data or {}).items():
        relative = where.relative_path
        key = shared.chunk_key(index.fqn, index.offset)
        if relative in present and relative not in own and key in fingerprints:
            reuse[key] = (where, fingerprints[key])
            records[relative] = present[relative]
    return reuse, records


def _chunk_key(key: str, tensor: torch.Tensor) -> str:
    """The chunk key of a whole plain tensor (the only kind that is watched)."""
    return shared.chunk_key(key, [0] * tensor.dim())


def _stand_in(tensor: torch.Tensor) -> torch.Tensor:
    return torch.zeros((), dtype=tensor.dtype).expand(tensor.shape)


def _replace(node: dict[str, Any], stand_ins: dict[int, torch.Tensor]) -> None:
    for name, value in node.items():
        if isinstance(value, dict):
            _replace(value, stand_ins)
        elif id(value) in stand_ins:
            node[name] = stand_ins[id(value)]


def _local(tensor: torch.Tensor) -> torch.Tensor:
    to_local = getattr(tensor, "to_local", None)
    return to_local() if callable(to_local) else tensor


def _identity(tensor: torch.Tensor) -> tuple[Any, ...]:
    """Which bytes a tensor views: storage, offset, shape, dtype (a state dict's tensor views its parameter's)."""
    local = _local(tensor)
    try:
        where = local.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):
        where = id(local)
    return (where, local.storage_offset(), tuple(local.shape), local.dtype)


def _viewing(tensors: Mapping[str, Any], frozen: set[tuple[Any, ...]]) -> set[str]:
    """The keys of ``tensors`` that view one of the ``frozen`` identities (those starting at one of their addresses
    are compared in full)."""
    starts = {identity[0] for identity in frozen}
    keys = set()
    for key, value in tensors.items():
        if type(value) is torch.Tensor and value.untyped_storage().data_ptr() not in starts:
            continue
        if isinstance(value, torch.Tensor) and _identity(value) in frozen:
            keys.add(key)
    return keys


def _frozen_storages(models: Sequence[torch.nn.Module]) -> set[tuple[Any, ...]]:
    frozen = [
        parameter
        for model in models
        for module in model.modules()
        for parameter in module._parameters.values()  # as parameters() finds them, without its per-name work
        if parameter is not None and not parameter.requires_grad
    ]
    return {_identity(parameter.detach()) for parameter in frozen}


__all__ = ["IncrementalTracker"]
