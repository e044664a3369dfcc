"""The ``dcp-plugin`` commands that look at checkpoints: ls, latest, best, inspect.

Each takes the parsed arguments (with the global ``json``, ``storage_options`` and ``progress``) and returns the
exit code; errors are raised and turned into exit codes by :func:`dcp_plugin.cli.main`.
"""

from __future__ import annotations

import argparse
import json
import math
from typing import Any

from dcp_plugin.cli.output import emit, emit_json, emit_note, human_size, iso_time, parse_options, table
from dcp_plugin.errors import CheckpointError, CheckpointNotFoundError, ConfigError, UnsafeCheckpointError
from dcp_plugin.storage import MANIFEST_NAME, METADATA_NAME, CheckpointInfo, CheckpointStorage, open_url
from dcp_plugin.storage.manifest import CHECKSUM_KEY
from dcp_plugin.storage.plain import step_of as plain_step_of

DIRECTORY_HELP = "a directory (or URL) holding checkpoints, e.g. runs/a or s3://bucket/run"
CHECKPOINT_HELP = "one checkpoint: a path or URL such as runs/a/step_000000500"


def options(args: argparse.Namespace) -> dict[str, Any]:
    return parse_options(args.storage_options, "--storage-options")


def open_directory(url: str, args: argparse.Namespace, *, checkpoint_ok: bool = False) -> CheckpointStorage:
    """A directory of checkpoints that exists (a missing one or a file is an error saying so). Unless
    ``checkpoint_ok``, one checkpoint given in its place is a usage error naming the directory that holds it."""
    storage = CheckpointStorage(url, options(args))
    if storage.fs.isfile(storage.root):
        raise CheckpointNotFoundError(f"{storage.root_url} is a file, not a directory of checkpoints.")
    if not storage.fs.exists(storage.root):
        raise CheckpointNotFoundError(f"{storage.root_url}: no such directory.")
    if not checkpoint_ok:
        _refuse_one_checkpoint(storage, args)
    return storage


def _refuse_one_checkpoint(storage: CheckpointStorage, args: argparse.Namespace) -> None:
    """A usage error when ``storage``'s directory is itself one checkpoint (its manifest or DCP's ``.metadata`` is
    in it) rather than a directory of checkpoints: the command is meant for the directory that holds it."""
    if not any(storage.fs.exists(f"{storage.root}/{marker}") for marker in (MANIFEST_NAME, METADATA_NAME)):
        return
    parent = storage.root_url.rstrip("/").rpartition("/")[0] or "/"
    raise ConfigError(
        f"{storage.root_url} is one checkpoint, not a directory of checkpoints. `dcp-plugin {args.command}` works "
        f"on the directory that holds checkpoints: dcp-plugin {args.command} {parent}"
    )


def open_checkpoint(url: str, args: argparse.Namespace) -> tuple[CheckpointStorage, CheckpointInfo]:
    """The committed checkpoint at ``url``; a missing path, a torch.save file or a plain directory is an error
    saying which."""
    storage, name = open_url(url, options(args))
    try:
        return storage, storage.info(name)
    except CheckpointNotFoundError as err:
        raise CheckpointNotFoundError(f"{err}{_run_directory_hint(url, args)}") from None


def _run_directory_hint(url: str, args: argparse.Namespace) -> str:
    """Where to go from a run directory given in place of one checkpoint (empty if ``url`` is none)."""
    try:
        scan = CheckpointStorage(url, options(args)).scan()
    except (CheckpointError, OSError, ValueError):
        return ""
    if not scan.found and not scan.broken:
        return ""
    return f"\n`dcp-plugin ls {url}` lists them; `dcp-plugin latest {url}` prints the newest one's path."


def stored_bytes(info: CheckpointInfo) -> int | None:
    """What the checkpoint occupies on storage: its files, ``.metadata`` and the shared blobs it uses (what
    ``verify`` reads). None for format-1 checkpoints, which record no file sizes."""
    files = {**(info.manifest.get("blobs") or {}), **(info.manifest.get("files") or {})}
    if not files:
        return None
    return sum(int(record.get("size", 0)) for record in files.values())


