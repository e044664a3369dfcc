"""Writing a save that repeats the structure of an earlier one, without DCP: one rank's files, and on the
coordinator the ``.metadata``, the manifest and the commit.

A :class:`RankTemplate` is made once per structure from the write items DCP planned for this rank in the save
before (which tensors this rank writes, under which ``Metadata`` index) and the save's tensors. It holds the
rank's file layout (:mod:`dcp_plugin.storage.layout`), the plain values DCP stores as byte items, the tensors kept
in shared blobs (incremental saves) and the tied tensors stored once. Each save then writes the laid-out files
(:meth:`RankTemplate.write`) and reports to the coordinator only what is not already known: each file's size and
checksum, and the storage entries that differ from the first repeat save's (every entry, that first time).
The coordinator (:class:`Coordinator`) renders ``.metadata`` from bytes pickled once
(:mod:`dcp_plugin.storage.metadata_file`) and ends the save like any other (:func:`dcp_plugin.storage.sealing.seal`).
"""

from __future__ import annotations

import ctypes
import io
import threading
import uuid
from collections import ChainMap, Counter
from collections.abc import Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.planner import WriteItemType

from dcp_plugin.storage.blobs import blob_name, chunk_key, fingerprint
from dcp_plugin.storage.layout import Image, RankLayout, Slot
from dcp_plugin.storage.metadata_file import MetadataFile
from dcp_plugin.storage.names import BLOBS, METADATA_NAME
from dcp_plugin.storage.record_writer import FileWriting, direct_io_of, on_writer_threads, open_record_file
from dcp_plugin.storage.sealing import Written, seal

ONE_FILE_BELOW = 32 * 2**20
"""As for saves DCP runs: a rank with fewer tensor bytes writes one file, ``thread_count`` files otherwise."""
_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)


@dataclass
class RepeatReport:
    """What one rank's write of a repeat save tells the coordinator (small: no per-tensor content after the first)."""

    files: dict[str, dict[str, Any]] = field(default_factory=dict)
    entries: dict[Any, _StorageInfo] = field(default_factory=dict)
    """Storage entries that differ from the rank's baseline (every entry when :attr:`baseline`)."""
    baseline: bool = False
    new_blobs: list[str] = field(default_factory=list)
    used_blobs: dict[str, dict[str, Any]] = field(default_factory=dict)
    fingerprints: dict[str, str] = field(default_factory=dict)
    direct_io: bool | None = None
    added: int = 0
    """Bytes of tensor data this rank wrote."""
    stored: int = 0
    """Bytes of tensor data this rank's entries refer to (each stored region once)."""
    error: str | None = None


@dataclass
class WriterContext:
    """What a committing writer knows about the save it belongs to (see :mod:`dcp_plugin.storage.dcp_io`)."""

    fs: Any
    path: Any
    root: Any
    strategy: Any
    pending: Any
    sync_files: bool
    direct_io: bool
    thread_count: int
    incremental: Any
    checkpoint_id: Any


