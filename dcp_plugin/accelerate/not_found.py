"""What ``load_state()`` says when it finds nothing to load: what is wrong and what to do, in one message.

The usual case is a fresh run whose script calls ``load_state()`` unconditionally: nothing has been saved yet.
Only where the directory really holds checkpoints written by Accelerate's own ``save_state`` does the message
point there (dcp-plugin does not read that format).
"""

from __future__ import annotations

from dcp_plugin.errors import CheckpointNotFoundError
from dcp_plugin.storage import CheckpointStorage

ACCELERATE_FILES = ("random_states_0.pkl", "model.safetensors", "pytorch_model.bin", "optimizer.bin")
"""Files Accelerate's own ``save_state`` writes into every checkpoint directory (one of them at least)."""

GUARD = "if dcp_plugin.accelerate.checkpointer_of(accelerator).latest() is not None: accelerator.load_state()"

_OWN_FORMAT = (
    "{where} holds Accelerate's own checkpoint files (written by its save_state without dcp-plugin), which "
    "dcp-plugin does not read: load it with DCP_PLUGIN_ENABLE=0 or after dcp_plugin.accelerate.disable(accelerator), "
    "then save again with dcp-plugin enabled."
)


def explain(err: CheckpointNotFoundError, storage: CheckpointStorage, name: str | None) -> CheckpointNotFoundError:
    """The error for a ``load_state()`` that found nothing: of the latest automatically named checkpoint in
    ``storage`` (``name`` is ``None``), or of the checkpoint ``name`` there."""
    if name is not None:
        if _accelerate_files(storage, name):
            return CheckpointNotFoundError(_OWN_FORMAT.format(where=storage.url(name)))
        return CheckpointNotFoundError(
            f"{err} Pass a checkpoint written by save_state() with dcp-plugin enabled (save_state returns its URL)."
        )
    own = [e for e in _entries(storage) if e.startswith("checkpoint_") and _accelerate_files(storage, e)]
    if own:
        found = _OWN_FORMAT.format(where=storage.url(own[-1]))
        return CheckpointNotFoundError(f"No dcp-plugin checkpoint in {storage.root_url}: {found}")
    state = "does not exist yet" if not _exists(storage) else "holds no committed checkpoint"
    return CheckpointNotFoundError(
        f"load_state() found no checkpoint to resume from: {storage.root_url} {state} (no save_state() has committed "
        f"one there). On a fresh run, load only when there is one (on every process): `{GUARD}`."
    )


def _exists(storage: CheckpointStorage) -> bool:
    try:
        return bool(storage.fs.exists(storage.root))
    except OSError:
        return True  # cannot tell: say only that nothing is committed


def _entries(storage: CheckpointStorage) -> list[str]:
    try:
        names = storage.fs.ls(storage.root, detail=False) if _exists(storage) else []
    except OSError:
        return []
    return sorted(str(path).rstrip("/").rsplit("/", 1)[-1] for path in names)


def _accelerate_files(storage: CheckpointStorage, name: str) -> bool:
    root = f"{storage.root.rstrip('/')}/{name}"
    try:
        return any(storage.fs.exists(f"{root}/{file}") for file in ACCELERATE_FILES)
    except OSError:
        return False


__all__ = ["GUARD", "explain"]
