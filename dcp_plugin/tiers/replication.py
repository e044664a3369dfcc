"""Replication of committed checkpoints to a second tier (e.g. local disk -> S3), in the background.

One replication is in flight at a time, in a thread of its own: training never waits for it. Each copy goes
through :func:`~dcp_plugin.storage.copy_checkpoint`, so the remote copy is committed by the remote's own protocol
only once complete, and its checksums are checked against the source while it streams and read back before the
commit. A failure (the endpoint is down, a file is damaged) is kept and raised by the next :meth:`Replicator.submit`
or :meth:`Replicator.wait`, like a background save's error; the checkpoint stays due and is tried again by
:meth:`Replicator.catch_up`, which also copies whatever an earlier run committed locally but never replicated.
:meth:`Replicator.busy` names the checkpoints queued or being copied, which the local tier's retention must keep.

On several ranks (``ranks``), every rank runs a replicator and queues the same checkpoints; each rank uploads
its own files and rank 0 commits (see :mod:`dcp_plugin.tiers.rank_copy`). Rank 0 keeps and raises the errors; the
other ranks log theirs (rank 0 raises them too, as the copy did not commit).
"""

from __future__ import annotations

import logging
import os
import threading
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

from dcp_plugin.errors import CheckpointError, CheckpointExistsError
from dcp_plugin.policies.retention import RetentionPolicy, apply_retention
from dcp_plugin.storage import CheckpointInfo, CheckpointStorage, copy_checkpoint
from dcp_plugin.storage.transfer import CopyPlan, begin_copy
from dcp_plugin.tiers.rank_copy import RankCopies

log = logging.getLogger(__name__)

REPLICATION_NICENESS = 10
"""How much lower the replication thread's CPU priority is than training's (``nice``; Linux)."""


class ReplicationError(CheckpointError, RuntimeError):
    """Copying a committed checkpoint to the second tier failed; the message names both URLs and the cause."""


@dataclass(frozen=True)
class Replicated:
    """A checkpoint copied to the second tier."""

    name: str
    source_url: str
    target_url: str
    bytes: int


