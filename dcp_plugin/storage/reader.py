"""DCP readers that trust nothing in the checkpoint they read.

``.metadata`` is read size-bounded and without running code; every path in it must name one plain file inside
the checkpoint directory; offsets, lengths and declared tensor sizes are checked against the files before
anything is allocated; only regular files are opened, never blocking. Each data file is hashed and compared with
the checksum committed in the manifest, and a mismatch fails the load naming the file. Remote files are hashed
while DCP's items are read (one sequential pass). Local files are read by the direct path
(:mod:`~dcp_plugin.storage.direct_load`: records straight into their destinations, hashed in the same pass) and,
for what it leaves, hashed before any byte is used and then read from the page cache into the tensors.

A load of dcp-plugin reads twice through one reader, holding every file it opens (:meth:`holding_files`): first
the small skeleton, then the tensors. The skeleton read defers verification; :meth:`finish_verification`
afterwards hashes any file that was used but not fully read and verified by the tensor read, so every byte a load
used is checked. ``.metadata`` is read and checked once per reader.
"""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager, contextmanager
from typing import IO, Any

import torch
import xxhash
from torch.distributed._shard._utils import narrow_tensor_by_index
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader
from torch.distributed.checkpoint.filesystem import FileSystem
from torch.distributed.checkpoint.metadata import Metadata
from torch.distributed.checkpoint.planner import LoadItemType
from torch.futures import Future

from dcp_plugin.errors import CheckpointCorruptError, UnsafeCheckpointError
from dcp_plugin.storage import direct_load
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
from dcp_plugin.storage.read_items import check_plain_value, filled, placeholder, read_every_item, takes_over
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
        self._dcp_plugin_metadata: Metadata | None = None
        self._dcp_plugin_held = direct_load.HeldFiles()
        self._dcp_plugin_part = part_of(manifest)
        if root.is_local:
            self.fs = _RegularFilesOnly()

    # -- metadata -------------------------------------------------------------------------------------
    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        metadata = self._dcp_plugin_metadata
        if metadata is None:
            metadata = self._dcp_plugin_metadata = self._read_checked_metadata()
        if getattr(metadata, "storage_meta", None) is not None:
            metadata.storage_meta.load_id = self.load_id  # type: ignore[attr-defined,union-attr]
        return metadata

    def _read_checked_metadata(self) -> Metadata:
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
        _check_metadata(metadata, shown_path, self._dcp_plugin_places, self.bound_allocations, self._elsewhere)
        return metadata

    # -- data -----------------------------------------------------------------------------------------
    def holding_files(self) -> AbstractContextManager[None]:
        """For one load: every local data file is opened once and read through that descriptor until the end
        (:func:`dcp_plugin.storage.direct_load.read_direct` reads through them)."""
        return self._dcp_plugin_held.holding()

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

    def _check_record(self, relative: str) -> Any:
        """The committed record of data file ``relative`` (``None`` for checkpoints without checksums)."""
        record = self._dcp_plugin_places.record(relative)
        if self._dcp_plugin_files is not None and record is None:
            raise CheckpointCorruptError(f"Checkpoint {self._dcp_plugin_shown} has no checksum for {relative}.")
        if self._dcp_plugin_files is None:
            self._warn_unchecked()
        return record

    def _open_local(self, relative: str) -> tuple[IO[bytes], bool]:
        """The local data file ``relative`` opened (or the one held), of its committed size: (file, held)."""
        try:
            handle, held = self._dcp_plugin_held.open(relative, self._dcp_plugin_places.path(relative))
        except FileNotFoundError:
            self._raise_damaged(missing_file(relative, self._dcp_plugin_part))
        record = self._dcp_plugin_places.record(relative)
        size = os.fstat(handle.fileno()).st_size
        if record is not None and size != record["size"]:
            if not held:
                handle.close()
            self._raise_damaged(f"{relative} has {size} bytes, {record['size']} were committed")
        return handle, held

    def _read_file(self, relative: str, items: list[Any], planner: Any) -> None:
        root = self._dcp_plugin_root
        path = self._dcp_plugin_places.path(relative)
        record = self._check_record(relative)
        hashing = record is not None and relative not in self._dcp_plugin_verified and not self.defer_verification
        storage_data = self.storage_data  # type: ignore[attr-defined]
        items = sorted(items, key=lambda it: span(storage_data[it.storage_index]))
        if not hashing and record is not None and relative not in self._dcp_plugin_verified:
            self._dcp_plugin_used.add(relative)  # before the read: a read that fails on damaged bytes is checked too
        expected, streamed = (record if hashing else None), not root.is_local
        if root.is_local:
            handle, held = self._open_local(relative)
            try:
                streamed = os.fstat(handle.fileno()).st_size == 0
                if not streamed:
                    self._read_local(handle.fileno(), relative, items, planner, expected)
            finally:
                if not held:
                    handle.close()
        if streamed:
            try:
                size = regular_file_size(root.fs, path, is_local=root.is_local)
            except FileNotFoundError:
                self._raise_damaged(missing_file(relative, self._dcp_plugin_part))
            if record is not None and size != record["size"]:
                self._raise_damaged(f"{relative} has {size} bytes, {record['size']} were committed")
            self._read_streamed(path, relative, size, items, planner, expected=expected)
        if hashing:
            self._dcp_plugin_verified.add(relative)

    def _read_local(self, fd: int, relative: str, items: list[Any], planner: Any, expected: Any) -> None:
        """Local files: verify the whole file before any byte is used (a damaged file leaves live tensors
        untouched), then read each stored item from the page cache straight into the tensor it becomes."""
        storage_data = self.storage_data  # type: ignore[attr-defined]
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
        if takes_over(target, tensor):
            target.set_(tensor)  # a placeholder: hand over the tensor torch.load made instead of copying it
        else:
            target.detach().copy_(tensor)
        filled(target)
        planner.commit_tensor(item, target)

    def finish_verification(self) -> list[str]:
        """Verify the files a deferred read used but no later read hashed; returns the problems found."""
        todo = sorted(self._dcp_plugin_used - self._dcp_plugin_verified)
        self._dcp_plugin_used.clear()
        if not todo or self._dcp_plugin_files is None:
            return []
        problems, others = direct_load.check_held(self, todo)  # the very files the load read
        if others:
            problems += self._dcp_plugin_places.check(others)
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


def _check_metadata(
    metadata: Metadata, shown_path: str, places: _Places, bound_allocations: bool, elsewhere: Callable[[str], bool]
) -> None:
    """Every file the metadata points at stays inside the checkpoint and holds the bytes it claims; every tensor it
    declares is well formed and fits in its records (:mod:`~dcp_plugin.storage.metadata_checks`); so nothing is
    allocated from a forged size."""
    root = places.root

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
            if elsewhere(relative):  # another node holds it, or a restore fetches it (checked whole as it arrives)
                return None
            shown = root.url(places.path(relative))
            raise CheckpointCorruptError(f"Data file {shown} is missing; the checkpoint is damaged.") from None

    stored = check_records(metadata, shown_path, size_of, first_hole)
    check_items(metadata, shown_path, stored, memory_bytes() if bound_allocations else None)


_UNCHECKED_V01 = (
    "%s was written without checksums (dcp-plugin 0.1); its files are checked for size only. Save it again to "
    "protect it."
)
_UNCHECKED_PLAIN = (
    f"%s was written by plain DCP (no {MANIFEST_NAME}): it is read unverified, its files checked for size only. "
    "`dcp-plugin adopt` commits checksums for it."
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
