"""DCP readers that trust nothing in the checkpoint they read.

``.metadata`` is read size-bounded and without running code; every path in it must name one plain file inside
the checkpoint directory; offsets, lengths and declared tensor sizes are checked against the files before
anything is allocated; only regular files are opened, never blocking. Each data file is hashed and compared with
the checksum committed in the manifest, and a mismatch fails the load naming the file. Remote files are hashed
while DCP's items are read (one sequential pass); local files are hashed before any byte is used, then read
from the page cache straight into the tensors.

A load of dcp-plugin reads twice through one reader: first the small skeleton, then the tensors. The skeleton
read defers verification (``defer_verification``); :meth:`finish_verification` afterwards hashes any file that
was used but not fully read and verified by the tensor read, so every byte a load used is checked.
"""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Callable, Mapping
from contextlib import contextmanager
from typing import Any

import torch
import xxhash
from torch.distributed._shard._utils import narrow_tensor_by_index
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader
from torch.distributed.checkpoint.filesystem import FileSystem
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, ReadItem
from torch.futures import Future

from dcp_plugin.errors import CheckpointCorruptError, UnsafeCheckpointError
from dcp_plugin.storage.integrity import ALGORITHM, blob_area_of, check_checkpoint_files, shared_directory
from dcp_plugin.storage.metadata_checks import check_items, check_records, local_first_hole, memory_bytes
from dcp_plugin.storage.names import MANIFEST_NAME, METADATA_NAME
from dcp_plugin.storage.node_parts import missing_file, part_of
from dcp_plugin.storage.read_io import (
    FileRegion,
    advance,
    hash_descriptor,
    read_exactly,
    span,
)
from dcp_plugin.storage.root import StorageRoot
from dcp_plugin.storage.safe_io import MAX_METADATA_BYTES, open_local_regular, read_bounded, regular_file_size
from dcp_plugin.storage.safety import loads_metadata

log = logging.getLogger(__name__)

_WARNED_UNCHECKED: set[str] = set()


class _RegularFilesOnly(FileSystem):
    """DCP's local filesystem, opening only regular files (no FIFO, device or symbolic link; never blocks)."""

    @contextmanager
    def create_stream(self, path: Any, mode: str) -> Any:
        if "r" in mode and "+" not in mode:
            with open_local_regular(os.fspath(path)) as stream:
                yield stream
            return
        with super().create_stream(path, mode) as stream:
            yield stream


class _Places:
    """Where each data file named in a checkpoint's metadata is, and its committed record (``files``, or ``blobs``
    for the shared files an incremental checkpoint uses). Nothing else can be named.

    On a local disk every file is read from the checkpoint directory itself, shared ones included (the commit
    links each blob there): what is verified is what any DCP reader of the directory reads, and the directory
    needs nothing outside itself. On object stores a blob is read from the root's shared blob area."""

    def __init__(self, root: StorageRoot, directory: str, files: dict[str, Any] | None, blobs: Any) -> None:
        self.root, self.directory, self.files = root, directory, files
        self.blobs: dict[str, Any] = dict(blobs) if isinstance(blobs, dict) else {}
        self.fetched: dict[str, str] = {}
        """Files of the checkpoint a restore fetched elsewhere on this machine, checked as they arrived."""

    def path(self, relative: str) -> str:
        if relative in self.fetched:
            return self.fetched[relative]
        return f"{shared_directory(self.root, self.directory, relative, self.files or {}, self.blobs)}/{relative}"

    def record(self, relative: str) -> Any:
        if self.files is None:
            return None
        return self.files[relative] if relative in self.files else self.blobs.get(relative)

    def check(self, names: list[str]) -> list[str]:
        root = self.root
        return check_checkpoint_files(
            root.fs,
            self.directory,
            self.files or {},
            blob_area=blob_area_of(root),
            blobs=self.blobs,
            is_local=root.is_local,
            only=names,
        )


