"""``dcp-plugin export`` and ``convert-lightning``: write a checkpoint as a file other tools read."""

from __future__ import annotations

import argparse
from typing import Any

from dcp_plugin.cli.commands import open_checkpoint
from dcp_plugin.cli.output import emit, emit_json, parse_options, progress
from dcp_plugin.export.exporter import DTYPES, export_formats

_SUFFIX_FORMATS = {".safetensors": "safetensors", ".ckpt": "lightning"}


def format_for(output: str, given: str | None) -> str:
    """``--format``, or from the output's suffix: .safetensors, .ckpt (Lightning), anything else torch.save."""
    if given:
        return given
    return next((fmt for suffix, fmt in _SUFFIX_FORMATS.items() if output.endswith(suffix)), "torch")


def cmd_export(args: argparse.Namespace) -> int:
    """Write one entry (default: the model weights) of a checkpoint as a safetensors, torch.save or Lightning
    file, to a path or any fsspec URL. safetensors is streamed tensor by tensor (memory: about the largest
    tensor); torch.save needs the whole entry in memory."""
    from dcp_plugin.export.exporter import export_checkpoint

    fmt = format_for(args.output, args.format)
    shared = parse_options(args.storage_options, "--storage-options")
    with progress(0, f"exporting to {fmt}", show=args.progress) as bar:

        def advance(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        try:
            result = export_checkpoint(
                args.checkpoint,
                args.output,
                format=fmt,
                entry=args.entry,
                dtype=args.dtype,
                storage_options=shared,
                output_options={**shared, **parse_options(args.output_options, "--output-options")},
                progress=advance,
            )
        except ValueError as err:
            raise _with_format_hint(err, args, fmt) from None
    if args.json:
        emit_json(
            {
                "checkpoint": result.checkpoint,
                "output": result.output,
                "format": fmt,
                "entry": result.entry,
                "tensors": result.tensors,
                "bytes": result.bytes,
                "dtype": args.dtype,
            }
        )
    else:
        what = f"{result.entry!r} of " if result.entry else ""
        emit(f"wrote {what}{result.checkpoint} to {result.output} ({fmt})")
    return 0


def _with_format_hint(err: ValueError, args: argparse.Namespace, fmt: str) -> ValueError:
    """A .ckpt output picks the Lightning format; for a checkpoint the Lightning plugin did not write, say how to
    write a torch.save file under that name instead."""
    if args.format or fmt != "lightning":
        return err
    from dcp_plugin.lightning.layout import LightningCheckpointError  # loaded already by the lightning format

    if not isinstance(err, LightningCheckpointError):
        return err
    return type(err)(
        f"{err}\nThe format was chosen from the output's .ckpt suffix (a Lightning file). To write the weights with "
        f"torch.save under that name: dcp-plugin export {args.checkpoint} {args.output} --format torch"
    )


def cmd_convert_lightning(args: argparse.Namespace) -> int:
    """Write a checkpoint saved through the Lightning plugin as one Lightning .ckpt file."""
    from dcp_plugin.lightning.inference import to_lightning_file

    weights_only = False if args.allow_pickle else None
    options = parse_options(args.storage_options, "--storage-options")
    open_checkpoint(args.checkpoint, args)  # a run directory, a file or a missing path: say which, plainly
    to_lightning_file(args.checkpoint, args.output, weights_only=weights_only, storage_options=options)
    if args.json:
        emit_json({"checkpoint": args.checkpoint, "output": args.output, "format": "lightning"})
    else:
        emit(f"wrote {args.output} (a Lightning checkpoint file: load_from_checkpoint and torch.load read it)")
    return 0


def add_export_commands(sub: Any, parents: list[argparse.ArgumentParser]) -> None:
    """Register ``export`` and ``convert-lightning``."""
    export = sub.add_parser(
        "export",
        parents=parents,
        help="write one entry as a safetensors, torch.save or Lightning file",
        description=cmd_export.__doc__,
    )
    export.add_argument("checkpoint", help="the checkpoint: a path or URL such as runs/a/step_000000500")
    export.add_argument("output", help="the file to write: a path or fsspec URL (s3://bucket/model.safetensors)")
    export.add_argument(
        "--format",
        choices=export_formats(),
        help="default: from OUTPUT's suffix (.safetensors, .ckpt = lightning), else torch",
    )
    export.add_argument("--entry", help="which entry (default: model, or state_dict for Lightning checkpoints)")
    export.add_argument("--dtype", choices=DTYPES, help="convert floating tensors to this type")
    export.add_argument(
        "--output-options", metavar="JSON", help="fsspec options for OUTPUT, as JSON (over --storage-options)"
    )
    export.set_defaults(func=cmd_export)
    convert = sub.add_parser(
        "convert-lightning",
        parents=parents,
        help="write a Lightning plugin checkpoint as one .ckpt file (for load_from_checkpoint)",
        description=cmd_convert_lightning.__doc__,
    )
    convert.add_argument("checkpoint", help="a checkpoint written by the Lightning plugin")
    convert.add_argument("output", help="the .ckpt file to write (a path or fsspec URL)")
    convert.add_argument("--allow-pickle", action="store_true", help="also convert pickled values (trusted files)")
    convert.set_defaults(func=cmd_convert_lightning)
