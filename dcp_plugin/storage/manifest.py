"""The manifest (``dcp_plugin.json``): what a committed checkpoint holds, validated before anyone trusts it.

A manifest is JSON. Everything read from one is checked for type and range here, so one malformed manifest
makes only its own checkpoint invalid, with a message naming the file, and never breaks a listing.
"""

from __future__ import annotations

import json
import math
from typing import Any

import xxhash

from dcp_plugin.errors import CheckpointCorruptError, NotACheckpointError
from dcp_plugin.storage.blobs import is_blob
from dcp_plugin.storage.names import FORMAT_VERSION, OBJECTS, WORK_DIR, is_safe_data_file
from dcp_plugin.storage.node_parts import part_problems

CHECKSUM_KEY = "checksum"
"""The manifest's own checksum: xxh3-128 of its canonical JSON without this key."""

_FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "format": (int,),
    "name": (str,),
    "step": (int, type(None)),
    "created": (int, float),
    "committed": (int, float),
    "run_id": (str, type(None)),
    "save_id": (str,),
    "mode": (str,),
    "world_size": (int,),
    "entries": (dict,),
    "metadata": (dict,),
    "bytes": (int, type(None)),
    "files": (dict,),
    "blobs": (dict,),
    "fingerprints": (dict,),
    "bytes_new": (int,),
    "location": (str,),
    "layout": (str,),
    "part": (dict,),
    CHECKSUM_KEY: (str,),
}


def encode(manifest: dict[str, Any]) -> bytes:
    """Serialise a manifest, adding its format number (readers then insist on the checksum) and its checksum."""
    body = {k: v for k, v in manifest.items() if k != CHECKSUM_KEY}
    body.setdefault("format", FORMAT_VERSION)
    body[CHECKSUM_KEY] = _checksum(body)
    return json.dumps(body, indent=1, sort_keys=True, allow_nan=False).encode("utf-8")


def decode(data: bytes, shown: str) -> dict[str, Any]:
    """Parse and validate a manifest read from ``shown`` (a path or URL, for messages)."""
    try:
        manifest = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise CheckpointCorruptError(
            f"The manifest {shown} is not valid JSON ({err}); the checkpoint is not trusted."
        ) from None
    if not isinstance(manifest, dict):
        raise CheckpointCorruptError(
            f"The manifest {shown} holds a JSON {type(manifest).__name__}, not an object; "
            "the checkpoint is not trusted."
        )
    problems = _type_problems(manifest)
    if problems:
        raise CheckpointCorruptError(f"The manifest {shown} is malformed: {'; '.join(problems)}.")
    version = manifest.get("format", 1)
    if version > FORMAT_VERSION:
        raise NotACheckpointError(
            f"{shown} was written by a newer dcp-plugin (format {version}; this one reads up to {FORMAT_VERSION}). "
            "Upgrade dcp-plugin to read it."
        )
    if CHECKSUM_KEY in manifest:
        expected = _checksum({k: v for k, v in manifest.items() if k != CHECKSUM_KEY})
        if manifest[CHECKSUM_KEY] != expected:
            raise CheckpointCorruptError(
                f"The manifest {shown} does not match its checksum (it was changed or damaged after the commit)."
            )
    elif version >= 2:
        raise CheckpointCorruptError(f"The manifest {shown} has no checksum; the checkpoint is not trusted.")
    return manifest


def _checksum(body: dict[str, Any]) -> str:
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return xxhash.xxh3_128_hexdigest(canonical.encode("utf-8"))


def _record_problems(records: Any, *, allowed: tuple[str, ...], where: str) -> list[str]:
    """File records (``{name: {"size", "xxh3_128"}}``): plain names only, well-formed records."""
    problems: list[str] = []
    if not isinstance(records, dict):
        return problems
    for relative, record in records.items():
        if not is_safe_data_file(relative) and relative not in allowed:
            problems.append(f"file name {relative!r} leaves {where}")
        elif not (
            isinstance(record, dict)
            and isinstance(record.get("size"), int)
            and not isinstance(record.get("size"), bool)
            and record["size"] >= 0
            and isinstance(record.get("xxh3_128"), str)
        ):
            problems.append(f"the record of file {relative!r} is malformed")
    return problems


def _type_problems(manifest: dict[str, Any]) -> list[str]:
    problems = []
    for key, types in _FIELD_TYPES.items():
        if key not in manifest:
            continue
        value = manifest[key]
        if isinstance(value, bool) or not isinstance(value, types):
            wanted = " or ".join("null" if t is type(None) else t.__name__ for t in types)
            problems.append(f'"{key}" is {json.dumps(value)[:40]} ({type(value).__name__}), expected {wanted}')
    for key in ("step", "world_size", "format", "bytes"):
        value = manifest.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value < (1 if key == "world_size" else 0):
            problems.append(f'"{key}" is {value}, out of range')
    for key in ("created", "committed"):
        value = manifest.get(key)
        if isinstance(value, float) and not math.isfinite(value):
            problems.append(f'"{key}" is not a finite number')
    problems += _record_problems(manifest.get("files"), allowed=(".metadata",), where="the checkpoint directory")
    problems += _record_problems(manifest.get("blobs"), allowed=(), where="the shared data area")
    blobs = manifest.get("blobs")
    if isinstance(blobs, dict):
        problems += [f"shared data file name {name!r} is not a blob name" for name in blobs if not is_blob(name)]
    fingerprints = manifest.get("fingerprints")
    if isinstance(fingerprints, dict) and not all(isinstance(v, str) for v in fingerprints.values()):
        problems.append('"fingerprints" has values that are not strings')
    location = manifest.get("location")
    if isinstance(location, str):
        parts = location.split("/")
        if len(parts) != 3 or parts[:2] != [WORK_DIR, OBJECTS] or not parts[2] or parts[2] in (".", ".."):
            problems.append(f"the data location {location!r} is not inside the checkpoint root's object area")
    problems += part_problems(manifest.get("part"))
    entries = manifest.get("entries")
    if isinstance(entries, dict) and not all(isinstance(v, dict) for v in entries.values()):
        problems.append('"entries" has records that are not objects')
    return problems


__all__ = ["CHECKSUM_KEY", "decode", "encode"]
