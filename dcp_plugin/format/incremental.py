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


class IncrementalTracker:
    """One checkpointer's memory between saves: the base checkpoint and the identity of each saved tensor."""

    def __init__(self, config: CheckpointConfig) -> None:
        self.enabled = config.incremental
        self.full_save_every = config.full_save_every
        self._base: tuple[str, str, str, int | None] | None = None  # (root URL, name, save_id, save number)
        self._saves = 0
        self._watches: dict[str, tuple[write_watch.Watch, int]] = {}  # key -> (watch, save number it was armed at)
        self._checks = BlobChecks(config.blob_check_interval)

    def plan(
        self,
        storage: CheckpointStorage,
        pending: PendingWrite,
        tensors: Mapping[str, Any],
        state: Mapping[str, Any],
        rank: int,
        frozen_from: Sequence[torch.nn.Module] = (),
    ) -> tuple[IncrementalPlan | None, list[tuple[str, str]]]:
        """The writer's plan for this save and the blobs it holds until the save is done (release them then).
        ``frozen_from``: more modules whose frozen parameters count, besides the models in ``state``."""
        if not self.enabled:
            return None, []
        write_id = shared.write_id_of_entry(pending.write_name)
        held = shared.hold(storage.root_url, [write_id])
        frozen = _frozen_storages([*models_in(state), *frozen_from])
        tensor_keys = {key for key, value in tensors.items() if isinstance(value, torch.Tensor)}
        keys = {key for key in tensor_keys if _identity(tensors[key]) in frozen}
        full = self.full_save_every is not None and self._saves % self.full_save_every == 0
        reuse: dict[str, Any] = {}
        records: dict[str, Any] = {}
        base_number = None
        if not full and self._base is not None and self._base[0] == storage.root_url:
            reuse, records = _reusable(storage, self._base[1], self._base[2], self._checks)
            held += shared.hold(storage.root_url, records)
            keys |= {key.rsplit("@", 1)[0] for key in reuse}
            base_number = self._base[3]
        keys &= tensor_keys
        unchanged = self._unchanged(tensors, keys, reuse, base_number)
        self._saves += 1
        plan = IncrementalPlan(write_id, rank, frozenset(keys), reuse, records, frozenset(unchanged))
        return plan, held

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

    def committed(self, storage: CheckpointStorage, plan: IncrementalPlan | None, metadata: Any) -> None:
        """A save ended (``metadata``: ``None`` if it failed): remember the blobs it wrote as checked (its writer
        read them back before committing), and check again the blobs it refers to whose last check is getting
        old, so that the next save finds them known intact. Runs after the write, off the training thread."""
        if plan is None or metadata is None:
            return
        area = storage.blob_area
        for name, (found, digest) in (getattr(metadata, "dcp_plugin_blobs_checked", None) or {}).items():
            self._checks.checked(f"{area}/{name}", found, digest)
        for name, record in plan.records.items():
            path = f"{area}/{name}"
            if self._checks.due(path):
                self._checks.recheck(storage.fs, path, record, is_local=storage.is_local)

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


def _frozen_storages(models: Sequence[torch.nn.Module]) -> set[tuple[Any, ...]]:
    return {
        _identity(parameter.detach())
        for model in models
        for parameter in model.parameters()
        if not parameter.requires_grad
    }


__all__ = ["IncrementalTracker"]
