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
    foreign = storage.foreign_entries(ACCELERATE_FILES)
    if name is not None:
        if name in foreign:
            return CheckpointNotFoundError(_OWN_FORMAT.format(where=storage.url(name)))
        return CheckpointNotFoundError(
            f"{err} Pass a checkpoint written by save_state() with dcp-plugin enabled (save_state returns its URL)."
        )
    own = [entry for entry in foreign if entry.startswith("checkpoint_")]
    if own:
        found = _OWN_FORMAT.format(where=storage.url(own[-1]))
        return CheckpointNotFoundError(f"No dcp-plugin checkpoint in {storage.root_url}: {found}")
    state = "does not exist yet" if storage.root_exists() is False else "holds no committed checkpoint"
    return CheckpointNotFoundError(
        f"load_state() found no checkpoint to resume from: {storage.root_url} {state} (no save_state() has committed "
        f"one there). On a fresh run, load only when there is one (on every process): `{GUARD}`."
    )


__all__ = ["GUARD", "explain"]
