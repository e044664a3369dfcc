"""The checkpoint format: how a state mapping becomes one flat DCP state dict, and back.

Each rank writes a skeleton (see :mod:`dcp_plugin.format.encoding`) under ``__dcp_plugin__/skeleton/rank<r>``.
Entries whose content differs per rank (RNG states, :class:`~dcp_plugin.format.state.PerRank`) store their
tensors under ``<entry>/rank<r>``; all other tensors are stored under ``<entry>.<path>`` — the same keys
DCP's own flattening produces, so model weights are readable by other DCP tools. Plain values of Stateful entries
(an optimizer's ``param_groups``) are also stored as DCP byte items under DCP's keys
(:mod:`dcp_plugin.format.dcp_values`), so a resume through DCP alone finds them; dcp-plugin reads the skeleton.

Values saved once (every entry not marked per rank) come back as rank 0's on every rank, even where the ranks'
copies differed: DCP writes each such tensor from the lowest rank holding it (:mod:`dcp_plugin.engine.plans`), and
a load takes those entries' plain values from rank 0's skeleton (:func:`take_replicated`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata
from torch.distributed.checkpoint.state_dict_saver import _stateful_to_state_dict
from torch.distributed.checkpoint.stateful import Stateful

from dcp_plugin.format import dcp_values, encoding
from dcp_plugin.format.state import ModelState, defines_structure, is_per_rank, load_targets
from dcp_plugin.storage.reader import placeholder

log = logging.getLogger(__name__)

SKELETON_PREFIX = "__dcp_plugin__/skeleton/rank"
SKELETON_GRANULE = 1024
"""Skeletons are padded to a multiple of this many bytes: a plain value whose text grows or shrinks a little (a step
count, a learning rate) then leaves the save's structure (the skeleton's shape) as it was, and the next save can
be written as the last one was (:mod:`dcp_plugin.engine.repeat`)."""


class StateMismatchError(KeyError):
    """The live state and the checkpoint disagree (missing/unexpected keys, shapes)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


def skeleton_key(rank: int) -> str:
    return f"{SKELETON_PREFIX}{rank}"


def entry_prefix(name: str, per_rank: bool, rank: int) -> str:
    return f"{name}/rank{rank}" if per_rank else name


@dataclass
class Packed:
    """What one rank hands to DCP for a save."""

    tensors: dict[str, Any]
    """Every tensor under its checkpoint key (``model.layer.weight``, ``optimizer.state.layer.weight.exp_avg``)."""
    state_dict: dict[str, Any]
    """The same tensors nested by their path (``{"model": {"layer.weight": ...}, "optimizer": {"state": ...}}``):
    what DCP is handed, with the plain values DCP's own loaders look for (see :mod:`dcp_plugin.format.dcp_values`).
    DCP's own flattening turns its tensors into exactly the keys of :attr:`tensors` and records the nesting in
    ``.metadata`` (``planner_data``), so DCP's tools (``dcp_to_torch_save``, ``accelerate merge-weights``)
    rebuild ``{"model": ..., "optimizer": ...}`` instead of one flat mapping."""
    entries: dict[str, dict[str, Any]]
    plain: dict[str, Any] = field(default_factory=dict)
    """The plain values handed to DCP, under the keys DCP stores them (byte items: ``optim.param_groups.0.lr``)."""

    @property
    def flat(self) -> dict[str, Any]:
        """What the engine hands to DCP (the nested :attr:`state_dict`; DCP flattens it itself)."""
        return self.state_dict