class RankTemplate:
    """One rank's part of saves that repeat one structure (see the module docstring)."""

    def __init__(
        self,
        keys: list[str],
        layout: RankLayout,
        byte_items: list[Any],
        blob_items: list[tuple[Any, int]],
        tied: list[tuple[Any, Any]],
        staged: bool,
    ) -> None:
        self.keys = keys
        """The tensors' keys, by source position."""
        self.layout = layout
        self.byte_items = byte_items
        self.blob_items = blob_items
        self.tied = tied
        self.staged = staged
        """Whether saves copy every tensor into the images (the write runs after ``save`` returned)."""
        self.baseline: dict[Any, _StorageInfo] | None = None
        self.entries: Mapping[Any, _StorageInfo] = {}
        self._own_regions = {(info.relative_path, info.offset) for info in layout.entries.values()}
        self._own_bytes = sum(info.length for info in layout.entries.values())
        """This rank's storage entries of the last save written."""
        self._serialized: dict[str, tuple[str, bytes]] = {}
        self._loose: dict[int, torch.Tensor] = {}  # staging buffers of tensors kept in blobs

    @staticmethod
    def eligible(items: Sequence[Any], tensors: Mapping[str, Any], plain: Mapping[str, Any]) -> bool:
        """Whether saves of DCP's final write ``items`` can be written here: whole plain CPU tensors, plain values."""
        for item in items:
            if item.type == WriteItemType.BYTE_IO:
                if item.index.fqn not in plain:
                    return False
            elif not _whole_plain_tensor(item, tensors.get(item.index.fqn)):
                return False
        return True

    @classmethod
    def build(
        cls,
        items: Sequence[Any],
        tensors: Mapping[str, Any],
        plain: Mapping[str, Any],
        aliases: Mapping[str, str],
        blob_keys: frozenset[str],
        *,
        rank: int,
        thread_count: int,
        staged: bool,
    ) -> RankTemplate | None:
        """The template for DCP's final write ``items`` of this rank, or ``None`` when a save of them cannot be
        written here (a tensor that is not a whole plain CPU tensor, a byte item that is not a plain value)."""
        by_fqn = {item.index.fqn: item.index for item in items}
        keys: list[str] = []
        slots, byte_items, blob_items, tied = [], [], [], []
        for item in items:
            fqn = item.index.fqn
            if item.type == WriteItemType.BYTE_IO:
                if fqn not in plain:
                    return None
                byte_items.append(item.index)
                continue
            tensor = tensors.get(fqn)
            if not _whole_plain_tensor(item, tensor):
                return None
            primary = aliases.get(fqn)
            if primary is not None and primary in by_fqn:
                tied.append((item.index, by_fqn[primary]))
                continue
            position = len(keys)
            keys.append(fqn)
            if fqn in blob_keys:
                blob_items.append((item, position))
                continue
            address = None if staged or not tensor.is_contiguous() else tensor.data_ptr()
            slots.append(Slot(item.index, position, tensor.dtype, tuple(tensor.shape), address))
        total = sum(slot.nbytes for slot in slots)
        files = 1 if total < ONE_FILE_BELOW else thread_count
        layout = RankLayout.build(slots, files, f"__{rank}_", len(keys))
        return cls(keys, layout, byte_items, blob_items, tied, staged)

    # -- one save ------------------------------------------------------------------------------------
    def sources(self, tensors: Mapping[str, Any]) -> list[torch.Tensor]:
        """This save's tensors by source position."""
        return [tensors[key] for key in self.keys]

    def copies(self, sources: Sequence[torch.Tensor], stage_blobs: Sequence[int]) -> tuple[list, list]:
        """(targets, values) of this save's snapshot copy: into the images, and for the tensors kept in blobs at
        positions ``stage_blobs`` (read after ``save`` returned) into buffers of their own."""
        targets, values = self.layout.targets(sources)
        for position in stage_blobs:
            source = sources[position]
            buffer = self._loose.get(position)
            if buffer is None or buffer.dtype != source.dtype or buffer.shape != source.shape:
                buffer = self._loose[position] = torch.empty(source.shape, dtype=source.dtype)
            targets.append(buffer)
            values.append(source)
        return targets, values

    def staged_blob(self, position: int) -> torch.Tensor | None:
        return self._loose.get(position)

    def serialize(self, plain: Mapping[str, Any]) -> list[tuple[Any, bytes]]:
        """This save's byte items, as DCP stores them (``torch.save`` of the value); at ``save`` time, so a value
        changed afterwards is not what is saved. A value whose ``repr`` is unchanged keeps its bytes (plain values
        only: their ``repr`` says type and value exactly)."""
        out = []
        for index in self.byte_items:
            value = plain[index.fqn]
            text = repr(value)
            known = self._serialized.get(index.fqn)
            if known is None or known[0] != text:
                buffer = io.BytesIO()
                torch.save(value, buffer)
                known = self._serialized[index.fqn] = (text, buffer.getvalue())
            out.append((index, known[1]))
        return out

    def write(
        self, ctx: WriterContext, sources: Sequence[torch.Tensor], byte_values: list[tuple[Any, bytes]], rank: int
    ) -> RepeatReport:
        """Write this rank's files of one save (the images already hold its bytes; ``sources`` are read for the
        direct segments and, unstaged, for tensors kept in blobs)."""
        report = RepeatReport()
        entries = dict(self.layout.entries) if self.baseline is None else {}
        moving = self.layout.place_bytes(byte_values)
        files = [file for file in self.layout.files if file.entries or (file is self.layout.files[-1] and moving)]
        _write_files(ctx, files, sources, report)
        entries_now = ChainMap(moving, self.baseline or self.layout.entries)
        self._write_blobs(ctx, sources, rank, entries_now, moving, report)
        for index, primary in self.tied:
            moving[index] = entries_now[index] = entries_now[primary]
            digest = report.fingerprints.get(chunk_key(primary.fqn, primary.offset))
            if digest is not None:
                report.fingerprints[chunk_key(index.fqn, index.offset)] = digest
        if self.baseline is None:
            entries.update(moving)
            self.baseline, report.entries, report.baseline = dict(entries), entries, True
        else:
            report.entries = {index: info for index, info in moving.items() if self.baseline.get(index) != info}
        report.added += self._own_bytes + sum(len(data) for _, data in byte_values)
        regions = {(info.relative_path, info.offset): info.length for info in moving.values()}
        report.stored = self._own_bytes + sum(n for region, n in regions.items() if region not in self._own_regions)
        self.entries = entries_now
        return report

    def _write_blobs(
        self,
        ctx: WriterContext,
        sources: Sequence[torch.Tensor],
        rank: int,
        entries: MutableMapping[Any, _StorageInfo],
        moving: dict[Any, _StorageInfo],
        report: RepeatReport,
    ) -> None:
        plan = ctx.incremental
        if not self.blob_items:
            return
        fresh = []
        for item, position in self.blob_items:
            key = chunk_key(item.index.fqn, item.index.offset)
            earlier = plan.reuse.get(key)
            if item.index.fqn in plan.unchanged:
                if earlier is None:
                    raise RuntimeError(f"{item.index.fqn} was planned as unchanged, but the base has no chunk {key}")
                tensor, digest = None, earlier[1]
            else:
                staged = self._loose.get(position) if self.staged else None
                tensor = staged if staged is not None else sources[position]
                digest = fingerprint(tensor)
            if digest is not None:
                report.fingerprints[key] = digest
            if earlier is not None and digest is not None and earlier[1] == digest:
                moving[item.index] = entries[item.index] = earlier[0]
                report.used_blobs[earlier[0].relative_path] = plan.records[earlier[0].relative_path]
            else:
                fresh.append((item, tensor if tensor is not None else sources[position]))
        if not fresh:
            return
        area = ctx.root.url(ctx.root.work(BLOBS))
        area_path = type(ctx.path)(area)
        ctx.fs.mkdir(area_path)
        name = blob_name(plan.write_id, rank, 0)
        writing = FileWriting(
            lambda path: open_record_file(ctx.fs, path, direct=ctx.direct_io),
            lambda file, size, digest: report.files.__setitem__(file, {"size": size, "xxh3_128": digest}),
            fsync=ctx.sync_files,
        )
        resolved = {id(item): tensor for item, tensor in fresh}
        results = writing._write_file(
            _Resolver(resolved), ctx.fs.concat_path(area_path, name), name, [i for i, _ in fresh]
        )
        report.new_blobs.append(name)
        for result in results:
            moving[result.index] = entries[result.index] = result.storage_data
            report.added += result.storage_data.length