class _Distrustful:
    """Mixed into DCP readers: see the module docstring."""

    fs: Any
    defer_verification = False
    """While set, files are read without being hashed (the caller must call :meth:`finish_verification`)."""
    bound_allocations = True
    """Refuse metadata declaring a tensor or value larger than this machine's memory (off to verify files only)."""
    fetch_missing: Callable[[list[str]], Mapping[str, str]] | None = None
    """Called by every rank at the start of each read with the names of the files its part of the read uses
    (collective): a restore on node-local disks fetches those this node lacks and returns where each file it fetched
    is, checked against its checksum as it arrived (so it is not hashed again)."""

    def _init_checks(self, root: StorageRoot, directory: str, shown: str, manifest: Mapping[str, Any]) -> None:
        self._dcp_plugin_root = root
        self._dcp_plugin_directory = directory
        self._dcp_plugin_shown = shown
        files = manifest.get("files")
        self._dcp_plugin_files: dict[str, Any] | None = dict(files) if isinstance(files, dict) else None
        self._dcp_plugin_places = _Places(root, directory, self._dcp_plugin_files, manifest.get("blobs"))
        self._dcp_plugin_verified: set[str] = set()
        self._dcp_plugin_used: set[str] = set()
        self._dcp_plugin_plain = manifest.get("layout") == "dcp"
        self._dcp_plugin_part = part_of(manifest)
        if root.is_local:
            self.fs = _RegularFilesOnly()

    # -- metadata -------------------------------------------------------------------------------------
    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        root, directory, shown = self._dcp_plugin_root, self._dcp_plugin_directory, self._dcp_plugin_shown
        path = f"{directory}/{METADATA_NAME}"
        shown_path = root.url(path)
        if self._dcp_plugin_files is not None:
            self._check_whole_files([METADATA_NAME])
        data = read_bounded(root.fs, path, is_local=root.is_local, limit=MAX_METADATA_BYTES, what="metadata file")
        try:
            metadata = loads_metadata(data)
        except UnsafeCheckpointError as err:
            raise UnsafeCheckpointError(f"{shown_path}: {err}") from None
        except Exception as err:  # noqa: BLE001 - any damage to the pickle stream
            raise CheckpointCorruptError(
                f"The metadata file {shown_path} of checkpoint {shown} is unreadable ({type(err).__name__}: {err}); "
                "the checkpoint is damaged. Load an earlier checkpoint."
            ) from None
        if not isinstance(metadata, Metadata):
            raise CheckpointCorruptError(f"{shown_path} does not hold DCP metadata; the checkpoint is damaged.")
        self._check_metadata(metadata, shown_path)
        if getattr(metadata, "storage_meta", None) is not None:
            metadata.storage_meta.load_id = self.load_id  # type: ignore[attr-defined,union-attr]
        return metadata

    def _check_metadata(self, metadata: Metadata, shown_path: str) -> None:
        """Every file the metadata points at stays inside the checkpoint and holds the bytes it claims; every tensor
        it declares is well formed and fits in its records (:mod:`~dcp_plugin.storage.metadata_checks`); so
        nothing is allocated from a forged size."""
        root, places = self._dcp_plugin_root, self._dcp_plugin_places

        def size_of(relative: str) -> int:
            record = places.record(relative)
            if record is not None:
                return int(record["size"])
            try:
                return regular_file_size(root.fs, places.path(relative), is_local=root.is_local)
            except FileNotFoundError:
                shown = root.url(places.path(relative))
                raise CheckpointCorruptError(f"Data file {shown} is missing; the checkpoint is damaged.") from None

        def first_hole(relative: str, offsets: list[int]) -> int | None:
            if not root.is_local:
                return None
            try:
                return local_first_hole(places.path(relative), offsets)
            except FileNotFoundError:
                if self._elsewhere(relative):
                    return None
                shown = root.url(places.path(relative))
                raise CheckpointCorruptError(f"Data file {shown} is missing; the checkpoint is damaged.") from None

        stored = check_records(metadata, shown_path, size_of, first_hole)
        check_items(metadata, shown_path, stored, memory_bytes() if self.bound_allocations else None)

    # -- data -----------------------------------------------------------------------------------------
    def read_data(self, plan: Any, planner: Any) -> Any:
        storage_data = self.storage_data  # type: ignore[attr-defined]
        per_file: dict[str, list[Any]] = {}
        try:
            for item in plan.items:
                per_file.setdefault(str(storage_data[item.storage_index].relative_path), []).append(item)
        finally:
            if self.fetch_missing is not None:  # collective: the other ranks must not wait for this one in vain
                self._use_fetched(self.fetch_missing(sorted(per_file)))
        for relative, items in per_file.items():
            self._read_file(relative, items, planner)
        done: Future = Future()
        done.set_result(None)
        return done

    def _read_file(self, relative: str, items: list[Any], planner: Any) -> None:
        root = self._dcp_plugin_root
        path = self._dcp_plugin_places.path(relative)
        files = self._dcp_plugin_files
        record = self._dcp_plugin_places.record(relative)
        if files is not None and record is None:
            raise CheckpointCorruptError(f"Checkpoint {self._dcp_plugin_shown} has no checksum for {relative}.")
        if files is None:
            self._warn_unchecked()
        try:
            size = regular_file_size(root.fs, path, is_local=root.is_local)
        except FileNotFoundError:
            self._raise_damaged(missing_file(relative, self._dcp_plugin_part))
        if record is not None and size != record["size"]:
            self._raise_damaged(f"{relative} has {size} bytes, {record['size']} were committed")
        hashing = record is not None and relative not in self._dcp_plugin_verified and not self.defer_verification
        storage_data = self.storage_data  # type: ignore[attr-defined]
        items = sorted(items, key=lambda it: span(storage_data[it.storage_index]))
        if not hashing and record is not None and relative not in self._dcp_plugin_verified:
            self._dcp_plugin_used.add(relative)  # before the read: a read that fails on damaged bytes is checked too
        if root.is_local and size > 0:
            self._read_local(path, relative, items, planner, expected=record if hashing else None)
        else:
            self._read_streamed(path, relative, size, items, planner, expected=record if hashing else None)
        if hashing:
            self._dcp_plugin_verified.add(relative)

    def _read_local(self, path: str, relative: str, items: list[Any], planner: Any, expected: Any) -> None:
        """Local files: verify the whole file before any byte is used (a damaged file leaves live tensors
        untouched), then read each stored item from the page cache straight into the tensor it becomes."""
        storage_data = self.storage_data  # type: ignore[attr-defined]
        with open_local_regular(path) as handle:
            fd = handle.fileno()
            size = os.fstat(fd).st_size
            if expected is not None and hash_descriptor(fd) != expected[ALGORITHM]:
                self._raise_damaged(f"{relative} does not match its checksum (the file was changed or damaged)")
            for item in items:
                info = storage_data[item.storage_index]
                if info.offset + info.length > size:
                    self._raise_damaged(f"{relative} ends early (at {size} bytes)")
                with FileRegion(fd, info.offset, info.length) as raw:
                    self._use(item, info, raw, planner)

    def _read_streamed(
        self, path: str, relative: str, size: int, items: list[Any], planner: Any, expected: Any
    ) -> None:
        """Remote files: one sequential pass, hashing every byte (gaps included) while items are read."""
        storage_data = self.storage_data  # type: ignore[attr-defined]
        hasher = xxhash.xxh3_128() if expected is not None else None
        hashing = hasher is not None
        failure: BaseException | None = None
        with self.fs.create_stream(path, "rb") as stream:  # type: ignore[attr-defined]
            position, cached_span, data = 0, None, b""
            for item in items:
                info = storage_data[item.storage_index]
                where = span(info)
                if where != cached_span:
                    if info.offset < position:
                        self._raise_damaged(f"{relative} has overlapping items in the metadata")
                    position = advance(stream, hasher, position, info.offset, hashing)
                    data = read_exactly(stream, info.length)
                    if len(data) != info.length:
                        self._raise_damaged(f"{relative} ends early (at {position + len(data)} bytes)")
                    if hasher is not None:
                        hasher.update(data)
                    position, cached_span = info.offset + info.length, where
                if failure is None:
                    try:
                        self._use(item, info, io.BytesIO(data), planner)
                    except Exception as err:  # noqa: BLE001 - the checksum decides what to report
                        failure = err
            if hasher is not None:
                advance(stream, hasher, position, size, True)
        if hasher is not None and hasher.hexdigest() != expected[ALGORITHM]:
            self._raise_damaged(f"{relative} does not match its checksum (the file was changed or damaged)")
        if failure is not None:
            raise failure

    def _use(self, item: Any, info: Any, raw: Any, planner: Any) -> None:
        """Hand one stored item to DCP's planner, as DCP's own reader does."""
        transforms = self.transforms  # type: ignore[attr-defined]
        source = transforms.transform_load_stream(item, info.transform_descriptors or (), raw)
        if item.type == LoadItemType.BYTE_IO:
            data = source.read(-1)
            check_plain_value(data, self._dcp_plugin_shown, item.storage_index.fqn)
            planner.load_bytes(item, io.BytesIO(data))
            return
        seekable = source if source.seekable() else io.BytesIO(source.read(-1))
        tensor = torch.load(seekable, map_location="cpu", weights_only=True)
        tensor = narrow_tensor_by_index(tensor, item.storage_offsets, item.lengths)
        take = getattr(planner, "take_tensor", None)  # a planner that keeps the tensor as read (no second copy)
        if take is not None and tuple(tensor.size()) == tuple(item.lengths) and take(item, tensor):
            return
        target = planner.resolve_tensor(item)
        if target.size() != tensor.size():
            raise CheckpointCorruptError(
                f"Checkpoint {self._dcp_plugin_shown}: item {item.storage_index.fqn} holds shape "
                f"{tuple(tensor.size())}, its metadata says {tuple(target.size())}."
            )
        if _takes_over(target, tensor):
            target.set_(tensor)  # a placeholder: hand over the tensor torch.load made instead of copying it
            delattr(target, _PLACEHOLDER)
        else:
            target.detach().copy_(tensor)
        planner.commit_tensor(item, target)

    def finish_verification(self) -> list[str]:
        """Verify the files a deferred read used but no later read hashed; returns the problems found."""
        todo = sorted(self._dcp_plugin_used - self._dcp_plugin_verified)
        self._dcp_plugin_used.clear()
        if not todo or self._dcp_plugin_files is None:
            return []
        problems = self._dcp_plugin_places.check(todo)
        if not problems:
            self._dcp_plugin_verified.update(todo)
        return [f"Checkpoint {self._dcp_plugin_shown} is damaged: {p}" for p in problems]

    def _check_whole_files(self, names: list[str]) -> None:
        todo = [n for n in names if n not in self._dcp_plugin_verified]
        if not todo or self._dcp_plugin_files is None:
            return
        problems = self._dcp_plugin_places.check(todo)
        if problems:
            self._raise_damaged("; ".join(problems))
        self._dcp_plugin_verified.update(todo)

    def _elsewhere(self, relative: str) -> bool:
        part = self._dcp_plugin_part
        return self.fetch_missing is not None or (
            part is not None and missing_file(relative, part) != f"{relative} is missing"
        )

    def _use_fetched(self, fetched: Mapping[str, str]) -> None:
        self._dcp_plugin_places.fetched.update(fetched)
        self._dcp_plugin_verified.update(fetched)

    def _raise_damaged(self, problem: str) -> None:
        raise CheckpointCorruptError(f"Checkpoint {self._dcp_plugin_shown} is damaged: {problem}. It was not loaded.")

    def _warn_unchecked(self) -> None:
        if self._dcp_plugin_shown not in _WARNED_UNCHECKED:
            _WARNED_UNCHECKED.add(self._dcp_plugin_shown)
            log.warning(_UNCHECKED_PLAIN if self._dcp_plugin_plain else _UNCHECKED_V01, self._dcp_plugin_shown)