class Replicator:
    """Copies committed checkpoints of ``local`` to ``remote`` in a background thread, one at a time.

    Args:
        local: the tier checkpoints are saved to.
        remote: the tier they are copied to (its bucket or directory must exist).
        retention: which replicated checkpoints of this run the remote tier keeps (``None``: all), applied after
            each copy. It never deletes the newest one.
        run_id: the run whose remote checkpoints ``retention`` may delete.
        ranks: on several ranks, the exchange that lets each rank upload its own files (every rank then
            runs a replicator and submits the same checkpoints in the same order).
    """

    def __init__(
        self,
        local: CheckpointStorage,
        remote: CheckpointStorage,
        *,
        retention: RetentionPolicy | None = None,
        run_id: str | None = None,
        ranks: RankCopies | None = None,
    ) -> None:
        self.local = local
        self.ranks = ranks
        self.remote = remote
        self.retention = retention
        self.run_id = run_id
        self.done: deque[Replicated] = deque(maxlen=1000)
        """The copies made so far (most recent last)."""
        self._queue: deque[str] = deque()
        self._current: str | None = None
        self._error: BaseException | None = None
        self._failed: set[str] = set()
        self._lock = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False

    # -- what the loop calls ------------------------------------------------------------------------
    def submit(self, name: str) -> None:
        """Replicate committed checkpoint ``name`` (returns at once); raises an earlier replication's error
        (after queueing ``name``)."""
        self.enqueue(name)
        self.raise_error()

    def enqueue(self, name: str) -> None:
        """Queue committed checkpoint ``name`` for replication (returns at once; raises nothing earlier)."""
        with self._lock:
            if self._closed:
                raise RuntimeError("This replicator was closed.")
            # on several ranks every submit is one exchange, so the ranks' queues stay the same length
            if self.ranks is not None or (name != self._current and name not in self._queue):
                self._queue.append(name)
            self._failed.discard(name)
            self._ensure_thread()
            self._lock.notify_all()

    def catch_up(self) -> list[str]:
        """Queue every committed local checkpoint that the remote tier lacks (or lacks in this version)."""
        missing = self.missing()
        for name in missing:
            self.submit(name)
        return missing

    def missing(self) -> list[str]:
        """Committed local checkpoints that the remote tier lacks (or lacks in this version), oldest first."""
        remote = {info.name: info.manifest.get("save_id") for info in self.remote.list()}
        return [i.name for i in self.local.list() if remote.get(i.name, object()) != i.manifest.get("save_id")]

    def busy(self) -> set[str]:
        """Names queued or being copied: local retention must keep them."""
        with self._lock:
            return set(self._queue) | ({self._current} if self._current else set()) | set(self._failed)

    def wait(self) -> None:
        """Block until every queued copy is done; raise the first error."""
        with self._lock:
            while self._queue or self._current is not None:
                self._lock.wait()
        self.raise_error()

    def raise_error(self) -> None:
        with self._lock:
            error, self._error = self._error, None
        if error is not None:
            raise error

    def close(self) -> None:
        """Wait for the queued copies, stop the thread, raise the first error."""
        try:
            self.wait()
        finally:
            with self._lock:
                self._closed = True
                self._lock.notify_all()
            if self._thread is not None:
                self._thread.join()
                self._thread = None

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state.update(_queue=deque(), _current=None, _error=None, _failed=set(), _lock=None, _thread=None, ranks=None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Condition()

    # -- the background thread ----------------------------------------------------------------------
    def _ensure_thread(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._run, name="dcp-plugin-replicator", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        lower_priority()
        while True:
            with self._lock:
                while not self._queue and not self._closed:
                    self._lock.wait()
                if not self._queue:
                    return
                self._current = self._queue.popleft()
            name = self._current
            try:
                self._replicate(name)
            except BaseException as err:  # noqa: BLE001 - handed to the loop by raise_error()
                log.warning("Replicating %s failed: %s", self.local.url(name), err)
                if self.ranks is not None and not self.ranks.is_coordinator:
                    continue  # rank 0 raises it
                with self._lock:
                    self._failed.add(name)
                    if self._error is None:
                        self._error = ReplicationError(
                            f"Replicating {self.local.url(name)} to {self.remote.url(name)} failed: {err}"
                        )
                        self._error.__cause__ = err
            finally:
                with self._lock:
                    self._current = None
                    self._lock.notify_all()

    def _replicate(self, name: str) -> None:
        if self.ranks is not None and not self.ranks.is_coordinator:
            self.ranks.follow()
            return
        try:
            if self.ranks is not None:
                if self.ranks.lead(lambda: self._begin(name)) is None:
                    return  # already there
            else:
                overwrite = self._replaces(name)
                if overwrite is None:
                    return  # already there
                copy_checkpoint(self.local, name, self.remote, overwrite=overwrite)
        except CheckpointExistsError:  # another process replicated it meanwhile
            return
        copied = self.remote.info(name)
        size = sum(int(r.get("size", 0)) for r in (copied.manifest.get("files") or {}).values())
        self.done.append(Replicated(name, self.local.url(name), self.remote.url(name), size))
        log.info("Replicated %s to %s (%.1f MiB).", self.local.url(name), self.remote.url(name), size / 2**20)
        if self.retention is not None:
            apply_retention(self.retention, self.remote, run_id=self.run_id, protected=self._pending_names())

    def _replaces(self, name: str) -> bool | None:
        """``None`` when the remote tier has this version of ``name`` already, else whether a copy replaces
        another version there."""
        info: CheckpointInfo = self.local.info(name)
        try:
            existing = self.remote.info(name)
        except CheckpointError:
            return False
        return None if existing.manifest.get("save_id") == info.manifest.get("save_id") else True

    def _begin(self, name: str) -> CopyPlan | None:
        if not self.local.is_committed(name):
            return None  # its save failed: nothing to copy (the save's error is raised)
        overwrite = self._replaces(name)
        return None if overwrite is None else begin_copy(self.local, name, self.remote, overwrite=overwrite)

    def _pending_names(self) -> Iterable[str]:
        with self._lock:
            return list(self._queue)


def lower_priority() -> None:
    """Give this thread a lower CPU priority (Linux: per thread), so copies yield the cores to training and
    to the save's own writers."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), REPLICATION_NICENESS)
    except (AttributeError, OSError):  # not on this platform, or not allowed: run at normal priority
        pass


__all__ = ["Replicated", "ReplicationError", "Replicator"]
