"""Export the model weights of a checkpoint as the single file ``accelerate merge-weights`` produces.

``accelerate merge-weights`` reads a DCP directory holding only a model; a dcp-plugin checkpoint holds
the whole training state (optimizer, RNG, ...), so it is exported with this instead::

    python -m dcp_plugin.accelerate.export runs/a/checkpoints/checkpoint_3 merged/
    # -> merged/model.safetensors (full, unsharded tensors, plain parameter names)

Works from any world size (shards are gathered) and from URLs (``s3://...``).
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

from dcp_plugin.accelerate.state import indexed
from dcp_plugin.checkpointer import Checkpointer
from dcp_plugin.config import CheckpointConfig
from dcp_plugin.storage import CheckpointInfo, open_url

SAFE_WEIGHTS_NAME = "model.safetensors"
WEIGHTS_NAME = "pytorch_model.bin"


def _model_entry(info: CheckpointInfo, model_index: int) -> str:
    """The entry of the ``model_index``-th prepared model; a KeyError naming the models saved otherwise."""
    entry = indexed("model", model_index)
    entries = info.manifest.get("entries", {})
    if entry not in entries:
        models = sorted(n for n in entries if n == "model" or n.startswith("model_"))
        raise KeyError(
            f"{info.url} has no entry {entry!r} (model_index={model_index}); it holds {models or 'no models'}."
        )
    return entry


def load_weights(checkpoint: str, *, model_index: int = 0, storage_options: dict[str, Any] | None = None) -> dict:
    """The full (unsharded) state dict of one model of a checkpoint, read by this process alone."""
    config = CheckpointConfig(async_mode="sync", storage_options=dict(storage_options or {}))
    checkpointer = Checkpointer(config, distributed=False)
    try:
        storage, name = checkpointer.locate(str(checkpoint))
        entry = _model_entry(storage.info(name), model_index)
        target: dict[str, Any] = {entry: None}
        checkpointer.load((storage, name), target)
    finally:
        checkpointer.close()
    return target[entry]


def export_weights(
    checkpoint: str,
    output_dir: str,
    *,
    model_index: int = 0,
    safe_serialization: bool = True,
    storage_options: dict[str, Any] | None = None,
) -> str:
    """Write ``output_dir/model.safetensors`` (or ``pytorch_model.bin``) with the model's full weights.

    The same file ``accelerate merge-weights`` writes; load it with ``model.load_state_dict`` or
    ``safetensors.torch.load_file``. safetensors is streamed tensor by tensor (see :mod:`dcp_plugin.export.exporter`).
    Returns the written path. Run it on one process.
    """
    from dcp_plugin.export.exporter import export_checkpoint

    storage, name = open_url(checkpoint, storage_options)
    entry = _model_entry(storage.info(name), model_index)
    path = os.path.join(output_dir, SAFE_WEIGHTS_NAME if safe_serialization else WEIGHTS_NAME)
    fmt = "safetensors" if safe_serialization else "torch"
    export_checkpoint(checkpoint, path, format=fmt, entry=entry, storage_options=storage_options)
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m dcp_plugin.accelerate.export",
        description="Write the full model weights of a dcp-plugin checkpoint as model.safetensors.",
    )
    parser.add_argument("checkpoint", help="checkpoint directory or URL (e.g. runs/a/checkpoints/checkpoint_3)")
    parser.add_argument("output_dir", help="local directory for model.safetensors")
    parser.add_argument("--model-index", type=int, default=0, help="which prepared model (default 0)")
    parser.add_argument("--unsafe-serialization", action="store_true", help="write pytorch_model.bin instead")
    parser.add_argument("--storage-options", default="{}", help="fsspec options as JSON (e.g. an S3 endpoint)")
    args = parser.parse_args(argv)
    path = export_weights(
        args.checkpoint,
        args.output_dir,
        model_index=args.model_index,
        safe_serialization=not args.unsafe_serialization,
        storage_options=json.loads(args.storage_options),
    )
    print(path)


if __name__ == "__main__":
    main()
