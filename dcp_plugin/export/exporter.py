"""Export one entry of a checkpoint as a file other tools read: safetensors (streamed), torch.save, or Lightning.

``safetensors`` streams: tensors are read through the checkpoint's verifying DCP reader a batch at a time (a
batch is one tensor, or several small ones up to :data:`BATCH_BYTES`), converted and appended to the output,
so peak memory is about the largest tensor plus one conversion chunk, whatever the checkpoint's size. Keys are
the entry's own keys (``--entry model`` gives a model's ``state_dict()`` names, as Hugging Face files have).

``torch`` writes what ``torch.save`` needs: the whole entry as one object (nesting and non-tensor values kept),
so the entry is in memory once (floating tensors are converted one at a time). ``lightning`` writes the single
``.ckpt`` file ``LightningModule.load_from_checkpoint`` reads (see :func:`~dcp_plugin.lightning.to_lightning_file`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any

from dcp_plugin.errors import CheckpointLoadError, CheckpointNotFoundError, ConfigError
from dcp_plugin.storage import CheckpointInfo, CheckpointStorage, open_url

log = logging.getLogger(__name__)

BUILT_IN_FORMATS = ("safetensors", "torch")
"""Formats written from one entry of any checkpoint; adapters add whole-checkpoint formats (Lightning's ``.ckpt``)."""
FORMAT_ENTRY_POINTS = "dcp_plugin.export_formats"
"""The entry-point group through which an adapter names a whole-checkpoint format without being imported."""

WholeCheckpointWriter = Callable[..., str]
"""``writer(checkpoint, output, *, storage_options, output_options) -> the output written``."""

_registered: dict[str, WholeCheckpointWriter] = {}
DTYPES = ("float32", "bfloat16", "float16")
BATCH_BYTES = 32 * 2**20
"""Small tensors are read together up to this many bytes (one DCP read per batch)."""

Progress = Callable[[int, int], Any]
"""Called with (bytes written so far, bytes the output will have)."""


@dataclass(frozen=True)
class ExportResult:
    """What an export wrote."""

    output: str
    """The file or directory written (a path or URL as given, or as the format's writer named it)."""
    format: str
    """The format written: ``safetensors``, ``torch`` or a registered one such as ``lightning``."""
    checkpoint: str
    """The URL of the checkpoint that was read."""
    entry: str | None
    """The state entry exported (``model``...); ``None`` when a format wrote the whole checkpoint."""
    tensors: int
    """How many tensors were written (``0`` when a registered format wrote the file)."""
    bytes: int
    """Bytes of tensor data written, after any ``dtype`` conversion (``0`` for registered formats)."""


def register_format(name: str, writer: WholeCheckpointWriter) -> None:
    """Make ``export_checkpoint(format=name)`` write the whole checkpoint with ``writer`` (adapters call this)."""
    _registered[name] = writer


def _format_entry_points() -> dict[str, Any]:
    return {point.name: point for point in entry_points(group=FORMAT_ENTRY_POINTS)}


def export_formats() -> tuple[str, ...]:
    """Every format ``export_checkpoint`` accepts, without importing the adapters that write them."""
    extra = sorted(set(_registered) | set(_format_entry_points()))
    return BUILT_IN_FORMATS + tuple(name for name in extra if name not in BUILT_IN_FORMATS)


def _whole_checkpoint_writer(format: str) -> WholeCheckpointWriter:
    if format not in _registered:
        _format_entry_points()[format].load()  # importing the adapter registers its writer
    return _registered[format]


def check_options(format: str, dtype: str | None, entry: str | None) -> None:
    """Refuse impossible options before anything is read."""
    formats = export_formats()
    if format not in formats:
        raise ConfigError(f"format={format!r} is not an export format; use one of {', '.join(formats)}.")
    if dtype is not None and dtype not in DTYPES:
        raise ConfigError(f"dtype={dtype!r} is not supported; use one of {', '.join(DTYPES)} (or leave it out).")
    if format not in BUILT_IN_FORMATS and (dtype is not None or entry is not None):
        raise ConfigError(
            f"format={format!r} writes the whole checkpoint as it was saved; dtype and entry apply to the "
            "safetensors and torch formats."
        )


def export_checkpoint(
    checkpoint: str | os.PathLike[str],
    output: str | os.PathLike[str],
    *,
    format: str = "safetensors",
    entry: str | None = None,
    dtype: str | None = None,
    storage_options: Mapping[str, Any] | None = None,
    output_options: Mapping[str, Any] | None = None,
    progress: Progress | None = None,
) -> ExportResult:
    """Write one entry of the checkpoint at ``checkpoint`` (a path or URL) to ``output`` (a path or fsspec URL).

    ``entry`` defaults to ``model`` (Accelerate, plain loops) or ``state_dict`` (Lightning). ``dtype`` converts
    floating tensors (``float32``, ``bfloat16``, ``float16``). ``storage_options`` are the fsspec options of the
    checkpoint's storage, ``output_options`` those of the output (default: the same).
    ``progress(written, total)`` is called with byte counts as a safetensors export advances. The output
    appears complete or not at all, and only once every byte read was checked against the checkpoint's checksums.
    """
    check_options(format, dtype, entry)
    options = dict(storage_options or {})
    out_options = dict(output_options) if output_options is not None else options
    if format not in BUILT_IN_FORMATS:
        writer = _whole_checkpoint_writer(format)
        written = writer(checkpoint, output, storage_options=options, output_options=out_options)
        return ExportResult(written, format, os.fspath(checkpoint), None, 0, 0)
    storage, name = open_url(checkpoint, options)
    info = storage.info(name)
    chosen = choose_entry(info, entry)
    if format == "torch":
        return _export_torch(storage, info, chosen, os.fspath(output), dtype, out_options)
    return _export_safetensors(storage, info, chosen, os.fspath(output), dtype, out_options, progress)


def choose_entry(info: CheckpointInfo, entry: str | None) -> str:
    """``entry``, checked to be in the checkpoint; by default ``model``, else Lightning's ``state_dict``."""
    saved = list(info.manifest.get("entries", {}))
    if entry is None:
        entry = next((e for e in ("model", "state_dict") if e in saved), None)
        if entry is None:
            raise CheckpointNotFoundError(f"{info.url} has no model weights to export; pick --entry from {saved}.")
    if entry not in saved:
        raise CheckpointNotFoundError(f"{info.url} has no entry {entry!r}; it has {saved}.")
    return entry


def _export_safetensors(
    storage: CheckpointStorage,
    info: CheckpointInfo,
    entry: str,
    output: str,
    dtype: str | None,
    options: dict[str, Any],
    progress: Progress | None,
) -> ExportResult:
    import torch

    from dcp_plugin.export.output import SafetensorsStream, TensorSpec, open_output

    reader = storage.metadata_reader(info)
    metadata = reader.read_metadata()
    tensors = entry_tensors(metadata, entry)
    if not tensors:
        raise CheckpointNotFoundError(
            f"Entry {entry!r} of {info.url} holds no tensors (only plain values), and a safetensors file holds "
            "tensors only; export it with --format torch (format='torch')."
        )
    target = getattr(torch, dtype) if dtype else None
    specs = [
        TensorSpec(output_key(key, entry), _output_dtype(stored, target), tuple(size))
        for key, (size, stored) in tensors
    ]
    engine = _engine()
    try:
        with open_output(output, options) as handle:
            stream = SafetensorsStream(handle, specs, {"format": "pt"})
            total = stream.bytes_written + sum(spec.nbytes for spec in specs)
            for batch in read_batches(engine, reader, info, tensors):
                _write_batch(stream, batch, entry, progress, total)
            stream.finish()
            _check_unchanged(storage, info)
    finally:
        engine.close()
    log.info("exported %s of %s to %s (%d tensors)", entry, info.url, output, len(specs))
    return ExportResult(output, "safetensors", info.url, entry, len(specs), stream.bytes_written)


def _write_batch(stream: Any, batch: dict[str, Any], entry: str, progress: Progress | None, total: int) -> None:
    """Append a batch and let go of it (a function, so no loop variable keeps the last tensor alive while the
    next batch is read)."""
    while batch:
        key = next(iter(batch))
        stream.write(output_key(key, entry), batch.pop(key))
        if progress is not None:
            progress(stream.bytes_written, total)


def output_key(key: str, entry: str) -> str:
    """The name a tensor of ``entry`` gets in the output: its key within the entry, or the entry's own name when the
    entry is one tensor."""
    return entry if key == entry else key[len(entry) + 1 :]


def entry_tensors(metadata: Any, entry: str) -> list[tuple[str, tuple[tuple[int, ...], Any]]]:
    """The tensors of ``entry`` in DCP's metadata (the entry itself when it is one tensor), as
    ``(key, (size, dtype))`` in storage order (file, offset), so that reading them in this order reads each file
    front to back."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    prefix = f"{entry}."
    where: dict[str, tuple[str, int]] = {}
    for index, stored in (metadata.storage_data or {}).items():
        place = (str(stored.relative_path), int(stored.offset))
        where[index.fqn] = min(where.get(index.fqn, place), place)
    found = [
        (key, (tuple(int(d) for d in item.size), item.properties.dtype))
        for key, item in metadata.state_dict_metadata.items()
        if (key.startswith(prefix) or key == entry) and isinstance(item, TensorStorageMetadata)
    ]
    return sorted(found, key=lambda pair: (where.get(pair[0], ("", 0)), pair[0]))


def read_batches(
    engine: Any, reader: Any, info: CheckpointInfo, tensors: list[tuple[str, tuple[tuple[int, ...], Any]]]
) -> Iterator[dict[str, Any]]:
    """Full-size tensors (shards of every rank assembled), one batch at a time, in the order of ``tensors``."""
    import torch

    batch: list[tuple[str, tuple[tuple[int, ...], Any]]] = []
    size = 0
    for key, (shape, dtype) in tensors:
        nbytes = int(torch.Size(shape).numel()) * dtype.itemsize
        if batch and size + nbytes > BATCH_BYTES:
            yield _read(engine, reader, info, batch)
            batch, size = [], 0
        batch.append((key, (shape, dtype)))
        size += nbytes
    if batch:
        yield _read(engine, reader, info, batch)


def _read(engine: Any, reader: Any, info: CheckpointInfo, batch: list[tuple[str, tuple[Any, Any]]]) -> dict[str, Any]:
    import torch

    shapes = {key: (tuple(shape), dtype) for key, (shape, dtype) in batch}
    planner = _keep_what_is_read_planner(shapes)
    # Shapes for DCP's plan without memory: one element broadcast to the full shape (never written into).
    state = {key: torch.empty((), dtype=dtype).expand(shape) for key, (shape, dtype) in shapes.items()}
    engine.load(state, reader, url=info.url, planner=planner)
    empty = {key: torch.empty(shape, dtype=dtype) for key, (shape, dtype) in shapes.items() if 0 in shape}
    return {key: planner.read[key] if key in planner.read else empty[key] for key in shapes}  # no bytes, no read


def _keep_what_is_read_planner(shapes: dict[str, tuple[tuple[int, ...], Any]]) -> Any:
    """A DCP load planner for exports: a tensor stored whole is kept as the reader decoded it (no copy into a
    preallocated tensor, so it is in memory once); a tensor stored in shards is assembled into a tensor
    allocated at its first shard."""
    import torch
    from torch.distributed.checkpoint import DefaultLoadPlanner

    class KeepWhatIsRead(DefaultLoadPlanner):
        def __init__(self) -> None:
            super().__init__(allow_partial_load=False)
            self.read: dict[str, torch.Tensor] = {}

        def take_tensor(self, item: Any, tensor: torch.Tensor) -> bool:
            fqn = item.dest_index.fqn
            if tuple(tensor.shape) != shapes[fqn][0] or fqn in self.read:
                return False
            self.read[fqn] = tensor
            return True

        def lookup_tensor(self, index: Any) -> torch.Tensor:
            if index.fqn not in self.read:
                shape, dtype = shapes[index.fqn]
                self.read[index.fqn] = torch.empty(shape, dtype=dtype)
            return self.read[index.fqn]

    return KeepWhatIsRead()


def _engine() -> Any:
    from dcp_plugin.config import CheckpointConfig
    from dcp_plugin.engine.checkpoint_engine import CheckpointEngine

    return CheckpointEngine(CheckpointConfig(async_mode="sync"), distributed=False)


def _output_dtype(stored: Any, target: Any) -> Any:
    return target if target is not None and stored.is_floating_point else stored


def _check_unchanged(storage: CheckpointStorage, info: CheckpointInfo) -> None:
    """The checkpoint was not replaced while it was read (else the output could mix two checkpoints)."""
    try:
        now = storage.info(info.name).manifest.get("save_id")
    except (CheckpointNotFoundError, ValueError):
        now = None
    if now != info.manifest.get("save_id"):
        raise CheckpointLoadError(f"Exporting {info.url} failed: it was replaced or deleted while being read.")


def _export_torch(
    storage: CheckpointStorage, info: CheckpointInfo, entry: str, output: str, dtype: str | None, options: dict
) -> ExportResult:
    import torch

    from dcp_plugin.checkpointer import Checkpointer
    from dcp_plugin.config import CheckpointConfig
    from dcp_plugin.export.output import open_output

    checkpointer = Checkpointer(CheckpointConfig(async_mode="sync"), distributed=False)  # reads through `storage`
    try:
        value = checkpointer.read((storage, info.name), entries=[entry])[entry]
    finally:
        checkpointer.close()
    holder = [value]  # so that a bare tensor is converted in place too
    counted = _convert_in_place(holder, getattr(torch, dtype) if dtype else None)
    with open_output(output, options) as handle:
        torch.save(holder[0], handle)
    log.info("exported %s of %s to %s (torch.save)", entry, info.url, output)
    return ExportResult(output, "torch", info.url, entry, counted[0], counted[1])


def _convert_in_place(value: list[Any], dtype: Any) -> list[int]:
    """Convert floating tensors in nested dicts and lists one at a time (the old one is freed before the next);
    returns [tensor count, bytes]."""
    import torch

    counted = [0, 0]

    def visit(container: Any, keys: Any) -> None:
        for key in keys:
            item = container[key]
            if torch.is_tensor(item):
                if dtype is not None and item.is_floating_point():
                    item = container[key] = item.to(dtype)
                counted[0] += 1
                counted[1] += item.numel() * item.element_size()
            elif isinstance(item, dict):
                visit(item, list(item))
            elif isinstance(item, list):
                visit(item, range(len(item)))

    visit(value, range(len(value)))
    return counted


__all__ = [
    "BATCH_BYTES",
    "BUILT_IN_FORMATS",
    "DTYPES",
    "ExportResult",
    "check_options",
    "export_checkpoint",
    "export_formats",
    "register_format",
]
