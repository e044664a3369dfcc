"""The engine's one save in flight: its futures and stats, the wait for its snapshot, and what runs when its
write ends (stats filled in, the failure recorded and cleaned up, the per-URL registry told)."""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future
from concurrent.futures import wait as wait_for_first
from dataclasses import dataclass
from typing import Any

from dcp_plugin.engine import inflight
from dcp_plugin.engine.failures import call_done, cleanup_after_failure, describe
from dcp_plugin.engine.outcomes import SaveOutcomes
from dcp_plugin.engine.stats import SaveStats

log = logging.getLogger(__name__)

JOIN_TIMEOUT_S = 10.0
"""How long :meth:`PendingSave.join_writer` waits for DCP's writer thread to leave (torch 2.13 ends it at once)."""
_join_writers = True


@dataclass
class PendingSave:
    """A save DCP is writing in the background (``staging``: its snapshot, with async staging)."""

    stats: SaveStats
    started: float
    upload: Future
    staging: Future | None
    on_failure: Any
    writing: str
    on_done: Any = None
    writer: Any = None
    error_hint: Callable[[BaseException], str] | None = None
    """Adds to a failed write's message what the user can do about it (``""`` when it knows nothing)."""
    finished: threading.Event = dataclasses.field(default_factory=threading.Event)
    writer_thread: threading.Thread | None = None
    """The thread DCP wrote in (it ends right after the write; :meth:`join_writer` waits for that)."""

    def upload_done(self, future: Future, outcomes: SaveOutcomes) -> None:
        """DCP's write ended: record how (called from DCP's thread, once)."""
        stats = self.stats
        metadata = None
        try:
            stats.durable_s = time.perf_counter() - self.started
            try:
                metadata = future.result()
                stats.bytes_written = bytes_written(metadata, self.writer)
                stats.direct_io = getattr(metadata, "dcp_plugin_direct_io", None)
            except BaseException as err:  # noqa: BLE001 - CheckpointException is a BaseException
                metadata = None
                stats.error = describe(err) + (self.error_hint(err) if self.error_hint else "")
                outcomes.failed(err, stats)
                cleanup_after_failure(self.on_failure, stats.url)
            outcomes.finished(stats)
        finally:
            inflight.finish(self.writing)
            call_done(self.on_done, metadata)
            self.on_done = None  # what it holds (the save's tensors, by reference) is not kept past the save
            self.error_hint = None  # it may hold the saved state
            self.writer_thread = threading.current_thread()
            self.finished.set()  # whatever happened above, wait() must not hang

    def join_writer(self) -> None:
        """After the write ended: wait until DCP's writer thread is gone too. DCP shuts its one-save executor down
        as the write ends, so the thread only has to leave; once this returns the save left no thread behind."""
        global _join_writers
        thread = self.writer_thread
        if not _join_writers or thread is None or thread in (threading.current_thread(), threading.main_thread()):
            return
        thread.join(timeout=JOIN_TIMEOUT_S)  # a bound only against a torch release that keeps its thread
        if thread.is_alive():
            _join_writers = False
            log.warning(
                "DCP's writer thread %s still runs %.0f s after its write ended (a torch release that keeps it?); "
                "saves no longer wait for their writer thread to end.",
                thread.name,
                JOIN_TIMEOUT_S,
            )

    def wait_for_staging(self) -> None:
        """Block until the snapshot has been copied (or the write ended first)."""
        if self.staging is not None and not self.staging.done():
            began = time.perf_counter()
            # a failed write may end before staging does; its error is reported through the upload future
            wait_for_first([self.staging, self.upload], return_when=FIRST_COMPLETED)
            self.stats.staging_wait_s += time.perf_counter() - began


def then(upload: Future, step: Callable[[Any], None]) -> Future:
    """A future that resolves once ``upload`` did and ``step(result)`` ran after it, in the thread that resolved
    ``upload`` (a write's last step that every rank runs, such as the commit across nodes); either's failure fails
    it."""
    out: Future = Future()

    def done(future: Future) -> None:
        try:
            result = future.result()
            step(result)
        except BaseException as err:  # noqa: BLE001 - CheckpointException is a BaseException; handed on
            out.set_exception(err)
            return
        out.set_result(result)

    upload.add_done_callback(done)
    return out


def bytes_written(metadata: Any, writer: Any = None) -> int | None:
    """Bytes of tensor data the save wrote (a writer that refers to earlier data says how much it added)."""
    added = getattr(metadata, "dcp_plugin_bytes_added", None)  # a save written without DCP says it itself
    if added is not None:
        return int(added)
    storage = getattr(metadata, "storage_data", None)
    if not storage:
        return None
    added = getattr(writer, "bytes_added", None)
    if callable(added):
        return int(added(metadata))
    return sum(int(getattr(info, "length", 0)) for info in storage.values())


__all__ = ["PendingSave", "bytes_written", "then"]