class _Resolver:
    """The one method of a DCP planner a :class:`FileWriting` calls: each write item's tensor."""

    def __init__(self, tensors: dict[int, torch.Tensor]) -> None:
        self._tensors = tensors

    def resolve_data(self, item: Any) -> torch.Tensor:
        return self._tensors[id(item)].detach()


def _whole_plain_tensor(item: Any, tensor: Any) -> bool:
    if type(tensor) not in _PLAIN_TENSORS or not tensor.is_cpu or tensor.layout != torch.strided:
        return False
    if tensor.is_quantized or tensor.is_conj() or tensor.is_neg():
        return False
    data = item.tensor_data
    chunk = data.chunk
    whole = tuple(chunk.sizes) == tuple(tensor.shape) and not any(chunk.offsets) and not any(item.index.offset or ())
    return whole and data.properties.dtype == tensor.dtype


def _memory(tensor: torch.Tensor, skip: int, length: int) -> memoryview:
    return memoryview((ctypes.c_char * length).from_address(tensor.data_ptr() + skip)).cast("B")


def _write_files(
    ctx: WriterContext, files: Sequence[Any], sources: Sequence[torch.Tensor], report: RepeatReport
) -> None:
    """Each file from its segments, ``thread_count`` files at a time; the first error is raised here."""
    waiting = list(reversed(files))
    direct: list[bool | None] = []
    lock = threading.Lock()
    failed = threading.Event()

    def drain() -> None:
        while not failed.is_set():
            with lock:
                if not waiting:
                    return
                file = waiting.pop()
            try:
                size, digest, used = _write_file(ctx, file, sources)
            except BaseException:
                failed.set()  # the other threads take no new file
                raise
            with lock:
                report.files[file.name] = {"size": size, "xxh3_128": digest}
                direct.append(used)

    on_writer_threads(drain, min(ctx.thread_count, len(files)))
    report.direct_io = direct_io_of(direct)


