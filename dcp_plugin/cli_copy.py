"""``dcp-plugin cp``: copy or promote a committed checkpoint between any two storages."""

from __future__ import annotations

import argparse
import json
from typing import Any

from dcp_plugin.storage import CheckpointStorage, copy_checkpoint, open_url


def add_copy_command(sub: Any) -> None:
    """Register ``cp`` on the command's sub-parsers."""
    cp = sub.add_parser(
        "cp",
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
    cp.add_argument("--json", action="store_true", help="print the result as JSON")
    cp.set_defaults(func=cmd_copy)


def cmd_copy(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    shared = _options(getattr(args, "storage_options", None), "--storage-options")
    source, name = open_url(args.source, {**shared, **_options(args.source_options, "--source-options")})
    target = CheckpointStorage(args.target, {**shared, **_options(args.target_options, "--target-options")})
    info = source.info(name)
    total = sum(int(record.get("size", 0)) for record in (info.manifest.get("files") or {}).values())
    with tqdm(total=total, desc=f"copying {info.name}", unit="B", unit_scale=True, disable=None) as bar:
        copied = copy_checkpoint(source, name, target, args.name, overwrite=args.overwrite, progress=bar.update)
    if args.json:
        print(json.dumps({"source": source.url(name), "target": target.url(copied.name), "bytes": total}))
    else:
        print(f"copied {source.url(name)} to {target.url(copied.name)} ({total / 2**20:.1f} MiB, checksums verified)")
    return 0


def _options(text: str | None, flag: str) -> dict[str, Any]:
    if not text:
        return {}
    try:
        options = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{flag} must be a JSON object of fsspec options: {err}") from None
    if not isinstance(options, dict):
        raise ValueError(f"{flag} must be a JSON object of fsspec options, not {type(options).__name__}.")
    return options
