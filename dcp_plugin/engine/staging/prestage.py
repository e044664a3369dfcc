"""Staging once ahead of the first save, in a background thread, so that the first save only copies into
buffers that exist (DCP's stager finds them again by the live tensors' storage) instead of allocating and
page-faulting them while training waits. Owned by :class:`~dcp_plugin.engine.checkpoint_engine.CheckpointEngine`."""

from __future__ import annotations

import logging
import threading
from concurrent.futures import Future
from typing import Any

log = logging.getLogger(__name__)


class Prestage:
    """At most one background staging per engine; :meth:`finish` waits for it (and ends the chance to start)."""

    def __init__(self) -> None:
        self.over = False
        """Started once, or a save already staged: nothing left to prepare."""
        self._thread: threading.Thread | None = None

    def start(self, stager: Any, flat_state: dict[str, Any]) -> None:
        """Stage ``flat_state`` with ``stager`` in a background thread (once)."""
        if self.over:
            return
        self.over = True

        def stage() -> None:
            try:
                staged = stager.stage(flat_state)
                if isinstance(staged, Future):
                    staged.result()
            except Exception as err:  # noqa: BLE001 - only a head start: the first save stages again
                log.warning("Preparing the staging buffers failed (%s); the first save allocates them.", err)

        self._thread = threading.Thread(target=stage, name="dcp-plugin-prepare-staging", daemon=True)
        self._thread.start()

    def finish(self) -> None:
        """Wait for a staging in progress; from now on nothing is prepared any more."""
        self.over = True
        if self._thread is not None:
            self._thread.join()
            self._thread = None


__all__ = ["Prestage"]