def pack(state: Mapping[str, Any], *, rank: int, world_size: int, allow_pickle: bool) -> Packed:
    """Expand Stateful objects and encode everything into a flat ``{key: tensor}`` dict."""
    expanded = _stateful_to_state_dict(dict(state))
    flat: dict[str, Any] = {}
    nested: dict[str, Any] = {}
    entries: dict[str, dict[str, Any]] = {}
    plains: dict[str, Any] = {}
    for name, value in expanded.items():
        per_rank = is_per_rank(state[name])
        encoder = encoding.Encoder(entry_prefix(name, per_rank, rank), allow_pickle=allow_pickle)
        skeleton = encoder.encode(value)
        clash = flat.keys() & encoder.tensors.keys()
        if clash:
            raise encoding.EncodingError(f"State entries collide on checkpoint keys {sorted(clash)[:3]}; rename one.")
        flat.update(encoder.tensors)
        parents: dict[tuple[str, ...], dict[str, Any]] = {}
        for key, path in encoder.paths.items():
            _insert(nested, path, encoder.tensors[key], parents)
        if not per_rank and dcp_values.applies(state[name], value):
            for plain_path, plain in dcp_values.plain_values(name, value).items():
                if dcp_values.insert(nested, plain_path, plain):
                    plains[".".join(map(str, plain_path))] = plain
        entries[name] = {"per_rank": per_rank, "value": skeleton}
    # The checkpoint's format version is recorded once, in the manifest (see dcp_plugin.storage).
    document = {"rank": rank, "world_size": world_size, "entries": entries}
    flat[skeleton_key(rank)] = nested[skeleton_key(rank)] = encoding.dumps(document, SKELETON_GRANULE)
    entries_out = {n: {"per_rank": e["per_rank"]} for n, e in entries.items()}
    return Packed(tensors=flat, state_dict=nested, entries=entries_out, plain=plains)


def tied(tensors: Mapping[str, Any]) -> dict[str, str]:
    """Keys whose tensor views exactly the memory of an earlier key's tensor (tied weights, an optimizer state
    shared by them), mapped to that key: such a tensor is stored once and read back as one tensor."""
    plain = [(key, value) for key, value in tensors.items() if type(value) is torch.Tensor]
    starts = [value.data_ptr() for _, value in plain]
    nonzero = [start for start in starts if start]
    if len(set(nonzero)) == len(nonzero):  # two views of the same memory start at the same address
        return {}
    first: dict[tuple[Any, ...], str] = {}
    aliases: dict[str, str] = {}
    for key, value in plain:
        where = value.untyped_storage().data_ptr()
        if where == 0:  # no memory (empty, meta): nothing to share
            continue
        identity = (where, value.device, value.storage_offset(), value.shape, value.stride(), value.dtype)
        prior = first.setdefault(identity, key)
        if prior != key:
            aliases[key] = prior
    return aliases


def _insert(
    nested: dict[str, Any], path: tuple[str, ...], tensor: Any, parents: dict[tuple[str, ...], dict[str, Any]]
) -> None:
    """Put ``tensor`` at ``path`` in ``nested`` (dicts only, string keys: DCP joins them with '.' to the key);
    ``parents`` remembers the dict at each parent path already made (tensors of one dict come one after another)."""
    node = parents.get(path[:-1])
    if node is None:
        node = nested
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):  # pragma: no cover - a tensor path is never a prefix of another
                raise encoding.EncodingError(f"Checkpoint key {'.'.join(path)!r} runs through a tensor.")
            node = child
        parents[path[:-1]] = node
    if path[-1] in node:  # pragma: no cover - keys are unique, so paths are too
        raise encoding.EncodingError(f"Two tensors map to the checkpoint key {'.'.join(path)!r}.")
    node[path[-1]] = tensor


def skeleton_source_rank(rank: int, saved_world_size: int) -> int:
    """Which saved rank's skeleton (and per-rank state) this rank restores."""
    return rank if rank < saved_world_size else 0


def skeleton_target(metadata: Metadata, source_rank: int) -> dict[str, torch.Tensor]:
    key = skeleton_key(source_rank)
    entry = metadata.state_dict_metadata.get(key)
    if not isinstance(entry, TensorStorageMetadata):
        raise StateMismatchError(
            f"The checkpoint has no dcp-plugin skeleton for rank {source_rank}; it was not written by dcp-plugin "
            "or is damaged."
        )
    return {key: placeholder(tuple(entry.size), torch.uint8)}


