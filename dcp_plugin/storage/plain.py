"""Directories written by plain ``dcp.save`` (torchtitan's ``step-N`` folders): DCP files, no manifest.

Such a directory has no checksums, so it is read as it is, unverified and read-only: ``.metadata`` through the
allow-list, every file it names confined to the directory and checked for size, every value it stores checked
to be plain data. :func:`adopt` verifies that much and commits a manifest with the checksums of the files as they
are now; from then on the directory is a regular checkpoint whose later damage ``verify`` and loads detect.

A directory that dcp-plugin itself wrote (its metadata holds a dcp-plugin skeleton) but that has no manifest is
not one of them: that write never committed and may be incomplete, so it stays refused.
"""

from __future__ import annotations

import os
import re
import time
import uuid
from typing import Any

from dcp_plugin.errors import CheckpointCorruptError, CheckpointExistsError
from dcp_plugin.storage import manifest as manifests
from dcp_plugin.storage.commit import fsync_dir, list_dir, rename_noreplace
from dcp_plugin.storage.integrity import hash_file
from dcp_plugin.storage.names import FORMAT_VERSION, MANIFEST_NAME, METADATA_NAME
from dcp_plugin.storage.root import StorageRoot
from dcp_plugin.storage.safe_io import regular_file_size

LAYOUT = "dcp"
"""``manifest["layout"]`` of a checkpoint whose state is stored under DCP's own keys, without a dcp-plugin skeleton
(a plain ``dcp.save``, adopted or not). Checkpoints dcp-plugin writes have no ``layout``."""

_PLUGIN_KEYS = "__dcp_plugin__/"
_UNCOVERED = 2**20
"""Bytes of a plain data file its records may leave uncovered (a format's own header, alignment), plus 1/16 of
what they cover."""
_TRAILING_NUMBER = re.compile(r"(\d+)$")


def holds_plain_dcp(root: StorageRoot, name: str) -> bool:
    """Whether ``name`` is a directory with DCP's ``.metadata`` and no manifest."""
    path = root.join(name)
    if root.is_local:
        return (
            os.path.isdir(path)
            and not os.path.islink(path)
            and os.path.isfile(f"{path}/{METADATA_NAME}")
            and not os.path.lexists(f"{path}/{MANIFEST_NAME}")
        )
    root.forget_listings()
    return bool(root.fs.exists(f"{path}/{METADATA_NAME}")) and not root.fs.exists(f"{path}/{MANIFEST_NAME}")


def plain_names(root: StorageRoot) -> list[str]:
    """The names of the root's plain-DCP directories (not hidden), sorted by the number they end with."""
    root.forget_listings()
    if not root.fs.exists(root.path):
        return []
    if root.is_local:
        names = [e for e in list_dir(root.path) if not e.startswith(".") and holds_plain_dcp(root, e)]
    else:
        found = root.fs.glob(f"{root.path}/*/{METADATA_NAME}")
        names = [m[len(root.path) + 1 : -len(METADATA_NAME) - 1] for m in found]
        names = [n for n in names if n and "/" not in n and not n.startswith(".") and holds_plain_dcp(root, n)]
    return sorted(names, key=lambda n: (step_of(n) if step_of(n) is not None else -1, n))


def step_of(name: str) -> int | None:
    """The step a plain-DCP directory's name ends with (``step-500`` -> 500), if any."""
    match = _TRAILING_NUMBER.search(name)
    return int(match.group(1)) if match else None


def read_every_item(checking: Any, metadata: Any) -> None:
    """:func:`dcp_plugin.storage.reader.read_every_item` (imports torch)."""
    from dcp_plugin.storage.reader import read_every_item as read_all

    read_all(checking, metadata)


def reader(root: StorageRoot, directory: str, shown: str, manifest: dict[str, Any]) -> Any:
    """The verifying DCP reader for ``directory`` (imports torch)."""
    from dcp_plugin.storage.reader import SafeFileSystemReader, SafeFsspecReader

    cls = SafeFileSystemReader if root.is_local else SafeFsspecReader
    return cls(root, directory, shown, manifest)


