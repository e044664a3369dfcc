"""Validated configuration for checkpointing.

Every option lives in :class:`CheckpointConfig`; it can be built in code, or from ``DCP_PLUGIN_*``
environment variables (which ``torchrun`` and ``accelerate launch`` pass to every rank).
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from dcp_plugin.errors import ConfigError

ASYNC_MODES = ("sync", "thread", "process")
AsyncMode = Literal["sync", "thread", "process"]
LOCAL_SCOPES = ("shared", "node")
LocalScope = Literal["shared", "node"]

ENV_PREFIX = "DCP_PLUGIN_"

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


@dataclass
class CheckpointConfig:
    """How checkpoints are written and read.

    Environment variables: each field ``name`` can be set as ``DCP_PLUGIN_<NAME>`` (upper case), for
    example ``DCP_PLUGIN_ASYNC_MODE=process`` or ``DCP_PLUGIN_THREAD_COUNT=4``; see :meth:`from_env`.
    """

    async_mode: AsyncMode = "thread"
    """``sync``: write before ``save`` returns. ``thread``: snapshot to host memory, write in a
    background thread. ``process``: snapshot to shared memory, write in a background daemon process
    (no GIL contention with training; the script needs an ``if __name__ == "__main__":`` guard)."""

    async_staging: bool | None = None
    """Copy the snapshot in the background too, so ``save`` returns almost at once and the loop waits for the copy
    only before it next changes the saved tensors. Optimizers in the saved state wait in their step pre-hook, and
    models whose buffers change in forward (BatchNorm statistics) in a forward pre-hook; code that changes saved
    tensors any other way (in-place edits, an EMA copy updated by hand) must call ``wait_for_staging()`` first.
    ``None`` (default): on in ``thread`` and ``process`` mode, on every host (with CUDA the device's DMA engine
    does the copy; on a CPU-only host the loop's next forward/backward overlaps it, which cost training less time
    than a copy at save time in the goodput benchmark); off in ``sync`` mode. ``False``: ``save`` returns once
    the snapshot is copied, so the live tensors may change right away (see :attr:`stages_in_background`)."""

    reuse_buffers: bool = True
    """Keep the host staging buffers between saves (one stager owned for the manager's life). Costs one
    copy of the state in host memory for the whole run; saves 2-3x of the blocking time."""

    pinned_memory: bool | None = None
    """Stage into page-locked memory for faster device-to-host copies. ``None``: when CUDA is present."""

    shared_memory: bool | None = None
    """Stage into shared memory so the ``process`` writer reads it without a copy. ``None``: in
    ``process`` mode."""

    thread_count: int = 2
    """Writer threads per rank."""

    sync_files: bool = True
    """fsync every file before the checkpoint is committed. Turning this off makes a crash shortly after
    a save able to lose it."""

    direct_io: bool = True
    """Write local checkpoint files with ``O_DIRECT``, past the page cache: about a third less writer CPU per
    byte, and the checkpoint does not push training data out of the cache. Where the filesystem refuses it
    (``SaveStats.direct_io`` is then ``False``) files go through the page cache. ``False``: always through the
    page cache, e.g. when the checkpoint is read again right away (a copy to a second tier reads it back)."""

    per_thread_copy_ahead: int = 10_000_000
    """Bytes each writer thread copies ahead of writing."""

    max_staging_bytes: int | None = None
    """``thread`` mode: stage the snapshot through a fixed host pool of this many bytes (an integer, or a size
    such as ``"512MiB"`` / ``"2GB"``), copied and written in waves, instead of one host copy of the whole
    state. Peak extra host memory is this budget plus at most one tensor larger than it. ``save`` returns (or,
    with ``async_staging``, the next optimizer step waits) once every tensor is in the pool, i.e. when all but
    the last ``max_staging_bytes`` are written. The pool is kept between saves (whatever ``reuse_buffers``
    says). ``None``: no bound (the whole state is staged at once)."""

    writer_nice: int | None = None
    """How much lower than training the background write runs (Linux): added to the nice value of the
    threads that write (never the training threads), whose I/O also moves to the lowest best-effort level.
    ``0`` keeps them at the training priority. ``None`` (automatic): ``10`` in ``process`` mode; ``0`` in
    ``thread`` mode, where the writer threads share the GIL with training and a lowered thread holding it keeps
    the loop waiting (the loop stall per save went from 36 ms to 348 ms in the goodput benchmark). Ignored in
    ``sync`` mode."""

    strict: bool = True
    """On load, a tensor the live state expects but the checkpoint lacks (or has with another shape) is an
    error. Set ``False`` to load what matches and report the rest as a warning."""

    allow_pickle: bool = False
    """Let values that are neither tensors nor JSON-like data (plain Python objects) be stored with
    pickle. Loading such a checkpoint then runs code from it; only enable for checkpoints you trust."""

    incremental: bool = True
    """Write only what changed: tensors that stay the same between saves (frozen parameters, and tensors unchanged
    since the previous save) are kept in shared files that later checkpoints refer to instead of writing them
    again. Every checkpoint stays complete to every reader; see docs/incremental.md."""

    full_save_every: int | None = None
    """With ``incremental``: every Nth save refers to no earlier checkpoint's data (``None``: only the first)."""

    blob_check_interval: float = 1800.0
    """With ``incremental``: a shared data file is read back and checked against its checksum after it is
    written, and again before a save refers to it once this many seconds passed since its last check (done in the
    background after saves, off the training thread, where saves come often enough). A file that fails a check is
    never referred to again: the next save writes its tensors afresh. ``0``: check before every save."""

    storage_options: dict[str, Any] = field(default_factory=dict)
    """Extra keyword arguments for the fsspec filesystem (for example ``{"endpoint_url": ...}`` for s3)."""

    local_scope: LocalScope = "shared"
    """Who can read the checkpoint directory. ``"shared"``: every rank (one node, or a shared filesystem).
    ``"node"``: each node has its own disk under the same path (NVMe instance stores, ``/dev/shm``); every node
    writes its ranks' files there, a checkpoint is committed once every node's part is durable (a commit across
    nodes), each node's part is copied to ``peer_replicas`` other nodes, and a restore reads each file from the
    nearest copy. Needs a local path. Incremental saves are off in this scope (each checkpoint holds its own
    files). See docs/multinode.md."""

    peer_replicas: int | None = None
    """With ``local_scope="node"``: how many other nodes keep a copy of each node's part (a ring by node rank).
    ``None``: 1 with ``local_scope="node"``, 0 otherwise. ``0``: no copies (losing a node's disk then loses its
    part, unless a remote tier has the checkpoint)."""

    def __post_init__(self) -> None:
        if self.async_mode not in ASYNC_MODES:
            raise ConfigError(f"async_mode={self.async_mode!r} is not supported; use one of {', '.join(ASYNC_MODES)}.")
        if isinstance(self.thread_count, bool) or not isinstance(self.thread_count, int) or self.thread_count < 1:
            raise ConfigError(f"thread_count={self.thread_count!r} must be an integer >= 1.")
        if not isinstance(self.per_thread_copy_ahead, int) or self.per_thread_copy_ahead < 1:
            raise ConfigError(f"per_thread_copy_ahead={self.per_thread_copy_ahead!r} must be a positive integer.")
        if self.full_save_every is not None and (
            isinstance(self.full_save_every, bool)
            or not isinstance(self.full_save_every, int)
            or self.full_save_every < 1
        ):
            raise ConfigError(
                f"full_save_every={self.full_save_every!r} must be a positive integer (every Nth save writes "
                "everything) or None."
            )
        interval = self.blob_check_interval
        if isinstance(interval, bool) or not isinstance(interval, (int, float)) or not interval >= 0:
            raise ConfigError(
                f"blob_check_interval={interval!r} must be a number of seconds >= 0 (0: check shared data before "
                "every save that refers to it)."
            )
        nice = self.writer_nice
        if nice is not None and (isinstance(nice, bool) or not isinstance(nice, int) or not 0 <= nice <= 19):
            raise ConfigError(
                f"writer_nice={self.writer_nice!r} must be an integer from 0 (normal priority) to 19, or None "
                "(automatic)."
            )
        for name in ("reuse_buffers", "sync_files", "direct_io", "strict", "allow_pickle", "incremental"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name}={getattr(self, name)!r} must be True or False.")
        for name in ("async_staging", "pinned_memory", "shared_memory"):
            if getattr(self, name) not in (None, True, False):
                raise ConfigError(f"{name}={getattr(self, name)!r} must be True, False or None (automatic).")
        if self.async_mode == "sync" and self.async_staging:
            raise ConfigError(
                "async_staging=True needs a background writer; use async_mode='thread' or 'process', "
                "or turn async_staging off."
            )
        if self.async_mode == "process" and self.shared_memory is False:
            raise ConfigError(
                "async_mode='process' hands the snapshot to the writer process through shared memory; "
                "leave shared_memory unset (or True), or use async_mode='thread'."
            )
        if self.max_staging_bytes is not None:
            self.max_staging_bytes = _check_staging_budget(self.max_staging_bytes, self.async_mode)
        if not isinstance(self.storage_options, Mapping):
            raise ConfigError("storage_options must be a mapping of fsspec keyword arguments.")
        self.storage_options = dict(self.storage_options)
        self._check_nodes()

    def _check_nodes(self) -> None:
        if self.local_scope not in LOCAL_SCOPES:
            raise ConfigError(
                f"local_scope={self.local_scope!r} is not supported; use 'shared' (every rank reads the directory) or "
                "'node' (each node has its own disk under the same path)."
            )
        replicas = self.peer_replicas
        if replicas is not None and (isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 0):
            raise ConfigError(
                f"peer_replicas={replicas!r} must be an integer >= 0 (or None: 1 with local_scope='node')."
            )
        if self.local_scope == "shared" and replicas:
            raise ConfigError(
                f"peer_replicas={replicas} copies each node's part of a checkpoint to other nodes, which needs "
                "local_scope='node' (node-local disks); with a shared directory every node reads the same files."
            )
        if self.local_scope == "node":
            self.incremental = False  # a node's part holds its own files: nothing refers to another checkpoint's

    @property
    def replicas(self) -> int:
        """How many other nodes keep a copy of each node's part: ``peer_replicas``, or its default for the scope."""
        if self.peer_replicas is not None:
            return self.peer_replicas
        return 1 if self.local_scope == "node" else 0

    @property
    def background_nice(self) -> int:
        """What ``writer_nice`` resolves to for this mode (0 in ``sync`` mode)."""
        if self.async_mode == "sync":
            return 0
        if self.writer_nice is not None:
            return self.writer_nice
        return 10 if self.async_mode == "process" else 0

    @property
    def is_async(self) -> bool:
        """Whether ``save`` returns before the files are written (``thread`` or ``process`` mode)."""
        return self.async_mode != "sync"

    @property
    def stages_in_background(self) -> bool:
        """Whether saves copy the snapshot in the background: ``async_staging``, or when it is ``None``, whether
        the mode is asynchronous (``thread`` or ``process``)."""
        if self.async_staging is not None:
            return self.async_staging
        return self.is_async

    def replace(self, **changes: Any) -> CheckpointConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_env(
        cls, environ: Mapping[str, str] | None = None, prefix: str = ENV_PREFIX, **overrides: Any
    ) -> CheckpointConfig:
        """Build a config from ``DCP_PLUGIN_*`` variables; ``overrides`` (given in code) win over them.

        Unknown ``DCP_PLUGIN_*`` names are an error, so a typo never silently falls back to a default.
        ``DCP_PLUGIN_STORAGE_OPTIONS`` takes JSON.
        """
        environ = os.environ if environ is None else environ
        fields = {f.name: f for f in dataclasses.fields(cls)}
        values: dict[str, Any] = {}
        variables: dict[str, tuple[str, str, Any]] = {}  # field -> (variable, value as set, value parsed)
        for key, raw in environ.items():
            if not key.startswith(prefix):
                continue
            name = key[len(prefix) :].lower()
            if name not in fields:
                if name in NON_CONFIG_ENV_NAMES:
                    continue
                raise ConfigError(unknown_variable_message(key, prefix))
            values[name] = _parse_env_value(key, raw, fields[name].default)
            variables[name] = (key, raw, values[name])
        values.update(overrides)
        try:
            return cls(**values)
        except ConfigError as err:
            from_env = {name: variables[name] for name in variables if name not in overrides}
            raise ConfigError(_name_the_variables(str(err), from_env)) from None

    @classmethod
    def resolve(cls, environ: Mapping[str, str] | None = None, **arguments: Any) -> CheckpointConfig:
        """The one rule of every entry point: arguments that were given (not ``None``) win, then
        ``DCP_PLUGIN_*`` variables, then the defaults."""
        return cls.from_env(environ, **{name: value for name, value in arguments.items() if value is not None})


def _name_the_variables(message: str, variables: dict[str, tuple[str, str, Any]]) -> str:
    """A validation message about fields that came from ``DCP_PLUGIN_*`` variables (field -> (variable, value as
    set, value parsed)), told in terms of the variables: ``async_mode='x' is not supported`` becomes
    ``DCP_PLUGIN_ASYNC_MODE='x' is not supported``; a message about other fields ends with the variables it names."""
    rest = dict(variables)
    for name, (key, raw, value) in variables.items():
        said = f"{name}={value!r}"
        if message.startswith(said):
            message = f"{key}={raw!r}{message[len(said) :]}"
            del rest[name]
            break
    mentioned = [f"{key}={raw!r}" for name, (key, raw, _) in rest.items() if re.search(rf"\b{name}\b", message)]
    return f"{message} (set in the environment: {', '.join(mentioned)})" if mentioned else message


def known_variables(prefix: str = ENV_PREFIX) -> list[str]:
    """Every ``DCP_PLUGIN_*`` variable a user sets (not the crash-testing ones, which are accepted unlisted)."""
    names = [f.name for f in dataclasses.fields(CheckpointConfig)]
    names += sorted(NON_CONFIG_ENV_NAMES - TESTING_ENV_NAMES)
    return [prefix + name.upper() for name in names]


def unknown_variable_message(key: str, prefix: str = ENV_PREFIX) -> str:
    """Names the closest known variable (difflib) and lists them all."""
    known = known_variables(prefix)
    close = difflib.get_close_matches(key.upper(), known, n=1, cutoff=0.6)
    hint = f" Did you mean {close[0]}?" if close else ""
    return f"Unknown environment variable {key}.{hint} Known ones are: {', '.join(known)}."


# Variables with our prefix that configure something other than CheckpointConfig (the adapters read them).
NON_CONFIG_ENV_NAMES = {
    *("enable", "dir", "keep_last", "log_metrics", "crash_at", "crash_group", "log_level"),
    *("remote", "remote_storage_options", "replicate_every_n_steps", "remote_keep_last"),  # dcp_plugin.tiers.two_tiers
}
TESTING_ENV_NAMES = {"crash_at", "crash_group"}
"""Crash injection for the crash-point tests (dcp_plugin.storage.faults): read, but never suggested to users."""


def _parse_env_value(key: str, raw: str, default: Any) -> Any:
    text = raw.strip()
    if key.endswith("STORAGE_OPTIONS"):
        import json

        try:
            parsed = json.loads(text or "{}")
        except json.JSONDecodeError as err:
            raise ConfigError(f"{key} must be a JSON object: {err}") from None
        return parsed
    optional_ints = {
        "FULL_SAVE_EVERY": "a positive integer or 'none'",
        "WRITER_NICE": "an integer from 0 to 19, or 'auto'",
        "PEER_REPLICAS": "an integer >= 0, or 'auto'",
    }
    expected = next((what for suffix, what in optional_ints.items() if key.endswith(suffix)), None)
    if expected is not None:
        if text.lower() in {"", "auto", "none"}:
            return None
        try:
            return int(text)
        except ValueError:
            raise ConfigError(f"{key}={raw!r} must be {expected}.") from None
    if key.endswith("MAX_STAGING_BYTES"):
        return None if text.lower() in {"", "none", "unbounded"} else text
    if default is None or isinstance(default, bool):
        lowered = text.lower()
        if default is None and lowered in {"", "auto", "none"}:
            return None
        if lowered in _TRUE:
            return True
        if lowered in _FALSE:
            return False
        raise ConfigError(f"{key}={raw!r} must be one of 1/0, true/false, yes/no, on/off.")
    if isinstance(default, int):
        try:
            return int(text)
        except ValueError:
            raise ConfigError(f"{key}={raw!r} must be an integer.") from None
    if isinstance(default, float):
        try:
            return float(text)
        except ValueError:
            raise ConfigError(f"{key}={raw!r} must be a number.") from None
    return text


_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*$", re.IGNORECASE)


def parse_size(value: int | str) -> int:
    """Bytes from an integer or a size string: ``"536870912"``, ``"512MiB"``, ``"1.5GiB"``, ``"2GB"``
    (``KB``/``MB``/``GB``/``TB`` are powers of 1000, ``KiB``/``MiB``/``GiB``/``TiB`` of 1024)."""
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a size")
    if isinstance(value, int):
        return value
    match = _SIZE.match(str(value))
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _SIZE_UNITS:
        raise ValueError(f"{value!r} is not a size; use bytes or a number with B, KiB, MiB, GiB, TiB, KB, MB, GB, TB")
    return int(float(match.group(1)) * _SIZE_UNITS[unit])


def _check_staging_budget(value: Any, async_mode: str) -> int:
    try:
        budget = parse_size(value)
    except ValueError as err:
        raise ConfigError(f"max_staging_bytes: {err}.") from None
    if budget < 1:
        raise ConfigError(f"max_staging_bytes={value!r} must be a positive size (or None for no bound).")
    if async_mode != "thread":
        why = (
            "hands the writer process the whole snapshot in shared memory"
            if async_mode == "process"
            else "writes straight from the live tensors and stages nothing"
        )
        raise ConfigError(
            f"max_staging_bytes bounds the staging of async_mode='thread'; async_mode={async_mode!r} {why}. "
            "Use async_mode='thread' with max_staging_bytes, or leave max_staging_bytes unset."
        )
    return budget
