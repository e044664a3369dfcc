"""Helpers that tamper with committed checkpoints the way an attacker or a failing disk would."""

from __future__ import annotations

import json
import os

import xxhash

from dcp_plugin.storage import manifests


def read_manifest(directory: str) -> dict:
    with open(os.path.join(directory, "dcp_plugin.json"), "rb") as handle:
        return json.loads(handle.read())


def write_manifest(directory: str, manifest: dict) -> None:
    """Write ``manifest`` with a valid manifest checksum (an attacker can compute it too)."""
    with open(os.path.join(directory, "dcp_plugin.json"), "wb") as handle:
        handle.write(manifests.encode(manifest))


def forge_manifest(directory: str, **changes: object) -> dict:
    """Make the manifest agree with whatever files are in ``directory`` now (sizes and checksums), so only the
    reader's other defences stand between the tampered files and the user."""
    manifest = read_manifest(directory)
    files = {}
    for name in manifest.get("files", {}):
        path = os.path.join(directory, name)
        if os.path.isfile(path) and not os.path.islink(path):
            with open(path, "rb") as handle:
                data = handle.read()
            files[name] = {"size": len(data), "xxh3_128": xxhash.xxh3_128_hexdigest(data)}
    manifest["files"] = files
    manifest.update(changes)
    write_manifest(directory, manifest)
    return manifest
