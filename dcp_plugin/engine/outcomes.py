"""What background saves leave for the engine's next call: the first error not yet raised, and the stats of
the saves finished since the owner last asked."""

from __future__ import annotations

import threading
from collections import deque

from dcp_plugin.engine.failures import project_error
from dcp_plugin.engine.stats import SaveStats
from dcp_plugin.errors import CheckpointSaveError


class SaveOutcomes:
    """The outcomes of one engine's saves, recorded from DCP's threads and handed out on the caller's.

    Args:
        limit: at most this many finished saves wait for :meth:`drain` (oldest dropped).
    """

    def __init__(self, limit: int) -> None:
        self._error: BaseException | None = None
        self._lock = threading.Lock()
        self._completed: deque[SaveStats] = deque(maxlen=limit)

    def finished(self, stats: SaveStats) -> None:
        """A save ended (committed or failed)."""
        self._completed.append(stats)

    def failed(self, err: BaseException, stats: SaveStats) -> None:
        """A background save failed with ``err``: keep it for :meth:`raise_error` unless an earlier one waits."""
        with self._lock:
            if self._error is None:
                message = f"Saving checkpoint {stats.url} failed: {stats.error}"
                self._error = project_error(err, CheckpointSaveError, message)
                self._error.__cause__ = err

    def raise_error(self) -> None:
        """Raise (once) the error of a background save that failed."""
        with self._lock:
            error, self._error = self._error, None
        if error is not None:
            raise error

    def drain(self) -> list[SaveStats]:
        """Stats of saves finished since the last call."""
        out = []
        while self._completed:
            out.append(self._completed.popleft())
        return out


__all__ = ["SaveOutcomes"]