def _size(info: CheckpointInfo) -> int | None:
    stored = stored_bytes(info)
    return stored if stored is not None else info.manifest.get("bytes")


def checkpoint_row(info: CheckpointInfo) -> dict[str, Any]:
    return {
        "name": info.name,
        "url": info.url,
        "step": info.step,
        "created": iso_time(info.created),
        "bytes": info.manifest.get("bytes"),
        "stored_bytes": stored_bytes(info),
        "world_size": info.manifest.get("world_size"),
        "metadata": info.metadata,
    }


_RECORDED_BY_ADAPTERS = frozenset(
    {"reasons", "run", "metrics", "lightning", "adapter", "iteration", "accelerator_step"}
)
"""Metadata keys the manager and the adapters write for themselves (shown by ``inspect``, not as metrics)."""


def user_metrics(metadata: dict[str, Any]) -> dict[str, Any]:
    """The metrics a user recorded: ``maybe_save(metrics=...)``'s (under ``"metrics"``) and the plain values
    passed as ``save(metadata=...)``; the adapters' own records are left out."""
    plain = {
        k: v
        for k, v in metadata.items()
        if k not in _RECORDED_BY_ADAPTERS and (v is None or isinstance(v, (int, float, str, bool)))
    }
    recorded = metadata.get("metrics")
    return {**plain, **(recorded if isinstance(recorded, dict) else {})}