def take_replicated(document: dict[str, Any], coordinator: dict[str, Any]) -> dict[str, Any]:
    """A rank's skeleton ``document`` with its entries saved once taken from rank 0's skeleton (``coordinator``):
    their plain values are then rank 0's, like their tensors. An entry whose tensors differ from rank 0's (each rank
    holds other keys, as with pipeline stages) stays this rank's own; per-rank entries always do."""
    own, first = document.get("entries", {}), coordinator.get("entries", {})
    entries = dict(own)
    for name, entry in own.items():
        other = first.get(name)
        if entry["per_rank"] or other is None or other["per_rank"]:
            continue
        if encoding.tensor_keys(entry["value"]) == encoding.tensor_keys(other["value"]):
            entries[name] = other
    return {**document, "entries": entries}


@dataclass
class LoadPlan:
    """Tensors to load in place, plus what to do with them afterwards."""

    flat: dict[str, Any] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    entries: dict[str, Any] = field(default_factory=dict)


def _size(tensor: Any) -> tuple[int, ...]:
    return tuple(int(s) for s in tensor.size())


def document_problem(document: Any) -> str | None:
    """What is wrong with a decoded skeleton document's structure, or ``None`` (checked before it is used)."""
    if not isinstance(document, dict) or not isinstance(document.get("entries", {}), dict):
        return "the skeleton is not a mapping of entries"
    for name, entry in document.get("entries", {}).items():
        if not isinstance(entry, dict) or not isinstance(entry.get("per_rank"), bool) or "value" not in entry:
            return f"entry {name!r} of the skeleton is malformed"
    return None


def plan_load(
    state: Mapping[str, Any], document: dict[str, Any], metadata: Metadata, *, source_rank: int, strict: bool
) -> LoadPlan:
    """Match the live state against the checkpoint; collect every problem instead of failing on the first."""
    plan = LoadPlan()
    saved = document.get("entries", {})
    md = metadata.state_dict_metadata
    shared = _SharedPlaceholders(metadata)
    for name, obj in state.items():
        entry = saved.get(name)
        if entry is None:
            message = f"entry {name!r} is not in the checkpoint (it has: {', '.join(sorted(saved)) or 'nothing'})"
            (plan.problems if strict else plan.warnings).append(message)
            continue
        plan.entries[name] = entry
        target_value = load_targets(obj)
        prefix = entry_prefix(name, entry["per_rank"], source_rank)
        target_tensors = _tensor_leaves(target_value, prefix)
        saved_keys = encoding.tensor_keys(entry["value"])
        structural = defines_structure(obj)
        unexpected, missing = [], sorted(set(target_tensors) - set(saved_keys))
        cast: list[str] = []
        for key in saved_keys:
            stored = md.get(key)
            if not isinstance(stored, TensorStorageMetadata):
                plan.problems.append(f"tensor {key!r} is referenced by the checkpoint but not stored in it (damaged)")
                continue
            live = target_tensors.get(key)
            if live is None:
                if structural:
                    unexpected.append(key)
                    if strict:
                        continue
                plan.flat[key] = shared.placeholder(key, stored)
            elif _size(live) != tuple(stored.size):
                plan.problems.append(f"shape mismatch for {key!r}: checkpoint {tuple(stored.size)}, live {_size(live)}")
            else:
                if live.dtype != stored.properties.dtype:
                    cast.append(f"{key} ({_dtype(stored.properties.dtype)} -> {_dtype(live.dtype)})")
                plan.flat[key] = live
        if cast:
            # copied into the live tensor as torch's copy_ casts (precision may be lost): a warning, not an error
            plan.warnings.append(
                f"{name!r}: tensors stored with another dtype than the live ones are cast to the live dtype "
                f"(checkpoint -> live): {_short(cast, prefix)}"
            )
        if unexpected:
            message = f"{name!r}: unexpected keys in checkpoint {_short(unexpected, prefix)}"
            (plan.problems if strict else plan.warnings).append(message)
        if missing:
            message = f"{name!r}: missing keys (live state has them, checkpoint does not) {_short(missing, prefix)}"
            (plan.problems if strict else plan.warnings).append(message)
    return plan