def _write_file(ctx: WriterContext, file: Any, sources: Sequence[torch.Tensor]) -> tuple[int, str, bool | None]:
    path = ctx.fs.concat_path(ctx.path, file.name)
    with open_record_file(ctx.fs, path, direct=ctx.direct_io, buffered=False) as out:
        try:
            for segment in file.segments:
                if isinstance(segment, Image):
                    room = memoryview(segment.buffer)
                    out.put(room[: segment.length], segment.offset, room)
                else:
                    out.put(_memory(sources[segment.source], segment.skip, segment.length), segment.offset)
            size, digest = out.close(fsync=ctx.sync_files)
        except BaseException:
            out.abandon()
            raise
    return size, digest, out.direct


class Coordinator:
    """The coordinator's part of saves that repeat one structure: ``.metadata`` from bytes pickled once, and the
    file references it needs checksums for."""

    def __init__(self, metadata: Metadata) -> None:
        self._template = metadata  # DCP's Metadata of the save the structure was planned in
        self._file: MetadataFile | None = None
        self._refs: Counter[str] = Counter()

    def finish(self, ctx: WriterContext, reports: Sequence[RepeatReport]) -> dict[str, Any]:
        """Write ``.metadata`` and commit; returns what every rank learns about the save."""
        failed = [(rank, report.error) for rank, report in enumerate(reports) if report.error]
        if failed:
            raise RuntimeError("; ".join(f"rank {rank}: {error}" for rank, error in failed))
        changed: dict[Any, _StorageInfo] = {}
        for report in reports:
            changed.update(report.entries)
        if any(report.baseline for report in reports):
            baseline = Metadata(
                state_dict_metadata=self._template.state_dict_metadata,
                planner_data=self._template.planner_data,
                storage_data=changed,
                version=self._template.version,
            )
            self._file = MetadataFile(baseline)
            self._refs = Counter(str(info.relative_path) for info in changed.values())
            changed = {}
        assert self._file is not None
        refs = self._refs.copy()
        for index, info in changed.items():
            refs[str(self._file.metadata.storage_data[index].relative_path)] -= 1
            refs[str(info.relative_path)] += 1
        storage_meta = StorageMeta(checkpoint_id=ctx.checkpoint_id, save_id=uuid.uuid4().hex)
        data = self._file.render(storage_meta, changed)
        files, blobs, fingerprints = {}, {}, {}
        for report in reports:
            for name, record in report.files.items():
                (blobs if name in report.new_blobs else files)[name] = record
            blobs.update(report.used_blobs)
            fingerprints.update(report.fingerprints)
        files[METADATA_NAME] = _write_metadata(ctx, data)
        needed = {name for name, count in refs.items() if count > 0}
        written = Written(files, blobs, fingerprints, needed, sum(report.stored for report in reports))
        write_id = None if ctx.incremental is None else ctx.incremental.write_id
        checked = seal(ctx.root, ctx.strategy, ctx.pending, written, write_id)
        return {
            "storage_meta": storage_meta,
            "blobs_checked": checked,
            "blobs": blobs,
            "added": sum(report.added for report in reports),
            "direct_io": direct_io_of([report.direct_io for report in reports]),
        }


def _write_metadata(ctx: WriterContext, data: bytes) -> dict[str, Any]:
    with open_record_file(ctx.fs, ctx.fs.concat_path(ctx.path, METADATA_NAME), direct=False, buffered=False) as out:
        out.put(memoryview(data), 0)
        size, digest = out.close(fsync=ctx.sync_files)
    return {"size": size, "xxh3_128": digest}


def rank_metadata(
    template: Metadata, entries: Mapping[Any, _StorageInfo], outcome: Mapping[str, Any], fingerprints: dict[str, str]
) -> Metadata:
    """What a rank's repeat save returns, as DCP's saves return their ``Metadata`` (``storage_data``: this rank's
    entries; the attributes a save sets after writing, as :mod:`dcp_plugin.storage.dcp_io` sets them)."""
    metadata = Metadata(
        state_dict_metadata=template.state_dict_metadata,
        planner_data=template.planner_data,
        storage_data=entries,
        storage_meta=outcome["storage_meta"],
        version=template.version,
    )
    metadata.dcp_plugin_direct_io = outcome["direct_io"]  # type: ignore[attr-defined]
    metadata.dcp_plugin_blobs_checked = outcome["blobs_checked"]  # type: ignore[attr-defined]
    metadata.dcp_plugin_blobs = outcome["blobs"]  # type: ignore[attr-defined]
    metadata.dcp_plugin_fingerprints = fingerprints  # type: ignore[attr-defined]
    metadata.dcp_plugin_bytes_added = outcome["added"]  # type: ignore[attr-defined]
    return metadata


__all__ = ["Coordinator", "RankTemplate", "RepeatReport", "WriterContext", "rank_metadata"]
