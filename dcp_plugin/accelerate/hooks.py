"""Accelerate's ``register_save_state_pre_hook`` / ``register_load_state_pre_hook``, honoured with DCP.

Accelerate calls ``hook(models, weights, output_dir)`` before it writes a checkpoint and
``hook(models, input_dir)`` before it loads one. Hooks typically write a model in their own format
(``model.save_pretrained(output_dir)``), then remove its ``weights`` so Accelerate does not write it again;
at load they read it back and remove the model from ``models``.

A dcp-plugin checkpoint becomes visible only when it is committed (possibly on an object store), so
``output_dir`` cannot be the checkpoint's directory. Instead:

* save hooks get a fresh local temporary directory; whatever they write there (on any rank) is stored in
  the checkpoint as the entry ``save_state_hook_files`` (bytes, no pickle); a model whose ``weights`` a
  hook removed is not saved by dcp-plugin (its optimizer still is, as in Accelerate);
* load hooks get a local temporary directory holding exactly those files; a model a hook removed from
  ``models`` is not loaded by dcp-plugin. The directory is removed once ``load_state`` returns.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from typing import Any

import torch

from dcp_plugin.errors import CheckpointNotFoundError

HOOK_FILES_ENTRY = "save_state_hook_files"


def run_save_hooks(accelerator: Any, all_gather: Callable[[Any], list[Any]]) -> tuple[set[int], list[dict] | None]:
    """Run the save hooks; returns the indices of the models to save and the files they wrote (every rank's,
    merged; a lower rank wins when two wrote the same path), or ``None`` when no hook is registered."""
    hooks = list(accelerator._save_model_state_pre_hook.values())
    models = list(accelerator._models)
    if not hooks:
        return set(range(len(models))), None
    weights = [accelerator.get_state_dict(model, unwrap=False) for model in models]
    ids = [id(w) for w in weights]
    directory = tempfile.mkdtemp(prefix="dcp-plugin-save-hook-")
    try:
        for hook in hooks:
            hook(accelerator._models, weights, directory)
        local = _read_tree(directory)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    kept = {id(w) for w in weights}
    merged: dict[str, bytes] = {}
    for files in all_gather(local):
        for path, data in files.items():
            merged.setdefault(path, data)
    # non-empty files as uint8 tensors (written by DCP), empty ones as bytes (in the skeleton)
    entry = [
        {"path": path, "data": torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else b""}
        for path, data in sorted(merged.items())
    ]
    return {i for i, ident in enumerate(ids) if ident in kept}, entry


def run_load_hooks(accelerator: Any, files: list[dict] | None) -> tuple[set[int], str | None]:
    """Write the stored hook files into a temporary directory and run the load hooks on it; returns the
    indices of the models left for dcp-plugin to load and the directory (remove it with :func:`cleanup`)."""
    hooks = list(accelerator._load_model_state_pre_hook.values())
    models = list(accelerator._models)
    if not hooks:
        return set(range(len(models))), None
    directory = tempfile.mkdtemp(prefix="dcp-plugin-load-hook-")
    for item in files or []:
        target = _safe_join(directory, item["path"])
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with open(target, "wb") as handle:
            data = item["data"]
            handle.write(data if isinstance(data, bytes) else data.numpy().tobytes())
    remaining = list(models)
    for hook in hooks:
        hook(remaining, directory)
    kept = {id(m) for m in remaining}
    return {i for i, model in enumerate(models) if id(model) in kept}, directory


def prepare_load(checkpointer: Any, input_dir: Any) -> tuple[Any, set[int], str | None]:
    """For ``AccelerateCheckpointer.load_state`` with load hooks: fix which checkpoint is loaded (the same on
    every rank), hand the files its save hooks wrote to the load hooks; returns the checkpoint's ``(storage,
    name)``, the models left for dcp-plugin to load and the hooks' temporary directory."""
    groups = checkpointer.checkpointer.groups
    if input_dir is None:
        manager = checkpointer.automatic_manager()
        info = checkpointer.latest()
        if info is None:
            raise CheckpointNotFoundError(f"No committed checkpoint in {manager.storage.root_url}.")
        # with a remote tier: the tier that holds it (the local one when both do)
        storage = manager.storage if manager.tiers is None else manager.tiers.choose(None, info.name)[0]
    else:
        storage, name = checkpointer.checkpointer.locate(str(input_dir))
        found: Any = None
        if groups.is_coordinator:
            try:
                found = storage.info(name)  # on node-local disks the first node's part: the manifest is the same
            except CheckpointNotFoundError as err:
                found = str(err)
        found = groups.broadcast(found)
        if isinstance(found, str):
            raise CheckpointNotFoundError(found)
        info = found
    ref = (storage, info.name)
    files = None
    if HOOK_FILES_ENTRY in info.manifest.get("entries", {}):
        files = checkpointer.read(ref, entries=[HOOK_FILES_ENTRY])[HOOK_FILES_ENTRY]
    models, directory = run_load_hooks(checkpointer.accelerator, files)
    return ref, models, directory


def cleanup(directory: str | None) -> None:
    if directory is not None:
        shutil.rmtree(directory, ignore_errors=True)


def _read_tree(directory: str) -> dict[str, bytes]:
    files: dict[str, bytes] = {}
    for root, _dirs, names in os.walk(directory):
        for name in names:
            full = os.path.join(root, name)
            if os.path.isfile(full) and not os.path.islink(full):
                with open(full, "rb") as handle:
                    files[os.path.relpath(full, directory).replace(os.sep, "/")] = handle.read()
    return files


def _safe_join(directory: str, relative: Any) -> str:
    """``directory/relative`` for a relative path from a checkpoint; never outside ``directory``."""
    parts = relative.split("/") if isinstance(relative, str) else []
    if not parts or any(p in ("", ".", "..") or "\\" in p or "\x00" in p for p in parts):
        raise ValueError(f"Refusing the hook file name {relative!r} stored in the checkpoint.")
    return os.path.join(directory, *parts)
