"""The end of every save, once each rank's files and ``.metadata`` are written: the manifest with every file's
checksum, the checks of the shared blobs it lists, and the commit. The same for saves DCP ran and for saves that
repeated an earlier save's structure (:mod:`dcp_plugin.storage.repeat_io`)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from dcp_plugin.errors import CheckpointSaveError
from dcp_plugin.storage.blob_checks import Signature, check
from dcp_plugin.storage.blobs import link_into, write_id_of
from dcp_plugin.storage.commit import CommitStrategy, PendingWrite, fsync_dir
from dcp_plugin.storage.faults import reached
from dcp_plugin.storage.integrity import hash_file
from dcp_plugin.storage.names import BLOBS, METADATA_NAME
from dcp_plugin.storage.root import StorageRoot
from dcp_plugin.storage.safe_io import regular_file_size


@dataclass
class Written:
    """What every rank wrote for one save, gathered on the coordinator."""

    files: dict[str, dict[str, Any]]
    """The checkpoint's own files (``.metadata`` included once written): size and checksum."""
    blobs: dict[str, dict[str, Any]]
    """Every shared blob the checkpoint uses, new or reused: size and checksum."""
    fingerprints: dict[str, str]
    """The fingerprint of every chunk kept in a blob."""
    needed: set[str]
    """Every file name ``.metadata`` refers to."""
    bytes: int
    """Bytes of tensor data the checkpoint holds (each stored region once)."""


def seal(
    root: StorageRoot,
    strategy: CommitStrategy,
    pending: PendingWrite,
    written: Written,
    write_id: str | None,
) -> dict[str, tuple[Signature, str]]:
    """After ``.metadata`` is written: check that every file it names has a checksum, record ``.metadata``'s own
    (hashed from the file unless ``written.files`` has it), check the blobs, write the manifest and commit.
    ``write_id``: the save's id for incremental saves (``None`` otherwise). Returns the new blobs as checked."""
    reached("save.written")
    files, blobs = written.files, written.blobs
    unhashed = sorted(written.needed - set(files) - set(blobs))
    if unhashed:
        raise RuntimeError(f"No checksum was recorded for {unhashed[:3]}; the checkpoint is not committed.")
    if METADATA_NAME not in files:
        size, digest = hash_file(root.fs, f"{pending.directory}/{METADATA_NAME}", is_local=root.is_local)
        files[METADATA_NAME] = {"size": size, "xxh3_128": digest}
    manifest = dict(pending.manifest)
    manifest.update(bytes=written.bytes, committed=time.time(), files=files)
    checked: dict[str, tuple[Signature, str]] = {}
    if write_id is not None:
        new = {name for name in blobs if write_id_of(name) == write_id}
        checked = check_blobs_present(root, blobs, new, pending)
        added = sum(record["size"] for record in files.values())
        added += sum(record["size"] for name, record in blobs.items() if write_id_of(name) == write_id)
        manifest.update(blobs=blobs, fingerprints=written.fingerprints, bytes_new=added)
    strategy.commit(pending, manifest)
    return checked


def check_blobs_present(
    root: StorageRoot, blobs: dict[str, dict[str, Any]], new: set[str], pending: PendingWrite
) -> dict[str, tuple[Signature, str]]:
    """Every blob the checkpoint will list is there with its committed size (and durable), and each blob this save
    wrote reads back as written, or nothing commits; on a local disk each is linked into the checkpoint's
    directory too, so that any DCP reader finds it. Returns each new blob's file signature and checksum as checked."""
    area = root.work(BLOBS)
    checked: dict[str, tuple[Signature, str]] = {}
    for name in sorted(new):
        found = check(root.fs, f"{area}/{name}", blobs[name], is_local=root.is_local)
        if found is None:
            raise CheckpointSaveError(
                f"The shared data file {root.url(f'{area}/{name}')} does not read back as it was written (damaged "
                f"while written, or changed by another process); {pending.name} was not committed. Save again."
            )
        checked[name] = (found, blobs[name]["xxh3_128"])
    for name, record in sorted(blobs.items()):
        try:
            size = regular_file_size(root.fs, f"{area}/{name}", is_local=root.is_local)
        except FileNotFoundError:
            size = -1
        if size != record["size"]:
            raise CheckpointSaveError(
                f"The shared data file {root.url(f'{area}/{name}')} this save refers to was removed or changed while "
                f"it was written (a purge by another process?); {pending.name} was not committed. Save again: the "
                "next save writes those tensors afresh."
            )
    if root.is_local and blobs:
        if new:
            fsync_dir(area)
        # the links become durable with the manifest: the local commit fsyncs the directory once it is written
        link_into(area, blobs, pending.directory)
    return checked


__all__ = ["Written", "check_blobs_present", "seal"]
