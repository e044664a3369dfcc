"""Keep saves in flight for a while, deterministically: every local commit waits before it happens."""

from __future__ import annotations

import threading
import time

from dcp_plugin.storage.commit import RenameCommit


def hold_commits(monkeypatch, seconds: float = 0.5) -> threading.Event:
    """From now until the test ends, each local commit sleeps ``seconds`` first; the event is set when one is
    reached (the write is then complete but not yet visible)."""
    original = RenameCommit.commit
    reached = threading.Event()

    def commit(self, pending, manifest):
        reached.set()
        time.sleep(seconds)
        return original(self, pending, manifest)

    monkeypatch.setattr(RenameCommit, "commit", commit)
    return reached
