"""Checkpoint timings for Accelerate's trackers: each committed save, through ``accelerator.log``.

When the ``Accelerator`` has trackers (``log_with=...`` and ``init_trackers``), every ``save_state()`` is logged
once its write committed (``checkpoint/blocking_s``, ``checkpoint/durable_s``, ``checkpoint/bytes``, ...), from the
training thread, as soon as a call sees the commit: the ``save_state`` itself in ``sync`` mode, else the next
``save_state``, ``load_state``, ``wait_for_everyone``, ``end_training`` or ``accelerator.log`` call. Accelerate has
no training step of its own, so the values are logged at the step of the script's latest
``accelerator.log(..., step=...)`` call before that (none given: without a step): they sit next to the training
curves, and a step never goes back, as trackers such as W&B require. Off with ``log_metrics=False`` or
``DCP_PLUGIN_LOG_METRICS=0``.
"""

from __future__ import annotations

from typing import Any

from dcp_plugin.engine.stats import SaveStats

PREFIX = "checkpoint/"


class SaveMetrics:
    """The saves of one ``Accelerator`` waiting to be logged, and the step its script logs at."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.step: int | None = None
        """The step of the script's latest ``accelerator.log`` call that gave one."""
        self._waiting: list[SaveStats] = []

    def note_step(self, step: Any) -> None:
        """The script logged at ``step`` (``None``: no step given, nothing changes)."""
        if step is not None:
            self.step = int(step)

    def started(self, stats: SaveStats, accelerator: Any) -> None:
        """A save started: log it once committed (now, if it already is), if there is anyone to log to."""
        if self.enabled and accelerator.trackers:  # trackers live on the main process only
            self._waiting.append(stats)
            self.log_committed(accelerator)

    def log_committed(self, accelerator: Any) -> None:
        """Log the saves that committed since the last call (a failed one is raised elsewhere, not logged)."""
        waiting, self._waiting = self._waiting, []
        for stats in waiting:
            if stats.error is not None:
                continue
            if stats.durable_s is None:
                self._waiting.append(stats)  # still being written
                continue
            values = {**stats.metrics(PREFIX), f"{PREFIX}iteration": stats.step if stats.step is not None else -1}
            type(accelerator).log(accelerator, values, step=self.step)


__all__ = ["PREFIX", "SaveMetrics"]