_UNCHECKED_V01 = (
    "%s was written without checksums (dcp-plugin 0.1); its files are checked for size only. Save it again to "
    "protect it."
)
_UNCHECKED_PLAIN = (
    f"%s was written by plain DCP (no {MANIFEST_NAME}): it is read unverified, its files checked for size only. "
    "`dcp-plugin adopt` commits checksums for it."
)


def check_plain_value(data: bytes, shown: str, fqn: str) -> None:
    """DCP's planners unpickle byte items with ``torch.load(weights_only=False)``: hand them only bytes that
    ``weights_only=True`` reads (plain values, no code to run); raise :class:`UnsafeCheckpointError` otherwise."""
    try:
        torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any refusal or damage: the value is not handed on
        raise UnsafeCheckpointError(
            f"Checkpoint {shown}: the value {fqn!r} is not plain data that loads without running code "
            f"({type(err).__name__}: {str(err).splitlines()[0][:200]}); refusing to read it. If you trust this "
            "checkpoint, read it with torch.distributed.checkpoint directly."
        ) from None


def read_every_item(reader: Any, metadata: Metadata) -> None:
    """Read every record ``metadata`` names through ``reader`` and let go of it: what a load would refuse (a
    value that is not plain data, a record that is no tensor or not of its chunk's shape, a checksum mismatch)
    raises here. One record is in memory at a time."""
    items = []
    for index, _info in sorted((metadata.storage_data or {}).items(), key=lambda pair: span(pair[1])):
        stored = (metadata.state_dict_metadata or {}).get(index.fqn)
        if isinstance(stored, TensorStorageMetadata):
            chunk = next((c for c in stored.chunks if tuple(c.offsets) == tuple(index.offset or ())), None)
            if chunk is None:
                raise CheckpointCorruptError(f"{index.fqn} at {tuple(index.offset or ())} is no chunk of its tensor.")
            zeros = torch.Size([0] * len(chunk.sizes))
            items.append(ReadItem(LoadItemType.TENSOR, index, zeros, index, zeros, torch.Size(chunk.sizes)))
        else:
            items.append(ReadItem(LoadItemType.BYTE_IO, index, torch.Size(()), index, torch.Size(()), torch.Size(())))
    reader.set_up_storage_reader(metadata, True)
    reader.read_data(LoadPlan(items), _Discard())


