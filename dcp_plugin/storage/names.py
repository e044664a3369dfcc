"""Names inside a checkpoint root: checkpoints, the hidden work area, and the files DCP writes.

Everything a write, a replacement or a deletion has in progress lives under ``<root>/.dcp-plugin/`` so that
tools which scan the root by name (Lightning's ``hpc_ckpt_N`` resume, ``ModelCheckpoint`` versioning, user
globs) only ever see committed checkpoints.
"""

from __future__ import annotations

import re
import uuid

MANIFEST_NAME = "dcp_plugin.json"
METADATA_NAME = ".metadata"
FORMAT_VERSION = 2
"""Version 2: per-file checksums in the manifest, work area under ``.dcp-plugin/``. Version 1 (v0.1) still loads."""

WORK_DIR = ".dcp-plugin"
STAGING = "staging"
"""``<root>/.dcp-plugin/staging/<name>.<id>``: a local write in progress (or a superseded copy being removed)."""
TRASH = "trash"
"""``<root>/.dcp-plugin/trash/<name>.<id>``: a deleted local checkpoint being removed."""
REPLACED = "replaced"
"""``<root>/.dcp-plugin/replaced/<name>.<id>``: the old copy during a two-step local replacement (filesystems
without an atomic exchange). While ``<root>/<name>`` is missing this copy *is* checkpoint ``name``."""
OBJECTS = "objects"
"""``<root>/.dcp-plugin/objects/<name>.<id>``: data of a checkpoint on an object store; ``<root>/<name>/`` holds
only the manifest (the commit marker), which names this location."""

BLOBS = "blobs"
"""``<root>/.dcp-plugin/blobs/<blob>``: tensor data shared by incremental checkpoints. A blob is named by the write
that created it (``blob_<id>_r<rank>_<n>.distcp``); every checkpoint that uses it lists it in its manifest's
``blobs``. It is removed once no committed checkpoint lists it."""

REPLICAS = "replicas"
"""``<root>/.dcp-plugin/replicas/node<k>/``: copies of other nodes' parts of checkpoints (``local_scope="node"``),
one checkpoint root per node whose parts it keeps (see :mod:`dcp_plugin.storage.node_parts`)."""
RESTORE = "restore"
"""``<root>/.dcp-plugin/restore/<name>.<id>/``: a checkpoint assembled on a node for one restore (links to the
copies the node holds, files fetched from other nodes), removed when the restore ends."""

PROBE = "nodes"
"""``<root>/.dcp-plugin/nodes/<token>``: the marks by which the nodes check, when a job starts, that none shares
another's directory (removed at once)."""

LEGACY_PREFIXES = (".tmp-", ".old-")
"""Work names of v0.1, directly in the root."""

STEP_NAME = re.compile(r"^step_(\d+)$")
_DATA_FILE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,254}$")
_CHECKPOINT_NAME = re.compile(r"^[^/\\\x00]{1,255}$")


def step_name(step: int) -> str:
    """Directory name for a step: zero-padded so names sort like steps."""
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be a non-negative integer, got {step!r}.")
    return f"step_{step:09d}"


def check_name(name: str) -> str:
    """Return ``name`` if it can name a checkpoint directory in the root, else raise ``ValueError``."""
    if (
        not isinstance(name, str)
        or not _CHECKPOINT_NAME.match(name)
        or name in (".", "..")
        or name == WORK_DIR
        or name.startswith(LEGACY_PREFIXES)
    ):
        raise ValueError(f"Invalid checkpoint name {name!r}: use a plain directory name (no '/', not '.dcp-plugin').")
    return name


def is_safe_data_file(relative: object) -> bool:
    """Whether a file name taken from a checkpoint's metadata stays inside the checkpoint directory: one plain
    path component, no separators, no ``..``, not absolute, not hidden."""
    return isinstance(relative, str) and bool(_DATA_FILE.match(relative)) and relative not in (".", "..")


def work_name(name: str) -> str:
    """A unique entry name for ``name`` inside one of the work folders."""
    return f"{name}.{uuid.uuid4().hex[:12]}"


def replica_area(node: int) -> str:
    """The folder under ``.dcp-plugin/replicas/`` that keeps copies of ``node``'s parts."""
    return f"node{node}"


def name_of_work_entry(entry: str) -> str:
    """The checkpoint name a work entry (``<name>.<id>``) belongs to."""
    return entry.rsplit(".", 1)[0]


__all__ = [
    "FORMAT_VERSION",
    "MANIFEST_NAME",
    "METADATA_NAME",
    "check_name",
    "is_safe_data_file",
    "step_name",
]
