"""``dcp-plugin cp``: copy or promote a committed checkpoint between any two storages."""

from __future__ import annotations

import argparse
from typing import Any

from dcp_plugin.cli.output import emit, emit_json, human_size, parse_options, progress
from dcp_plugin.storage import CheckpointStorage, copy_checkpoint, open_url


def add_copy_command(sub: Any, parents: list[argparse.ArgumentParser]) -> None:
    """Register ``cp`` on the command's sub-parsers (``parents`` carry the global options)."""
    cp = sub.add_parser(
        "cp",
        parents=parents,
        help="copy a committed checkpoint into another directory or URL (checked, and committed there)",
        description="Copy a committed checkpoint into another directory or URL, e.g. from local disk to s3://. Every "
        "file is checked against its checksum while it streams, read back, and the copy is committed by the "
        "target's own protocol: an interrupted copy is never listed there.",
    )
    cp.add_argument("source", help="the checkpoint: a path or URL such as runs/a/step_000000500")
    cp.add_argument("target", help="the directory or URL to copy it into, such as s3://bucket/run")
    cp.add_argument("--name", help="its name in the target (default: the same name)")
    cp.add_argument("--overwrite", action="store_true", help="replace a committed checkpoint of that name")
    cp.add_argument("--source-options", help="fsspec options for the source, as JSON")
    cp.add_argument("--target-options", help="fsspec options for the target, as JSON")
    cp.set_defaults(func=cmd_copy)


def cmd_copy(args: argparse.Namespace) -> int:
    shared = parse_options(args.storage_options, "--storage-options")
    source, name = open_url(args.source, {**shared, **parse_options(args.source_options, "--source-options")})
    target = CheckpointStorage(args.target, {**shared, **parse_options(args.target_options, "--target-options")})
    info = source.info(name)
    total = sum(int(record.get("size", 0)) for record in (info.manifest.get("files") or {}).values())
    with progress(total, f"copying {info.name}", show=args.progress) as bar:
        copied = copy_checkpoint(source, name, target, args.name, overwrite=args.overwrite, progress=bar.update)
    if args.json:
        emit_json({"source": source.url(name), "target": target.url(copied.name), "bytes": total})
    else:
        emit(f"copied {source.url(name)} to {target.url(copied.name)} ({human_size(total)}, checksums verified)")
    return 0