class _Discard:
    """A load planner that takes every item as read and keeps nothing (see :func:`read_every_item`)."""

    def take_tensor(self, item: Any, tensor: torch.Tensor) -> bool:
        return True

    def resolve_tensor(self, item: Any) -> torch.Tensor:
        return torch.empty(item.lengths, device="meta")  # only its size is looked at: it differs from the record's

    def load_bytes(self, item: Any, value: Any) -> None:
        pass

    def commit_tensor(self, item: Any, tensor: torch.Tensor) -> None:
        pass


_PLACEHOLDER = "_dcp_plugin_placeholder"


def placeholder(size: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An empty tensor to load into that the reader may replace by the tensor it read instead of copying into
    it (for loads without a live tensor, such as Lightning's checkpoint dict). Its memory is never touched."""
    tensor = torch.empty(size, dtype=dtype)
    setattr(tensor, _PLACEHOLDER, True)
    return tensor


def _takes_over(target: torch.Tensor, loaded: torch.Tensor) -> bool:
    """Whether ``target`` is a whole placeholder and ``loaded`` owns exactly its own bytes (a view into a larger
    stored storage would keep all of it alive)."""
    return (
        getattr(target, _PLACEHOLDER, False)
        and loaded.dtype == target.dtype
        and loaded.is_contiguous()
        and loaded.storage_offset() == 0
        and loaded.untyped_storage().nbytes() == loaded.numel() * loaded.element_size()
    )


class SafeFileSystemReader(_Distrustful, FileSystemReader):
    def __init__(self, root: StorageRoot, directory: str, shown: str, manifest: Mapping[str, Any]) -> None:
        FileSystemReader.__init__(self, directory)
        self._init_checks(root, directory, shown, manifest)


class SafeFsspecReader(_Distrustful, FsspecReader):
    def __init__(self, root: StorageRoot, directory: str, shown: str, manifest: Mapping[str, Any]) -> None:
        FsspecReader.__init__(self, root.url(directory), **root.storage_options)
        self._init_checks(root, directory, shown, manifest)


__all__ = ["placeholder", "read_every_item", "SafeFileSystemReader", "SafeFsspecReader"]
