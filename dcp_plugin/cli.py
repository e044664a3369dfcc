"""The ``dcp-plugin`` command: list, inspect, verify, export and clean up checkpoints on any fsspec storage."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

from dcp_plugin.checkpointer import Checkpointer
from dcp_plugin.cli_copy import add_copy_command
from dcp_plugin.config import CheckpointConfig
from dcp_plugin.errors import CheckpointError
from dcp_plugin.storage import CheckpointStorage, open_url


def _storage_options(args: argparse.Namespace) -> dict[str, Any]:
    return json.loads(args.storage_options) if args.storage_options else {}


def _read(storage: CheckpointStorage, name: str, args: argparse.Namespace, entries: list[str] | None = None) -> dict:
    """Every (or the named) entry of one checkpoint, read by this process alone."""
    checkpointer = Checkpointer(
        CheckpointConfig(async_mode="sync", storage_options=_storage_options(args)), distributed=False
    )
    try:
        return checkpointer.read((storage, name), entries=entries)
    finally:
        checkpointer.close()


def cmd_ls(args: argparse.Namespace) -> int:
    storage = CheckpointStorage(args.directory, _storage_options(args))
    scan = storage.scan()
    infos = [storage.info(found.name) for found in scan.found]
    if args.json:
        listed = [{"name": i.name, "url": i.url, **i.manifest} for i in infos]
        listed += [{"name": name, "url": storage.url(name), "broken": reason} for name, reason in scan.broken]
        print(json.dumps(listed, indent=1))
        return 0
    if not infos and not scan.broken:
        print(f"no committed checkpoints in {storage.root_url}")
    for info in infos:
        size = info.manifest.get("bytes") or 0
        metrics = " ".join(f"{k}={v}" for k, v in sorted(info.metadata.items()))
        print(
            f"{info.name}\tstep={info.step}\tranks={info.manifest.get('world_size')}\t{size / 2**20:.1f} MiB\t{metrics}"
        )
    for name, reason in scan.broken:
        print(f"{name}\tBROKEN\t{reason}")
    leftovers = storage.incomplete()
    if leftovers:
        print(
            f"({len(leftovers)} incomplete write(s) not listed: {', '.join(leftovers)}; "
            "`dcp-plugin purge` removes them)"
        )
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    storage, name = open_url(args.checkpoint, _storage_options(args))
    info = storage.info(name)
    metadata = storage.metadata_reader(name).read_metadata()
    tensors = []
    for key, entry in sorted(metadata.state_dict_metadata.items()):
        if key.startswith("__dcp_plugin__"):
            continue
        size = getattr(entry, "size", None)
        dtype = getattr(getattr(entry, "properties", None), "dtype", None)
        tensors.append({"key": key, "shape": list(size) if size is not None else None, "dtype": str(dtype)})
    if args.json:
        print(json.dumps({"manifest": info.manifest, "tensors": tensors}, indent=1))
        return 0
    print(json.dumps(info.manifest, indent=1, sort_keys=True))
    for tensor in tensors:
        print(f"{tensor['key']}\t{tuple(tensor['shape'] or ())}\t{tensor['dtype']}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    """Check the manifest, the metadata (paths, sizes) and the checksum of every file; with --load, read every
    tensor too. On damage, name the newest older checkpoint that verifies."""
    storage, name = open_url(args.checkpoint, _storage_options(args))
    info = storage.info(name)
    files = {**(info.manifest.get("blobs") or {}), **(info.manifest.get("files") or {})}
    total = sum(int(record.get("size", 0)) for record in files.values())
    with _progress(total, f"verifying {info.name}") as bar:
        problems = storage.verify(info, progress=bar.update)
    if not problems and args.load:
        try:
            _read(storage, name, args)
        except Exception as err:  # noqa: BLE001 - reported as a verification failure
            problems.append(f"loading failed: {err}")
    if problems:
        print(f"{info.url}: BROKEN")
        for problem in problems:
            print(f"  - {problem}")
        fallback = storage.newest_verified_before(info)
        print(f"  the newest older checkpoint that verifies: {fallback.url if fallback else 'none'}")
        return 1
    checked = "checksums match" if files else "written without checksums: sizes checked only"
    print(f"{info.url}: OK ({len(files)} files, {total / 2**20:.1f} MiB, {checked})")
    return 0


def _progress(total: int, description: str) -> Any:
    """A progress bar on stderr for long work (hidden when stderr is not a terminal or the work is small)."""
    from tqdm import tqdm

    return tqdm(total=total, desc=description, unit="B", unit_scale=True, disable=None if total > 2**28 else True)


def cmd_export(args: argparse.Namespace) -> int:
    """Write one entry (default: model) of a checkpoint as a plain torch.save file, e.g. for inference."""
    import torch

    storage, name = open_url(args.checkpoint, _storage_options(args))
    values = _read(storage, name, args, entries=[args.entry])
    value = values[args.entry]
    if args.dtype:
        dtype = getattr(torch, args.dtype)
        value = {k: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v for k, v in value.items()}
    torch.save(value, args.output)
    print(f"wrote {args.entry!r} of {storage.url(name)} to {args.output}")
    return 0


def cmd_convert_lightning(args: argparse.Namespace) -> int:
    """Write a checkpoint saved through the Lightning plugin as one Lightning .ckpt file."""
    from dcp_plugin.lightning.inference import to_lightning_file

    weights_only = False if args.allow_pickle else None
    to_lightning_file(args.checkpoint, args.output, weights_only=weights_only, storage_options=_storage_options(args))
    print(f"wrote {args.output} (a Lightning checkpoint file: load_from_checkpoint and torch.load read it)")
    return 0


def cmd_purge(args: argparse.Namespace) -> int:
    storage = CheckpointStorage(args.directory, _storage_options(args))
    leftovers = storage.incomplete()
    for name in leftovers:
        if args.dry_run:
            print(f"would remove {storage.url(name)}")
        else:
            storage.remove_incomplete(name)
            print(f"removed {storage.url(name)}")
    if not leftovers:
        print(f"nothing to purge in {storage.root_url}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dcp-plugin", description=__doc__)
    parser.add_argument("--storage-options", help="fsspec options as JSON, e.g. '{\"anon\": false}'")
    sub = parser.add_subparsers(dest="command", required=True)
    ls = sub.add_parser("ls", help="list committed checkpoints in a directory or URL")
    ls.add_argument("directory")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=cmd_ls)
    inspect = sub.add_parser("inspect", help="show a checkpoint's manifest and tensors")
    inspect.add_argument("checkpoint")
    inspect.add_argument("--json", action="store_true")
    inspect.set_defaults(func=cmd_inspect)
    verify = sub.add_parser("verify", help="check a checkpoint is complete (and loadable with --load)")
    verify.add_argument("checkpoint")
    verify.add_argument("--load", action="store_true", help="also read every tensor")
    verify.set_defaults(func=cmd_verify)
    export = sub.add_parser("export", help="write one entry as a torch.save file")
    export.add_argument("checkpoint")
    export.add_argument("output")
    export.add_argument("--entry", default="model")
    export.add_argument("--dtype", help="convert floating tensors, e.g. bfloat16")
    export.set_defaults(func=cmd_export)
    convert = sub.add_parser(
        "convert-lightning", help="write a Lightning plugin checkpoint as one .ckpt file (for load_from_checkpoint)"
    )
    convert.add_argument("checkpoint")
    convert.add_argument("output")
    convert.add_argument("--allow-pickle", action="store_true", help="also convert pickled values (trusted files)")
    convert.set_defaults(func=cmd_convert_lightning)
    purge = sub.add_parser("purge", help="remove leftovers of writes that never committed")
    purge.add_argument("directory")
    purge.add_argument("--dry-run", action="store_true")
    purge.set_defaults(func=cmd_purge)
    add_copy_command(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Exit codes: 0 ok, 1 a checkpoint is missing, broken or refused, 2 bad input."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (CheckpointError, FileNotFoundError, NotADirectoryError, PermissionError, OSError) as err:
        print(f"dcp-plugin {args.command}: {err}", file=sys.stderr)
        return 1
    except ValueError as err:
        print(f"dcp-plugin {args.command}: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
