"""How a Lightning checkpoint dict maps onto dcp-plugin state entries, and back.

Lightning hands a ``CheckpointIO`` one dict (``epoch``, ``global_step``, ``state_dict``, ``loops``,
``callbacks``, ``optimizer_states``, ``lr_schedulers``, ``hyper_parameters``, datamodule and hook-added
keys). Each top-level key becomes one entry of the checkpoint, so model weights are stored under the
usual DCP keys (``state_dict.<fqn>``). Keys that cannot name an entry (not a string, containing ``/``,
starting with ``__``) are kept together in one extra entry. Nothing is pickled: tensors go through DCP,
everything else through the safe encoding (integer keys such as optimizer parameter ids stay exact).

Sharded strategies store each optimizer as its own entry (``optimizer_0``...) keyed by parameter name,
so it can be resharded; :func:`id_keyed_optimizer_state` turns such a state back into the
parameter-id layout ``torch.optim.Optimizer.load_state_dict`` expects.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

LAYOUT_KEY = "lightning"
"""Key of the layout record in the manifest's ``metadata``."""
LAYOUT_VERSION = 1
MANIFEST_METADATA_KEY = "dcp_plugin_manifest_metadata"
"""A top-level key of a Lightning checkpoint dict whose (JSON-like) value goes into the manifest's
``metadata`` instead of the checkpoint (e.g. the metrics and save reasons the ``DCPCheckpoint`` callback
records for retention)."""
RUN_ID_KEY = "dcp_plugin_run_id"
"""A top-level key of a Lightning checkpoint dict naming the run that writes it (recorded in the manifest,
so retention knows the checkpoint is that run's)."""
EXTRA_ENTRY = "dcp_plugin_extra_keys"
RNG_ENTRY = "dcp_plugin_rng"
OPTIMIZER_PREFIX = "optimizer_"
RESERVED = (EXTRA_ENTRY, RNG_ENTRY)

FULL = "full"
"""Written by one process with full tensors (single device, DDP)."""
SHARDED = "sharded"
"""Written collectively by every rank, each with its own shards (FSDP, ModelParallel)."""


class LightningCheckpointError(ValueError):
    """A checkpoint cannot be used the way Lightning asked for; the message says why and what to do."""


@dataclass
class Layout:
    """What the manifest records about a Lightning checkpoint, so it can be rebuilt exactly."""

    kind: str
    optimizers: int = 0
    """Number of optimizers stored as separate FQN-keyed entries (sharded layout)."""
    rng: bool = False
    extra: bool = False

    def to_json(self) -> dict[str, Any]:
        return {
            "version": LAYOUT_VERSION,
            "kind": self.kind,
            "optimizers": self.optimizers,
            "rng": self.rng,
            "extra": self.extra,
        }

    @classmethod
    def from_manifest(cls, manifest: Mapping[str, Any], url: str) -> Layout:
        record = manifest.get("metadata", {}).get(LAYOUT_KEY)
        if record is None:
            raise LightningCheckpointError(
                f"{url} is a dcp-plugin checkpoint but was not written by the Lightning plugin (it has no "
                "Lightning checkpoint layout). Load it with CheckpointManager.load() instead."
            )
        if int(record.get("version", 0)) > LAYOUT_VERSION:
            raise LightningCheckpointError(
                f"{url} was written by a newer dcp-plugin (Lightning layout version {record.get('version')}); "
                "upgrade dcp-plugin to load it."
            )
        return cls(
            kind=str(record.get("kind", FULL)),
            optimizers=int(record.get("optimizers", 0)),
            rng=bool(record.get("rng", False)),
            extra=bool(record.get("extra", False)),
        )


