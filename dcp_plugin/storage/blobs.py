"""The shared blob area of incremental checkpoints: names, fingerprints, and which blobs may be removed.

An incremental save writes the tensors that are expected to stay unchanged (frozen parameters, tensors that did
not change since the previous save) into blob files under ``<root>/.dcp-plugin/blobs/`` instead of its own
directory, and each later checkpoint whose tensors still match refers to those bytes instead of writing them
again. A checkpoint lists every blob it uses (size and checksum) in its manifest's ``blobs``; nothing else
decides whether a blob is in use:

* a blob listed by any committed checkpoint is kept (deleting a checkpoint never removes data another uses);
* a blob is in flight while the write that creates it or a save that refers to it runs in this process
  (:func:`hold`), or while the work entry of the write that created it exists (another process is writing);
* everything else is unreferenced: ``purge`` and retention remove it.

On a local disk each committed checkpoint directory also holds a hard link to every blob it uses, under the
blob's name (:func:`link_into`): ``.metadata`` names the blob by that name, so every DCP reader (``dcp.load``,
``dcp_to_torch_save``) finds the bytes in the checkpoint's own directory, and the bytes are still stored once.
The blob area keeps its own link, which later saves refer to; deleting a checkpoint removes only its links.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import shutil
import threading
from collections import Counter
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import xxhash

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)
_BLOB = re.compile(r"^blob_([0-9a-f]{12})_r(\d+)_(\d+)\.distcp$")
_held: Counter[tuple[str, str]] = Counter()
_held_lock = threading.Lock()


def blob_name(write_id: str, rank: int, number: int) -> str:
    """The file name of blob ``number`` written by ``rank`` in the write with id ``write_id``."""
    return f"blob_{write_id}_r{rank}_{number}.distcp"


def is_blob(name: str) -> bool:
    return bool(_BLOB.match(name))


def write_id_of(name: str) -> str | None:
    """The id of the write that created blob ``name`` (``None`` if ``name`` is not a blob name)."""
    match = _BLOB.match(name)
    return match.group(1) if match else None


def write_id_of_entry(entry: str) -> str:
    """The write id in a work entry name (``<name>.<id>``)."""
    return entry.rsplit(".", 1)[-1]


def link_into(area: str, names: Iterable[str], directory: str) -> None:
    """Make each blob of the local blob ``area`` appear in the checkpoint ``directory`` under its own name: a hard
    link, or a copy where the filesystem refuses links (then logged: the bytes are stored twice). Durable on
    return."""
    copied = []
    for name in sorted(names):
        source, target = os.path.join(area, name), os.path.join(directory, name)
        try:
            os.link(source, target, follow_symlinks=False)
        except FileExistsError:
            if not os.path.samefile(source, target):
                raise
        except OSError as err:
            if err.errno not in (errno.EPERM, errno.EXDEV, errno.EMLINK, errno.ENOTSUP, errno.EOPNOTSUPP):
                raise
            with open(source, "rb") as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst, 16 * 2**20)
                dst.flush()
                os.fsync(dst.fileno())
            copied.append(name)
    if copied:
        log.warning(
            "The filesystem of %s refuses hard links: %d shared data file(s) were copied into the checkpoint so "
            "that any DCP reader finds them (their bytes are stored twice).",
            directory,
            len(copied),
        )


# -- in flight in this process --------------------------------------------------------------------------
def hold(root_url: str, names: Iterable[str]) -> list[tuple[str, str]]:
    """Keep blobs (or, by write id, the blobs a write is creating) from being collected until :func:`release`."""
    keys = [(root_url, name) for name in names]
    with _held_lock:
        _held.update(keys)
    return keys


def release(keys: list[tuple[str, str]]) -> None:
    with _held_lock:
        _held.subtract(keys)
        for key in [k for k, count in _held.items() if count <= 0]:
            del _held[key]


def held(root_url: str) -> set[str]:
    """Blob names and write ids held in this process under ``root_url``."""
    with _held_lock:
        return {name for (root, name), count in _held.items() if root == root_url and count > 0}


def unreferenced(blobs: Iterable[str], manifests: Iterable[dict[str, Any]], protected: set[str]) -> list[str]:
    """The blobs no manifest lists, whose name and write id are not in ``protected``."""
    used: set[str] = set()
    for manifest in manifests:
        records = manifest.get("blobs")
        if isinstance(records, dict):
            used.update(records)
    return sorted(
        name for name in blobs if name not in used and name not in protected and write_id_of(name) not in protected
    )


# -- fingerprints ----------------------------------------------------------------------------------------
def fingerprint(tensor: torch.Tensor) -> str | None:
    """xxh3-128 of a tensor's dtype, shape and bytes: equal fingerprints mean equal content (``None`` where the
    bytes cannot be read, which makes the tensor be written)."""
    import torch

    try:
        data = tensor.detach()
        if data.device.type != "cpu":
            data = data.cpu()
        hasher = xxhash.xxh3_128(f"{data.dtype}|{tuple(data.shape)}|".encode())
        if data.numel():
            hasher.update(data.contiguous().reshape(-1).view(torch.uint8).numpy().data)
        return hasher.hexdigest()
    except (RuntimeError, TypeError, ValueError):
        return None


def chunk_key(fqn: str, offsets: Any) -> str:
    """A chunk of a tensor as text (``model.w@0,0``), the key of its fingerprint in a manifest."""
    return f"{fqn}@{','.join(str(int(o)) for o in (offsets or ()))}"


__all__ = ["blob_name", "chunk_key", "fingerprint", "hold", "is_blob", "link_into", "release", "unreferenced"]
