"""Copying a committed checkpoint between any two storages with the same guarantees as a save.

The copy is written to the target's private work area and committed by the target's own commit strategy, so a
copy interrupted at any point is never listed there. Every file is hashed while it streams through (bounded
memory: one chunk at a time) and checked against the checksum committed with the source; with ``verify`` the
target's files are read back and checked again after the commit's data is written, before it is committed
(object stores can store something other than what was sent). This is what ``dcp-plugin cp`` and replication
to a second tier build on.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import xxhash

from dcp_plugin.errors import CheckpointCorruptError
from dcp_plugin.storage.faults import reached
from dcp_plugin.storage.integrity import ALGORITHM, check_files
from dcp_plugin.storage.names import MANIFEST_NAME, METADATA_NAME, check_name
from dcp_plugin.storage.safe_io import open_local_regular, regular_file_size

if TYPE_CHECKING:
    from dcp_plugin.storage import CheckpointInfo, CheckpointStorage

_CHUNK = 16 * 2**20


def copy_checkpoint(
    source: CheckpointStorage,
    name: str,
    target: CheckpointStorage,
    target_name: str | None = None,
    *,
    overwrite: bool = False,
    verify: bool = True,
    progress: Callable[[int], None] | None = None,
) -> CheckpointInfo:
    """Copy committed checkpoint ``name`` of ``source`` to ``target`` (as ``target_name``, default the same name).

    Raises ``CheckpointExistsError`` if the target name is committed and ``overwrite`` is false (checked again
    atomically at the commit), ``CheckpointCorruptError`` naming the file if a source file does not match its
    committed checksum or the copy does not read back as sent. ``progress`` receives byte counts.
    """
    info = source.info(name)
    target_name = check_name(target_name or info.name)
    records = info.manifest.get("files")
    source_dir = source.data_path(info)
    names = sorted(records) if isinstance(records, dict) else _files_of_unchecked(source, source_dir)
    # An incremental checkpoint's shared blobs are copied into the copy's own directory: the copy is
    # self-contained (materialised) and refers to nothing else at the target.
    shared = {n: r for n, r in (info.manifest.get("blobs") or {}).items() if n not in (records or {})}
    if isinstance(records, dict):
        records = {**shared, **records}
        names = sorted(records)
    pending = target.begin_write(target_name, overwrite=overwrite)
    try:
        copied: dict[str, dict[str, Any]] = {}
        for relative in names:
            origin = f"{source.blob_area}/{relative}" if relative in shared else f"{source_dir}/{relative}"
            size, digest = _copy_file(source, origin, target, f"{pending.directory}/{relative}", progress)
            record = records.get(relative) if isinstance(records, dict) else None
            if record is not None and (size != record["size"] or digest != record[ALGORITHM]):
                raise CheckpointCorruptError(
                    f"{source.url(info.name)}: {relative} does not match its committed checksum; it was not copied. "
                    "Copy an older checkpoint, or repair this one."
                )
            copied[relative] = {"size": size, ALGORITHM: digest}
        if verify:
            problems = check_files(target.fs, pending.directory, copied, is_local=target.is_local)
            if problems:
                raise CheckpointCorruptError(
                    f"The copy of {source.url(info.name)} at {target.url(target_name)} does not read back as written: "
                    f"{'; '.join(problems)}."
                )
        reached("copy.written")
        dropped = ("location", "checksum", "committed", "blobs", "fingerprints")
        manifest = {k: v for k, v in info.manifest.items() if k not in dropped}
        manifest.update(name=target_name, files=copied, copied_from=source.url(info.name), copied=time.time(), format=2)
        target.strategy.commit(pending, manifest)
    except BaseException:
        target.abort(pending)
        raise
    return target.info(target_name)


def _files_of_unchecked(storage: CheckpointStorage, directory: str) -> list[str]:
    """A checkpoint written before checksums: its data files (from the listing) and ``.metadata``."""
    names = []
    for path in storage.fs.ls(directory, detail=False):
        relative = path.rstrip("/").rsplit("/", 1)[-1]
        if relative != MANIFEST_NAME and (relative == METADATA_NAME or relative.endswith(".distcp")):
            names.append(relative)
    return sorted(names)


def _copy_file(
    source: CheckpointStorage, src: str, target: CheckpointStorage, dst: str, progress: Callable[[int], None] | None
) -> tuple[int, str]:
    """Stream one regular file from ``source`` to ``target``, hashing it on the way; returns (size, digest)."""
    regular_file_size(source.fs, src, is_local=source.is_local)
    hasher = xxhash.xxh3_128()
    size = 0
    reader = open_local_regular(src) if source.is_local else source.fs.open(src, "rb", block_size=_CHUNK)
    writer = open(dst, "wb") if target.is_local else target.fs.open(dst, "wb")  # noqa: SIM115 - closed below
    with reader, writer:
        while True:
            chunk = reader.read(_CHUNK)
            if not chunk:
                break
            hasher.update(chunk)
            writer.write(chunk)
            size += len(chunk)
            if progress is not None:
                progress(len(chunk))
        if target.is_local:  # durable before the rename commits it
            writer.flush()
            os.fsync(writer.fileno())
    return size, hasher.hexdigest()


__all__ = ["copy_checkpoint"]
