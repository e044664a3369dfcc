"""Every error a user can trigger with bad input, a bad checkpoint or unreachable storage.

All derive from :class:`CheckpointError` and, where one fits, from the standard exception a caller would
already catch (``FileNotFoundError``, ``FileExistsError``, ``ValueError``, ``OSError``). Messages name the
checkpoint or file and say what to do.
"""

from __future__ import annotations

import importlib
import pickle
import sys
from types import ModuleType


class CheckpointError(Exception):
    """Base class of dcp-plugin's errors."""


class ConfigError(CheckpointError, ValueError):
    """An option has a value that cannot work; the message says which and what to use instead."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """The requested checkpoint does not exist or was never committed."""


class CheckpointExistsError(CheckpointError, FileExistsError):
    """A committed checkpoint already has this name and replacing it was not asked for."""


class NotACheckpointError(CheckpointError, ValueError):
    """A path exists but is not a dcp-plugin checkpoint (e.g. a file written by torch.save)."""


class CheckpointSaveError(CheckpointError, RuntimeError):
    """A save failed (in the foreground or in the background); the message names the checkpoint and cause."""


class CheckpointLoadError(CheckpointError, RuntimeError):
    """A load failed; the message names the checkpoint and the cause."""


class CheckpointIncompleteError(CheckpointLoadError):
    """On node-local disks (``local_scope="node"``): a checkpoint's part is on no node's disk any more, no node keeps
    a copy of it and no remote tier has the checkpoint. The message names what is missing and which node wrote it.
    Raised instead of starting afresh, because earlier training would be lost silently."""


class CheckpointCorruptError(CheckpointLoadError, ValueError):
    """A checkpoint's files do not match what was committed (checksum, size, malformed manifest or metadata).

    The message names the file and the checkpoint, and the next older checkpoint that verifies when known."""


class UnsafeCheckpointError(CheckpointError, pickle.UnpicklingError):
    """A checkpoint refers to something that could run code or reach outside the checkpoint."""


class StorageAccessError(CheckpointError, OSError):
    """The storage cannot be reached or used (missing bucket, bad credentials, unreachable endpoint)."""


class MissingExtraError(CheckpointError, ModuleNotFoundError):
    """An adapter's framework is not installed; the message names the ``pip install dcp-plugin[extra]`` to run."""


def import_extra(module: str, *, extra: str, feature: str) -> ModuleType:
    """Import ``module`` (a framework an adapter needs); if it is not installed, raise :class:`MissingExtraError`
    naming ``feature`` and the extra that installs the framework. A module missing *inside* the framework is not
    ours to explain and is raised as it is."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as err:
        missing = err.name or ""
        if not missing or not (module == missing or module.startswith(missing + ".")):
            raise
        top = module.split(".")[0]
        raise MissingExtraError(
            f"{feature} needs {top}, which is not installed in this environment ({sys.executable}). "
            f"Install it with the {extra!r} extra: python -m pip install 'dcp-plugin[{extra}]' "
            f"(from a clone: python -m pip install '/path/to/dcp-plugin[{extra}]'), or install {top} itself.",
            name=missing,
        ) from None


__all__ = [
    "CheckpointCorruptError",
    "CheckpointError",
    "CheckpointExistsError",
    "CheckpointIncompleteError",
    "CheckpointLoadError",
    "CheckpointNotFoundError",
    "CheckpointSaveError",
    "ConfigError",
    "MissingExtraError",
    "NotACheckpointError",
    "StorageAccessError",
    "UnsafeCheckpointError",
    "import_extra",
]