class _SharedPlaceholders:
    """Placeholders for tensors read without a live target; tensors stored in the same bytes (tied weights,
    stored once) get one placeholder, so they come back as one tensor, tied as they were saved."""

    def __init__(self, metadata: Metadata) -> None:
        self._metadata = metadata
        self._where: dict[str, tuple[Any, ...]] | None = None
        self._made: dict[tuple[Any, ...], torch.Tensor] = {}

    def placeholder(self, key: str, stored: TensorStorageMetadata) -> torch.Tensor:
        if self._where is None:
            self._where = {}
            for index, info in (self._metadata.storage_data or {}).items():
                place = (tuple(index.offset or ()), str(info.relative_path), int(info.offset), int(info.length))
                self._where[index.fqn] = (*self._where.get(index.fqn, ()), place)
        where = (self._where.get(key), tuple(stored.size), stored.properties.dtype)
        if where[0] is None or len(where[0]) != 1:
            return placeholder(tuple(stored.size), stored.properties.dtype)
        made = self._made.get(where)
        if made is None:
            made = self._made[where] = placeholder(tuple(stored.size), stored.properties.dtype)
        return made


def mismatch_error(url: str, problems_per_rank: list[list[str]]) -> StateMismatchError:
    """One error listing every rank's problems, and what to do about them."""
    lines = []
    for rank, problems in enumerate(problems_per_rank):
        prefix = f"rank {rank}: " if len(problems_per_rank) > 1 else ""
        lines.extend(f"  - {prefix}{p}" for p in problems)
    return StateMismatchError(
        f"Checkpoint {url} does not match the state being loaded:\n" + "\n".join(lines) + "\n"
        "Load with strict=False to take what matches, or pass the state the checkpoint was saved from."
    )


def finish_load(plan: LoadPlan, state: Mapping[str, Any], *, strict: bool, allow_pickle: bool) -> dict[str, Any]:
    """After DCP filled the tensors: rebuild each entry and hand it to its owner.

    Returns the decoded values of plain (non-Stateful) entries; the caller writes them back.
    """
    plain: dict[str, Any] = {}
    for name, entry in plan.entries.items():
        obj = state[name]
        prune = not strict and defines_structure(obj)

        def resolve(key: str, prune: bool = prune) -> Any:
            return plan.flat.get(key, _MISSING) if prune else plan.flat[key]

        value = encoding.decode(entry["value"], resolve, allow_pickle=allow_pickle)
        if prune:
            value = _drop_missing(value)
        if isinstance(obj, ModelState):
            obj.load_state_dict(value, strict=strict)
        elif isinstance(obj, Stateful):
            obj.load_state_dict(value)
        else:
            plain[name] = value
    return plain


_MISSING = object()


def _drop_missing(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _drop_missing(v) for k, v in value.items() if v is not _MISSING}
    if isinstance(value, list):
        return [_drop_missing(v) for v in value if v is not _MISSING]
    return value


def _tensor_leaves(value: Any, prefix: str) -> dict[str, Any]:
    encoder = encoding.Encoder(prefix, allow_pickle=True)
    encoder.encode(value)
    return encoder.tensors


def _dtype(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _short(keys: list[str], prefix: str, limit: int = 8) -> str:
    names = [k[len(prefix) + 1 :] if k.startswith(prefix + ".") else k for k in keys]
    shown = ", ".join(names[:limit])
    return f"[{shown}{', ...' if len(names) > limit else ''}] ({len(names)} in all)"
