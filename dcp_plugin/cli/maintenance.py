"""The ``dcp-plugin`` commands that check or change what a directory holds: verify, adopt, purge.

Each takes the parsed arguments (with the global ``json``, ``storage_options`` and ``progress``) and returns the
exit code; errors are raised and turned into exit codes by :func:`dcp_plugin.cli.main`.
"""

from __future__ import annotations

import argparse
from typing import Any

from dcp_plugin.cli.commands import (
    CHECKPOINT_HELP,
    DIRECTORY_HELP,
    checkpoint_row,
    open_checkpoint,
    open_directory,
    options,
    stored_bytes,
)
from dcp_plugin.cli.output import emit, emit_json, human_size, progress
from dcp_plugin.errors import CheckpointError, ConfigError
from dcp_plugin.storage import METADATA_NAME, CheckpointInfo, CheckpointStorage, open_url


def cmd_verify(args: argparse.Namespace) -> int:
    """Check the manifest, the metadata (paths, sizes) and the checksum of every file; with --load, read every
    tensor too. On damage, name the newest older checkpoint that verifies."""
    storage, info = open_checkpoint(args.checkpoint, args)
    files = {**(info.manifest.get("blobs") or {}), **(info.manifest.get("files") or {})}
    total = stored_bytes(info) or 0
    with progress(total, f"verifying {info.name}", show=args.progress) as bar:
        problems = storage.verify(info, progress=bar.update)
    if not problems and args.load:
        with progress(0, f"reading every tensor of {info.name} ({human_size(total)})", show=args.progress) as bar:
            bar.update(0)
            problems += _load_problems(storage, info, args)
    fallback = storage.newest_verified_before(info) if problems else None
    if args.json:
        emit_json(
            {
                "url": info.url,
                "ok": not problems,
                "problems": problems,
                "files": len(files),
                "bytes": total,
                "checksums": bool(files),
                "loaded": bool(args.load and not problems),
                "fallback": fallback.url if fallback else None,
            }
        )
        return 1 if problems else 0
    if problems:
        emit(f"{info.url}: BROKEN")
        for problem in problems:
            emit(f"  - {problem}")
        emit(f"  the newest older checkpoint that verifies: {fallback.url if fallback else 'none'}")
        return 1
    checked = "checksums match" if files else "written without checksums: sizes checked only"
    if info.unverified:
        checked = "plain DCP, unverified: sizes checked only; `dcp-plugin adopt` commits checksums"
    if args.load:
        checked += "; every tensor and value was read back"
    emit(f"{info.url}: OK ({len(files)} files, {human_size(total)}, {checked})")
    return 0


def _load_problems(storage: CheckpointStorage, info: CheckpointInfo, args: argparse.Namespace) -> list[str]:
    from dcp_plugin.checkpointer import Checkpointer
    from dcp_plugin.config import CheckpointConfig

    checkpointer = Checkpointer(CheckpointConfig(async_mode="sync", storage_options=options(args)), distributed=False)
    try:
        checkpointer.read((storage, info.name))
    except Exception as err:  # noqa: BLE001 - reported as a verification failure
        return [f"loading failed: {err}"]
    finally:
        checkpointer.close()
    return []


def cmd_adopt(args: argparse.Namespace) -> int:
    """Make a directory written by plain dcp.save (torchtitan's step-N folders) a regular checkpoint: check its
    metadata (allow-list, confined paths, every named file present with enough bytes), then commit a manifest with
    the checksums of its files as they are now. Its data is not changed."""
    _refuse_run_directory_for_adopt(args.checkpoint, args)
    storage, name = open_url(args.checkpoint, options(args))
    info = storage.adopt(name)
    files = info.manifest.get("files") or {}
    if args.json:
        emit_json({**checkpoint_row(info), "files": len(files)})
    else:
        emit(f"adopted {info.url}: {len(files)} files, {human_size(info.manifest.get('bytes'))}, checksums committed")
    return 0


def _refuse_run_directory_for_adopt(url: str, args: argparse.Namespace) -> None:
    """``adopt`` takes one directory written by ``dcp.save``; given a directory that holds checkpoints, name the
    plain-DCP directories in it that can be adopted (never the ones already committed)."""
    try:
        storage = CheckpointStorage(url, options(args))
        if not storage.fs.isdir(storage.root) or storage.fs.exists(f"{storage.root}/{METADATA_NAME}"):
            return  # one checkpoint (or nothing): storage.adopt says what it is
        plain = storage.plain_dcp()
        committed = storage.scan().found
    except (CheckpointError, OSError, ValueError):
        return
    if not plain and not committed:
        return
    if plain:
        commands = "\n".join(f"  dcp-plugin adopt {storage.url(name)}" for name in plain)
        raise ConfigError(
            f"{storage.root_url} is a directory holding {len(plain)} plain DCP director"
            f"{'y' if len(plain) == 1 else 'ies'} (written by dcp.save), not one of them. Adopt each one to keep:\n"
            f"{commands}"
        )
    raise ConfigError(
        f"{storage.root_url} is a directory of committed checkpoints ({len(committed)}) and holds no plain DCP "
        "directory: there is nothing to adopt (`dcp-plugin ls` lists them)."
    )


def cmd_purge(args: argparse.Namespace) -> int:
    """Remove the leftovers of writes that never committed (committed checkpoints are never touched)."""
    storage = open_directory(args.directory, args)
    leftovers = storage.incomplete()
    done = []
    with progress(len(leftovers), "purging", unit="entries", show=args.progress and not args.dry_run) as bar:
        for name in leftovers:
            if not args.dry_run:
                storage.remove_incomplete(name)
            done.append(storage.url(name))
            bar.update(1)
    if args.json:
        emit_json(
            {
                "directory": storage.root_url,
                "dry_run": args.dry_run,
                "removed" if not args.dry_run else "would_remove": done,
            }
        )
        return 0
    for url in done:
        emit(f"{'would remove' if args.dry_run else 'removed'} {url}")
    if not leftovers:
        emit(f"nothing to purge in {storage.root_url}")
    return 0


def add_maintenance_commands(sub: Any, parents: list[argparse.ArgumentParser]) -> None:
    """Register verify, adopt and purge on the command's sub-parsers (``parents`` carry the global options)."""
    verify = sub.add_parser(
        "verify",
        parents=parents,
        help="check a checkpoint's files against their checksums",
        description=cmd_verify.__doc__,
    )
    verify.add_argument("checkpoint", help=CHECKPOINT_HELP)
    verify.add_argument("--load", action="store_true", help="also read every tensor")
    verify.set_defaults(func=cmd_verify)
    adopt = sub.add_parser(
        "adopt",
        parents=parents,
        help="commit checksums for a directory written by plain dcp.save",
        description=cmd_adopt.__doc__,
    )
    adopt.add_argument("checkpoint", help="a directory written by dcp.save, e.g. outputs/checkpoint/step-1000")
    adopt.set_defaults(func=cmd_adopt)
    purge = sub.add_parser(
        "purge", parents=parents, help="remove leftovers of writes that never committed", description=cmd_purge.__doc__
    )
    purge.add_argument("directory", help=DIRECTORY_HELP)
    purge.add_argument("--dry-run", action="store_true", help="only say what would be removed")
    purge.set_defaults(func=cmd_purge)