def describe(root: StorageRoot, name: str) -> tuple[dict[str, Any], bool]:
    """``(manifest, written_by_dcp_plugin)`` for the plain-DCP directory ``name``: a manifest made up from its
    metadata (read with every check the reader makes; raises a project error naming the file if one fails)."""
    directory = root.join(name)
    metadata = reader(root, directory, root.url(directory), {}).read_metadata()
    keys = metadata.state_dict_metadata or {}
    paths = getattr(metadata, "planner_data", None)
    paths = paths if isinstance(paths, dict) else {}
    entries: dict[str, Any] = {}
    for key in keys:
        path = paths.get(key)
        top = str(path[0]) if isinstance(path, (tuple, list)) and path else key.split(".", 1)[0]
        entries.setdefault(top, {"per_rank": False})
    manifest = {
        "name": name,
        "step": step_of(name),
        "created": _modified(root, f"{directory}/{METADATA_NAME}"),
        "layout": LAYOUT,
        "entries": entries,
        "bytes": sum(int(info.length) for info in (metadata.storage_data or {}).values()),
    }
    return manifest, any(key.startswith(_PLUGIN_KEYS) for key in keys)


def _modified(root: StorageRoot, path: str) -> float:
    if root.is_local:
        return os.stat(path).st_mtime
    try:
        return float(root.fs.modified(path).timestamp())
    except (NotImplementedError, OSError, AttributeError, ValueError):
        return 0.0


def adopt(root: StorageRoot, name: str, described: dict[str, Any]) -> dict[str, Any]:
    """Commit a manifest with checksums for the plain-DCP directory ``name`` (already checked by :func:`describe`);
    returns it. Whatever a load would refuse is refused first, so nothing is committed for it: each data file
    must be covered by its records (``dcp.save`` writes them back to back; a file padded or made sparse to look
    large is refused before it is hashed), and after hashing, the metadata and every record are read again
    against the new checksums (values must be plain data, tensors of their chunk's shape): what is committed is
    what was checked."""
    directory = root.join(name)
    files = {METADATA_NAME}
    metadata = reader(root, directory, root.url(directory), {}).read_metadata()
    _check_covered(root, directory, metadata)
    files |= {str(info.relative_path) for info in (metadata.storage_data or {}).values()}
    records: dict[str, dict[str, Any]] = {}
    total = 0
    for relative in sorted(files):
        size, digest = hash_file(root.fs, f"{directory}/{relative}", is_local=root.is_local)
        records[relative] = {"size": size, "xxh3_128": digest}
        total += size
    manifest = {
        **described,
        "format": FORMAT_VERSION,
        "committed": time.time(),
        "save_id": uuid.uuid4().hex,
        "mode": "adopted",
        "bytes": total,
        "files": records,
    }
    checking = reader(root, directory, root.url(directory), manifest)
    read_every_item(checking, checking.read_metadata())  # the checksummed bytes parse, fit and load
    _write_marker(root, directory, manifests.encode(manifest))
    return manifest


def _check_covered(root: StorageRoot, directory: str, metadata: Any) -> None:
    """Each data file holds little beyond its records (``dcp.save`` writes them back to back)."""
    spans: dict[str, list[tuple[int, int]]] = {}
    for info in (metadata.storage_data or {}).values():
        spans.setdefault(str(info.relative_path), []).append((int(info.offset), int(info.offset) + int(info.length)))
    for relative, parts in sorted(spans.items()):
        covered, end = 0, 0
        for start, stop in sorted(parts):
            covered += max(0, stop - max(start, end))
            end = max(end, stop)
        size = regular_file_size(root.fs, f"{directory}/{relative}", is_local=root.is_local)
        if size - covered > _UNCOVERED + covered // 16:
            raise CheckpointCorruptError(
                f"{root.url(f'{directory}/{relative}')} has {size} bytes, of which its records in the metadata cover "
                f"only {covered}; dcp.save writes nothing else into a data file (was it padded, or made sparse to "
                "look larger?). It is not adopted."
            )


def _write_marker(root: StorageRoot, directory: str, data: bytes) -> None:
    marker = f"{directory}/{MANIFEST_NAME}"
    exists = CheckpointExistsError(f"{root.url(directory)} was committed by someone else meanwhile; nothing changed.")
    if root.is_local:
        tmp = f"{marker}.adopting-{uuid.uuid4().hex[:8]}"
        with open(tmp, "xb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        if not rename_noreplace(tmp, marker):
            os.remove(tmp)
            raise exists
        fsync_dir(directory)
        return
    root.forget_listings()
    if root.fs.exists(marker):
        raise exists
    root.fs.pipe_file(marker, data)
    root.forget_listings()


__all__ = ["LAYOUT", "adopt", "describe", "holds_plain_dcp", "plain_names", "step_of"]
