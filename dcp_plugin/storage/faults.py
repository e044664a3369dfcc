"""Deterministic crash points for testing the commit protocol.

Every step of save, replace and delete calls :func:`reached` with a name from :data:`POINTS`. When the
environment variable ``DCP_PLUGIN_CRASH_AT`` names that point, the process is killed with SIGKILL right there,
as a power cut or ``kill -9`` would; with ``DCP_PLUGIN_CRASH_GROUP=<pgid>`` the whole process group goes (so
a writer daemon dies with its trainer). Unset, it costs one dictionary lookup.
"""

from __future__ import annotations

import os
import signal

CRASH_ENV = "DCP_PLUGIN_CRASH_AT"
CRASH_GROUP_ENV = "DCP_PLUGIN_CRASH_GROUP"

POINTS = (
    "save.begun",  # the work location exists, nothing written yet
    "save.written",  # every rank's data and .metadata are written, nothing committed
    "save.sealed",  # local: the manifest is in the staging copy, not yet renamed into place
    "replace.old_moved",  # local without atomic exchange: the old copy moved aside, the new not yet in place
    "save.committed",  # the new checkpoint is visible; a superseded copy is not yet removed
    "delete.hidden",  # a deleted checkpoint is no longer visible; its data is not yet removed
    "blobs.collecting",  # one unreferenced shared blob removed, the others not yet
    "copy.written",  # a copy to another storage is written and read back, not yet committed there
    "nodes.prepared",  # several nodes: this node's part is sealed in its staging copy, the vote not yet exchanged
    "nodes.decided",  # several nodes: the first node's part is committed (the commit point), the others not told
    "nodes.committed",  # several nodes: this node's part is committed, the final exchange not yet done
    "replica.written",  # a copy of another node's part is received and checked here, not yet committed
    "replica.committed",  # a copy of another node's part is committed here, the outcome not yet exchanged
)


def reached(point: str) -> None:
    """Crash here if ``DCP_PLUGIN_CRASH_AT`` says so (tests only)."""
    if os.environ.get(CRASH_ENV) != point:
        return
    group = os.environ.get(CRASH_GROUP_ENV)
    try:
        if group:
            os.killpg(int(group), signal.SIGKILL)
    finally:
        os.kill(os.getpid(), signal.SIGKILL)


__all__ = ["CRASH_ENV", "CRASH_GROUP_ENV", "POINTS", "reached"]