def _metrics(metadata: dict[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in sorted(user_metrics(metadata).items())) or "-"


def _other_metadata(metadata: dict[str, Any]) -> str:
    shown = user_metrics(metadata)
    rest = {k: v for k, v in metadata.items() if k not in shown and k != "metrics"}
    return json.dumps(rest, sort_keys=True, default=str) if rest else "-"


def cmd_ls(args: argparse.Namespace) -> int:
    """List the committed (and broken) checkpoints of a directory, oldest first."""
    storage = open_directory(args.directory, args, checkpoint_ok=True)
    scan = storage.scan()
    infos = [storage.info(found.name) for found in scan.found]
    broken = list(scan.broken)
    if not infos and not broken:
        parent, name = open_url(args.directory, options(args))
        if parent.is_committed(name):
            emit_note(f"{storage.root_url} is a checkpoint, not a directory of checkpoints; showing it.")
            infos = [parent.info(name)]
    try:
        leftovers = storage.incomplete()
    except UnsafeCheckpointError as err:  # a linked work area: the checkpoints are still listed
        leftovers = []
        emit_note(str(err))
    plain = _plain_dcp(storage)
    if args.json:
        emit_json(
            {
                "directory": storage.root_url,
                "checkpoints": [checkpoint_row(info) for info in infos],
                "broken": [{"name": n, "url": storage.url(n), "reason": reason} for n, reason in broken],
                "incomplete": leftovers,
                "plain_dcp": [_plain_row(storage, name, found) for name, found in plain],
            }
        )
        return 0
    if not infos and not broken and not plain:
        emit(f"no committed checkpoints in {storage.root_url}")
    else:
        rows: list[tuple[tuple[int, float, str], list[Any]]] = [
            (
                _order(i.name, i.step, i.created),
                [
                    i.name,
                    i.step if i.step is not None else "-",
                    i.manifest.get("world_size", "-"),
                    human_size(_size(i)),
                    iso_time(i.created),
                    _metrics(i.metadata),
                ],
            )
            for i in infos
        ]
        rows += [(_order(n, None, None), [n, "-", "-", "-", "-", f"BROKEN: {reason}"]) for n, reason in broken]
        rows += [
            (_order(name, getattr(found, "step", None), getattr(found, "created", None)), _plain_table_row(name, found))
            for name, found in plain
        ]
        rows.sort(key=lambda pair: pair[0])  # one listing, oldest first, whatever kind each entry is
        emit(table(["NAME", "STEP", "RANKS", "SIZE", "CREATED", "METRICS"], [row for _, row in rows]))
    if leftovers:
        emit_note(
            f"{len(leftovers)} incomplete write(s) not listed: {', '.join(leftovers)}; `dcp-plugin purge` removes them"
        )
    if plain:
        emit_note(_PLAIN_NOTE)
    return 0


def _order(name: str, step: int | None, created: float | None) -> tuple[int, float, str]:
    """Where an entry goes in ``ls``: by step (from its name when it records none), then creation time, then
    name; the same order for committed, adopted, plain and broken entries."""
    if step is None:
        step = plain_step_of(name)
    return (step if step is not None else -1, float(created or 0.0), name)


_PLAIN_NOTE = (
    "PLAIN DCP: written by dcp.save, no dcp_plugin.json: readable, unverified (no checksums); "
    "`dcp-plugin adopt DIR` checks one and commits checksums for it"
)


def _plain_dcp(storage: CheckpointStorage) -> list[tuple[str, CheckpointInfo | str]]:
    """Each plain-DCP directory with its info, or why it is refused."""
    found: list[tuple[str, CheckpointInfo | str]] = []
    for name in storage.plain_dcp():
        try:
            found.append((name, storage.info(name)))
        except (CheckpointError, OSError, ValueError) as err:
            found.append((name, str(err)))
    return found


def _plain_row(storage: CheckpointStorage, name: str, found: CheckpointInfo | str) -> dict[str, Any]:
    if isinstance(found, str):
        return {"name": name, "url": storage.url(name), "refused": found}
    return {**checkpoint_row(found), "unverified": True}


def _plain_table_row(name: str, found: CheckpointInfo | str) -> list[Any]:
    if isinstance(found, str):
        return [name, "-", "-", "-", "-", f"PLAIN DCP, REFUSED: {found}"]
    step = found.step if found.step is not None else "-"
    return [name, step, "-", human_size(found.manifest.get("bytes")), iso_time(found.created), "PLAIN DCP (unverified)"]


def cmd_latest(args: argparse.Namespace) -> int:
    """Print the newest committed checkpoint's path or URL."""
    storage = open_directory(args.directory, args)
    latest = storage.latest()
    plain = storage.plain_dcp()
    if latest is None:
        found = f"; plain DCP directories (unverified, `dcp-plugin adopt` commits one): {', '.join(plain)}"
        raise CheckpointNotFoundError(f"No committed checkpoints in {storage.root_url}{found if plain else ''}.")
    if args.json:
        emit_json({**checkpoint_row(latest), "plain_dcp": [storage.url(n) for n in plain]})
    else:
        emit(latest.url)
    if plain and not args.json:
        emit_note(
            f"also {len(plain)} plain DCP director{'y' if len(plain) == 1 else 'ies'} (unverified): {', '.join(plain)}"
        )
    return 0


def cmd_best(args: argparse.Namespace) -> int:
    """Print the path or URL of the checkpoint with the lowest (``--mode min``) or highest metric."""
    storage = open_directory(args.directory, args)
    infos = storage.list()
    values = [(user_metrics(i.metadata).get(args.metric), i) for i in infos]
    scored = [(float(value), i) for value, i in values if value is not None and _is_number(value)]
    if not scored:
        recorded = sorted({k for i in infos for k in user_metrics(i.metadata)})
        raise CheckpointNotFoundError(
            f"No checkpoint in {storage.root_url} records the metric {args.metric!r}; recorded: {recorded or 'none'}."
        )
    sign = 1 if args.mode == "min" else -1
    value, best = min(scored, key=lambda pair: (sign * pair[0], -infos.index(pair[1])))  # ties: the newest
    emit_json({**checkpoint_row(best), "metric": args.metric, "value": value}) if args.json else emit(best.url)
    return 0


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def cmd_inspect(args: argparse.Namespace) -> int:
    """Show a checkpoint's manifest and its tensors."""
    storage, info = open_checkpoint(args.checkpoint, args)
    metadata = storage.metadata_reader(info).read_metadata()
    tensors = []
    for key, entry in sorted(metadata.state_dict_metadata.items()):
        if key.startswith("__dcp_plugin__"):
            continue
        size = getattr(entry, "size", None)
        if size is None:
            continue  # a plain value DCP stores as bytes (e.g. an optimizer's param_groups), not a tensor
        dtype = getattr(getattr(entry, "properties", None), "dtype", None)
        nbytes = math.prod(size) * dtype.itemsize if size is not None and dtype is not None else None
        tensors.append(
            {"key": key, "shape": list(size) if size is not None else None, "dtype": str(dtype), "bytes": nbytes}
        )
    if args.json:
        row = {**checkpoint_row(info), "unverified": info.unverified}
        emit_json({**row, "manifest": info.manifest, "tensors": tensors})
        return 0
    manifest = info.manifest
    summary: list[list[Any]] = [
        ["checkpoint", info.url],
        ["step", info.step if info.step is not None else "-"],
        ["created", iso_time(info.created)],
        ["ranks", manifest.get("world_size", "-")],
        ["size", f"{human_size(_size(info))} on storage (files, .metadata and shared blobs: what verify reads)"],
        ["data", f"{human_size(manifest.get('bytes'))} of tensor and value records inside those files"],
        ["entries", ", ".join(manifest.get("entries", {})) or "-"],
        ["metrics", _metrics(info.metadata)],
        ["metadata", _other_metadata(info.metadata)],
        ["format", "plain DCP, unverified (no dcp_plugin.json)" if info.unverified else _format(manifest)],
    ]
    emit(table(["FIELD", "VALUE"], summary))
    emit("")
    rows = [
        [t["key"], tuple(t["shape"] or ()), t["dtype"].removeprefix("torch."), human_size(t["bytes"])] for t in tensors
    ]
    emit(table(["TENSOR", "SHAPE", "DTYPE", "SIZE"], rows))
    return 0


def _format(manifest: dict[str, Any]) -> str:
    """The manifest's format version, explained (manifests record it only since it changed meaning)."""
    if manifest.get("format", 2 if CHECKSUM_KEY in manifest else 1) >= 2:
        return "2 (dcp-plugin's checkpoint layout: manifest and every file checksummed with xxh3-128)"
    return "1 (written by dcp-plugin 0.1: no checksums, sizes checked only; it still loads)"


def add_commands(sub: Any, parents: list[argparse.ArgumentParser]) -> None:
    """Register the commands on the command's sub-parsers (``parents`` carry the global options)."""
    ls = sub.add_parser("ls", parents=parents, help="list the checkpoints of a directory", description=cmd_ls.__doc__)
    ls.add_argument("directory", help=DIRECTORY_HELP)
    ls.set_defaults(func=cmd_ls)
    latest = sub.add_parser(
        "latest", parents=parents, help="print the newest checkpoint's path", description=cmd_latest.__doc__
    )
    latest.add_argument("directory", help=DIRECTORY_HELP)
    latest.set_defaults(func=cmd_latest)
    best = sub.add_parser(
        "best", parents=parents, help="print the path of the best checkpoint by a metric", description=cmd_best.__doc__
    )
    best.add_argument("directory", help=DIRECTORY_HELP)
    best.add_argument("--metric", required=True, help="a metric recorded with the checkpoints, e.g. val_loss")
    best.add_argument("--mode", choices=("min", "max"), default="min", help="lowest (default) or highest wins")
    best.set_defaults(func=cmd_best)
    inspect = sub.add_parser(
        "inspect", parents=parents, help="show a checkpoint's manifest and tensors", description=cmd_inspect.__doc__
    )
    inspect.add_argument("checkpoint", help=CHECKPOINT_HELP)
    inspect.set_defaults(func=cmd_inspect)