def pop_manifest_metadata(checkpoint: dict[Any, Any]) -> tuple[dict[str, Any], str | None]:
    """Remove and return what a callback asked to be recorded in the manifest: the metadata (see
    MANIFEST_METADATA_KEY) and the run id (see RUN_ID_KEY)."""
    value = checkpoint.pop(MANIFEST_METADATA_KEY, None)
    run_id = checkpoint.pop(RUN_ID_KEY, None)
    if run_id is not None and not isinstance(run_id, str):
        raise LightningCheckpointError(f"checkpoint[{RUN_ID_KEY!r}] must be a string, got {type(run_id).__name__}.")
    if value is None:
        return {}, run_id
    if not isinstance(value, Mapping):
        raise LightningCheckpointError(
            f"checkpoint[{MANIFEST_METADATA_KEY!r}] must be a mapping of JSON-like values, got {type(value).__name__}."
        )
    return {key: item for key, item in value.items() if key != LAYOUT_KEY}, run_id


def step_of(checkpoint: Mapping[str, Any]) -> int:
    """The checkpoint's ``global_step`` (0 when missing or not a number)."""
    step = checkpoint.get("global_step", 0)
    try:
        step = int(step)
    except (TypeError, ValueError):
        return 0
    return max(step, 0)


def load_targets(manifest: Mapping[str, Any], *, rng: Any = None) -> dict[str, Any]:
    """A state to read every saved entry into as plain values (the RNG entry into ``rng``, or left out)."""
    state: dict[str, Any] = {entry: None for entry in manifest.get("entries", {}) if entry != RNG_ENTRY}
    if rng is not None:
        state[RNG_ENTRY] = rng
    return state


def is_entry_name(key: Any) -> bool:
    return isinstance(key, str) and bool(key) and "/" not in key and not key.startswith("__") and key not in RESERVED


def optimizer_entry(index: int) -> str:
    return f"{OPTIMIZER_PREFIX}{index}"


def split_checkpoint(
    checkpoint: Mapping[Any, Any], *, skip: tuple[str, ...] = (), reserved: tuple[str, ...] = ()
) -> tuple[dict[str, Any], bool]:
    """Top-level keys -> entries. Returns (entries, whether an extra-keys entry was needed).

    Keys in ``skip`` are left out (the caller stores them itself); keys that cannot name an entry, or
    that are in ``reserved``, go to the extra-keys entry.
    """
    entries: dict[str, Any] = {}
    extra: dict[Any, Any] = {}
    for key, value in checkpoint.items():
        if key in skip:
            continue
        if is_entry_name(key) and key not in reserved:
            entries[key] = value
        else:
            extra[key] = value
    if extra:
        entries[EXTRA_ENTRY] = extra
    return entries, bool(extra)


def join_checkpoint(entries: Mapping[str, Any], layout: Layout) -> dict[Any, Any]:
    """Inverse of :func:`split_checkpoint`: reserved entries dropped, optimizer entries of the sharded
    layout gathered into ``optimizer_states`` (FQN-keyed), extra keys merged back last."""
    checkpoint: dict[Any, Any] = {}
    optimizers = {optimizer_entry(i) for i in range(layout.optimizers)} if layout.kind == SHARDED else set()
    for key, value in entries.items():
        if key in RESERVED or key in optimizers:
            continue
        checkpoint[key] = value
    if optimizers:
        checkpoint["optimizer_states"] = [
            entries[optimizer_entry(i)] for i in range(layout.optimizers) if optimizer_entry(i) in entries
        ]
    extra = entries.get(EXTRA_ENTRY)
    if isinstance(extra, Mapping):
        checkpoint.update(extra)
    return checkpoint


def id_keyed_optimizer_state(state: Mapping[str, Any]) -> dict[str, Any]:
    """Turn an FQN-keyed optimizer state (``get_optimizer_state_dict``) into the parameter-id layout.

    Parameters are numbered in param-group order, which is how ``Optimizer.load_state_dict`` matches
    them to the live optimizer's parameters.
    """
    ids: dict[Any, int] = {}
    groups = []
    for group in state.get("param_groups", []):
        numbered = []
        for name in group["params"]:
            ids.setdefault(name, len(ids))
            numbered.append(ids[name])
        groups.append({**group, "params": numbered})
    per_param = {ids[name]: value for name, value in state.get("state", {}).items() if name in ids}
    return {"state": per_param, "param_groups": groups}
