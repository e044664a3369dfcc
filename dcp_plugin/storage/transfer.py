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
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import xxhash

from dcp_plugin.errors import CheckpointCorruptError
from dcp_plugin.storage.faults import reached
from dcp_plugin.storage.integrity import ALGORITHM, check_files
from dcp_plugin.storage.names import MANIFEST_NAME, METADATA_NAME, check_name
from dcp_plugin.storage.safe_io import open_local_regular, regular_file_size

if TYPE_CHECKING:
    from dcp_plugin.storage import CheckpointInfo, CheckpointStorage
    from dcp_plugin.storage.commit import PendingWrite

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
    plan = begin_copy(source, name, target, target_name, overwrite=overwrite)
    try:
        copied = copy_files(plan, plan.names, verify=verify, progress=progress)
        commit_copy(plan, copied)
    except BaseException:
        target.abort(plan.pending)
        raise
    return target.info(plan.pending.name)


@dataclass
class CopyPlan:
    """A copy begun in the target's work area: which files to copy from where. Several processes may each
    copy some of ``names`` (:func:`copy_files`) before one commits them all (:func:`commit_copy`)."""

    source: CheckpointStorage
    info: CheckpointInfo
    source_dir: str
    names: list[str]
    target: CheckpointStorage
    pending: PendingWrite


def begin_copy(
    source: CheckpointStorage, name: str, target: CheckpointStorage, target_name: str | None = None, *, overwrite: bool
) -> CopyPlan:
    """Start copying committed checkpoint ``name``: its files, and a fresh location in ``target`` for them."""
    info = source.info(name)
    target_name = check_name(target_name or info.name)
    records = info.manifest.get("files")
    source_dir = source.data_path(info)
    names = sorted(records) if isinstance(records, dict) else _files_of_unchecked(source, source_dir)
    if isinstance(records, dict):  # an incremental checkpoint's shared blobs are copied into the copy itself
        names = sorted(set(names) | set(_shared(info)))
    pending = target.begin_write(target_name, overwrite=overwrite)
    return CopyPlan(source, info, source_dir, names, target, pending)


def copy_files(
    plan: CopyPlan, names: Iterable[str], *, verify: bool = True, progress: Callable[[int], None] | None = None
) -> dict[str, dict[str, Any]]:
    """Copy some of the plan's files, each checked against its committed checksum while it streams and (with
    ``verify``) read back from the target; returns their records (``{"size", "xxh3_128"}``)."""
    source, target = plan.source, plan.target
    shared = _shared(plan.info)
    records = {**shared, **(plan.info.manifest.get("files") or {})}
    copied: dict[str, dict[str, Any]] = {}
    for relative in names:
        # a local checkpoint holds a link to each blob it uses: it is copied from its own directory
        in_area = relative in shared and not source.is_local
        origin = f"{source.blob_area if in_area else plan.source_dir}/{relative}"
        size, digest = _copy_file(source, origin, target, f"{plan.pending.directory}/{relative}", progress)
        record = records.get(relative) if isinstance(records, dict) else None
        if record is not None and (size != record["size"] or digest != record[ALGORITHM]):
            raise CheckpointCorruptError(
                f"{source.url(plan.info.name)}: {relative} does not match its committed checksum; it was not copied. "
                "Copy an older checkpoint, or repair this one."
            )
        copied[relative] = {"size": size, ALGORITHM: digest}
    if verify:
        problems = check_files(target.fs, plan.pending.directory, copied, is_local=target.is_local)
        if problems:
            raise CheckpointCorruptError(
                f"The copy of {source.url(plan.info.name)} at {target.url(plan.pending.name)} does not read back as "
                f"written: {'; '.join(problems)}."
            )
    return copied


def _shared(info: CheckpointInfo) -> dict[str, Any]:
    """The shared blobs an incremental checkpoint uses (copies materialise them into their own directory)."""
    files = info.manifest.get("files") or {}
    return {n: r for n, r in (info.manifest.get("blobs") or {}).items() if n not in files}


def commit_copy(plan: CopyPlan, copied: dict[str, dict[str, Any]]) -> None:
    """Commit the copy once every file of the plan is copied (``copied``: their records); the caller aborts
    ``plan.pending`` if this raises."""
    missing = sorted(set(plan.names) - set(copied))
    if missing:
        raise CheckpointCorruptError(
            f"The copy of {plan.source.url(plan.info.name)} lacks {', '.join(missing)}; it was not committed."
        )
    reached("copy.written")
    dropped = ("location", "checksum", "committed", "blobs", "fingerprints", "part")  # the copy is self-contained
    manifest = {k: v for k, v in plan.info.manifest.items() if k not in dropped}
    source_url = plan.source.url(plan.info.name)
    manifest.update(name=plan.pending.name, files=copied, copied_from=source_url, copied=time.time(), format=2)
    plan.target.strategy.commit(plan.pending, manifest)


def fetch_file(source: CheckpointStorage, src: str, target: CheckpointStorage, dst: str, record: dict[str, Any]) -> int:
    """Copy one file of a committed checkpoint (``src`` in ``source``) to ``dst`` in ``target``, checked against
    its committed ``record`` while it streams; returns its size. A file that does not match is removed."""
    size, digest = _copy_file(source, src, target, dst, None)
    if size != record["size"] or digest != record[ALGORITHM]:
        target.fs.rm(dst)
        raise CheckpointCorruptError(f"{source.url(src)} does not match its committed checksum; it was not used.")
    return size


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


__all__ = ["CopyPlan", "begin_copy", "commit_copy", "copy_checkpoint", "copy_files", "fetch_file"]
