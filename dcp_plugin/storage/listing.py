"""Finding committed checkpoints in a root, telling broken ones apart, and finding leftovers for ``purge``.

A malformed checkpoint makes only itself invalid: it is reported in :attr:`Scan.broken` with the reason and
never stops the rest of the root from being listed.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any

from dcp_plugin.errors import CheckpointError, UnsafeCheckpointError
from dcp_plugin.storage import blobs as shared
from dcp_plugin.storage import file_kinds, work_areas
from dcp_plugin.storage import manifest as manifests
from dcp_plugin.storage.commit import CommitStrategy, list_dir, remove_tree, tidy_work_dir
from dcp_plugin.storage.faults import reached
from dcp_plugin.storage.names import (
    BLOBS,
    LEGACY_PREFIXES,
    MANIFEST_NAME,
    METADATA_NAME,
    OBJECTS,
    REPLACED,
    RESTORE,
    STAGING,
    TRASH,
    WORK_DIR,
    name_of_work_entry,
)
from dcp_plugin.storage.root import StorageRoot
from dcp_plugin.storage.safe_io import MAX_MANIFEST_BYTES, read_bounded

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Found:
    """A committed checkpoint: its name, the directory holding its data (no protocol), its manifest."""

    name: str
    directory: str
    manifest: dict[str, Any]


@dataclass
class Scan:
    found: list[Found] = field(default_factory=list)
    broken: list[tuple[str, str]] = field(default_factory=list)
    """(name, reason) of entries that carry a commit marker but cannot be trusted."""


class Listing:
    def __init__(self, root: StorageRoot, strategy: CommitStrategy) -> None:
        self.root = root
        self.strategy = strategy

    # -- committed checkpoints ----------------------------------------------------------------------
    def scan(self) -> Scan:
        root = self.root
        root.forget_listings()
        scan = Scan()
        if not root.fs.exists(root.path):
            root.check_reachable()  # an empty listing of a missing bucket would hide the real problem
            return scan
        if not root.fs.isdir(root.path):
            raise NotADirectoryError(f"The checkpoint directory {root.url_root} is a file.")
        for name in self._marked_names():
            try:
                found = self.find(name)
            except (CheckpointError, OSError, ValueError) as err:
                scan.broken.append((name, str(err)))
                continue
            if found is not None:
                scan.found.append(found)
        if root.is_local:
            listed = {f.name for f in scan.found} | {b[0] for b in scan.broken}
            scan.found.extend(f for f in self._set_aside() if f.name not in listed)
        scan.found.sort(key=lambda f: (_step_key(f.manifest), _created(f.manifest), f.name))
        return scan

    def _marked_names(self) -> list[str]:
        root = self.root
        if root.is_local:
            names = []
            for entry in sorted(list_dir(root.path)):
                if not entry.startswith(".") and os.path.lexists(f"{root.path}/{entry}/{MANIFEST_NAME}"):
                    names.append(entry)
            return names
        markers = root.fs.glob(f"{root.path}/*/{MANIFEST_NAME}")
        names = sorted({m[len(root.path) + 1 : -len(MANIFEST_NAME) - 1] for m in markers})
        return [n for n in names if n and "/" not in n and not n.startswith(".")]

    def find(self, name: str) -> Found | None:
        """Checkpoint ``name`` if committed; raises a project error if its marker is there but untrustworthy."""
        root = self.root
        path = root.join(name)
        if root.is_local:
            if not os.path.lexists(path):
                return next((f for f in self._set_aside() if f.name == name), None)
            if not os.path.isdir(path):
                return None
            if os.path.islink(path):
                real_root = os.path.realpath(root.path)
                if os.path.dirname(os.path.realpath(path)) != real_root:
                    raise UnsafeCheckpointError(
                        f"{path} is a symbolic link to {os.path.realpath(path)}, outside {root.url_root}; "
                        "refusing to follow it."
                    )
            if not os.path.lexists(f"{path}/{MANIFEST_NAME}"):
                return None
            return Found(name, path, self._read(f"{path}/{MANIFEST_NAME}"))
        marker = f"{path}/{MANIFEST_NAME}"
        root.forget_listings()
        if not root.fs.exists(marker):
            return None
        manifest = self._read(marker)
        location = manifest.get("location")
        return Found(name, root.join(location) if isinstance(location, str) else path, manifest)

    def _read(self, marker: str) -> dict[str, Any]:
        data = read_bounded(
            self.root.fs, marker, is_local=self.root.is_local, limit=MAX_MANIFEST_BYTES, what="manifest"
        )
        return manifests.decode(data, self.root.url(marker))

    def _set_aside(self) -> list[Found]:
        """Committed copies left aside by an interrupted local replacement while their name is empty: they are
        the checkpoint of that name (newest first). Also v0.1's ``.tmp-``/``.old-`` copies."""
        root = self.root
        candidates: list[tuple[str, str | None]] = [
            (root.work(REPLACED, e), name_of_work_entry(e))
            for e in work_areas.entries(root, REPLACED, strict=False)
            if work_areas.is_ours(REPLACED, e)
        ]
        candidates += [(root.join(e), None) for e in list_dir(root.path) if e.startswith(LEGACY_PREFIXES)]
        found: dict[str, Found] = {}
        for directory, known_name in candidates:
            marker = f"{directory}/{MANIFEST_NAME}"
            if not os.path.isdir(directory) or os.path.islink(directory) or not os.path.lexists(marker):
                continue
            try:
                manifest = self._read(marker)
            except (CheckpointError, OSError):
                continue
            name = known_name or manifest.get("name")
            if not isinstance(name, str) or "-deleting-" in directory or os.path.lexists(root.join(name)):
                continue
            if name not in found or _created(manifest) > _created(found[name].manifest):
                found[name] = Found(name, directory, manifest)
        return list(found.values())

    def explain_missing(self, name: str) -> str:
        root = self.root
        path = root.join(name)
        shown = root.url(path)
        root.forget_listings()
        if not root.fs.exists(path) and not (root.is_local and os.path.lexists(path)):
            return f"No checkpoint at {shown}."
        if not root.fs.isdir(path):
            return file_kinds.describe_file(root.fs, path, shown, is_local=root.is_local)
        if root.fs.exists(f"{path}/{METADATA_NAME}"):
            return (
                f"{shown} holds DCP files but no {MANIFEST_NAME}: it was never committed by dcp-plugin (a write was "
                "interrupted, or another tool wrote it), or its manifest was deleted; it cannot be trusted. Use an "
                "earlier checkpoint."
            )
        try:
            held = self._run_directory(path)
        except (CheckpointError, OSError, ValueError):
            held = None  # the listing itself failed: fall back to the plain message
        if held is not None:
            return held
        return f"{shown} is not a committed checkpoint (no {MANIFEST_NAME}); the write was interrupted."

    def _run_directory(self, path: str) -> str | None:
        """The message for a directory that holds checkpoints (a run directory) or nothing at all, else None."""
        inner = Listing(StorageRoot(self.root.url(path), self.root.storage_options), self.strategy)
        scan = inner.scan()
        shown = inner.root.url_root
        if scan.found:
            count = len(scan.found)
            return (
                f"{shown} is a run directory holding {count} checkpoint{'s' if count != 1 else ''}, not a checkpoint "
                f"itself; name one of them, e.g. the newest: {inner.root.url(inner.root.join(scan.found[-1].name))}"
            )
        if scan.broken:
            return f"{shown} is a run directory whose checkpoints are all broken: {scan.broken[0][1]}"
        if not self.root.fs.ls(path, detail=False):
            return f"{shown} is an empty directory: no checkpoint has been written there yet."
        return None

    # -- leftovers ----------------------------------------------------------------------------------
    def leftovers(self) -> list[str]:
        """Work entries (paths relative to the root) that belong to no committed checkpoint."""
        root = self.root
        root.forget_listings()
        if not root.fs.exists(root.path):
            return []
        blob_names = self._work_entries(BLOBS)  # before the scan: a blob committed after it is listed by it
        protected = shared.held(root.url_root)
        scan = self.scan()
        in_use = {root.relative(f.directory) for f in scan.found}
        broken = {name for name, _ in scan.broken}
        out = []
        for area in (STAGING, TRASH, REPLACED, OBJECTS, RESTORE):
            for entry in self._work_entries(area):
                relative = f"{WORK_DIR}/{area}/{entry}"
                if relative in in_use or (area == OBJECTS and name_of_work_entry(entry) in broken):
                    continue
                out.append(relative)
        if root.is_local:
            out += [e for e in list_dir(root.path) if work_areas.is_ours("", e) and e not in in_use]
        if not scan.broken:  # a manifest that cannot be read may list any blob: keep them all
            found = [f.manifest for f in scan.found]
            out += [f"{WORK_DIR}/{BLOBS}/{n}" for n in shared.unreferenced(blob_names, found, protected)]
        return sorted(out)

    def collect_blobs(self) -> list[str]:
        """Remove the shared blobs that no committed checkpoint lists and no write in flight (in this process,
        or with a work entry from another process) creates; returns their names. Safe while others write."""
        root = self.root
        root.forget_listings()
        blob_names = self._work_entries(BLOBS)
        if not blob_names:
            return []
        protected = shared.held(root.url_root)
        protected |= {shared.write_id_of_entry(e) for a in (STAGING, OBJECTS) for e in self._work_entries(a)}
        scan = self.scan()
        if scan.broken:
            return []
        doomed = shared.unreferenced(blob_names, [f.manifest for f in scan.found], protected)
        for number, name in enumerate(doomed):
            remove_tree(root, root.work(BLOBS, name))
            if number == 0:
                reached("blobs.collecting")
        if root.is_local:
            tidy_work_dir(root)
        return doomed

    def _work_entries(self, area: str) -> list[str]:
        """The entries of work ``area`` whose names dcp-plugin gives; on a local disk an area that is a link is an
        error (nothing is listed through it, so nothing is deleted through it), and other names are left alone."""
        root = self.root
        if root.is_local:
            names = work_areas.entries(root, area)
            foreign = [n for n in names if not work_areas.is_ours(area, n)]
            if foreign:
                log.info("Leaving alone %s in %s: dcp-plugin never creates such names.", foreign[:5], root.work(area))
            return [n for n in names if n not in foreign]
        try:
            return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in root.fs.ls(root.work(area), detail=False))
        except FileNotFoundError:
            return []

    def remove_leftover(self, entry: str) -> None:
        if entry not in self.leftovers():
            raise ValueError(
                f"{self.root.url(self.root.join(entry))} is not a leftover of an interrupted write (it may be "
                "committed, or gone already); nothing was removed."
            )
        remove_tree(self.root, self.root.join(entry))
        if self.root.is_local:
            tidy_work_dir(self.root)


def _step_key(manifest: dict[str, Any]) -> int:
    step = manifest.get("step")
    return step if isinstance(step, int) else -1


def _created(manifest: dict[str, Any]) -> float:
    created = manifest.get("created", 0.0)
    return float(created) if isinstance(created, (int, float)) else 0.0


__all__ = ["Found", "Listing", "Scan"]
