"""Peer replicas: each node's part of a committed checkpoint, copied to other nodes in the background.

With ``local_scope="node"`` a node's part lives on that node's disk only; losing the node would lose the
checkpoint. Once a checkpoint is committed on every node, every node's leader sends its part's data files to the
next ``copies`` nodes in a ring by node rank (never to itself), over the nodes' exchange group (gloo: no shared
filesystem). The receiver checks each file against the checksum committed with the checkpoint while it arrives,
adds ``.metadata`` and the part's manifest from its own part, and commits the copy in
``.dcp-plugin/replicas/node<part>/`` on its own disk (a checkpoint root of its own, committed by rename)::

    RECEIVING  replicas/node<p>/.dcp-plugin/staging/N.<id>/ gets the files  -> a leftover there, never listed
    WRITTEN    every file arrived as committed, fsynced                     -> the same ("replica.written")
    COMMITTED  renamed to replicas/node<p>/N/                               -> a copy of part p ("replica.committed")

Every rank takes part in each round (the same checkpoints in the same order; the leaders move the files) and
learns its outcome, so a failed copy is raised by every rank at its next call, like a failed save. Copies are kept
under the run's retention, applied to each node's copies after each round, and the node's own retention never
deletes a part whose copies are still being made (:meth:`PeerReplicator.busy`). When saves come faster than the
copies, a checkpoint whose round comes up while a newer one waits on every rank is not copied (every rank decides it
from the same gathered queues): the copies keep up with the newest checkpoint, which is what a restore takes.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from typing import Any

from dcp_plugin.engine.nodes import NodeGroups
from dcp_plugin.policies.retention import apply_retention
from dcp_plugin.policies.schedule import Schedule
from dcp_plugin.storage import CheckpointStorage
from dcp_plugin.storage.faults import reached
from dcp_plugin.storage.node_parts import part_files, part_of, with_part
from dcp_plugin.tiers.holdings import JobView, replica_parts, replica_storage
from dcp_plugin.tiers.replication import ReplicationError, lower_priority
from dcp_plugin.tiers.wire import Buffers, Transfer, receive_file, run_transfers

log = logging.getLogger(__name__)


class PeerReplicator:
    """Copies each node's parts to ``copies`` other nodes, one checkpoint at a time, in a background thread.

    Created collectively (every rank, at the same point); every rank then queues the same names in the same order.
    """

    def __init__(self, local: CheckpointStorage, groups: NodeGroups, copies: int, schedule: Schedule) -> None:
        self.local = local
        self.groups = groups
        self.copies = copies
        self.schedule = schedule
        self.copied_bytes = 0
        """Bytes this node received as copies of other nodes' parts so far."""
        self.skipped: deque[str] = deque(maxlen=1000)
        """Checkpoints not copied because a newer one was already waiting on every rank (saves came faster than
        the copies); the next run copies the complete ones that lack a copy."""
        self._queue: deque[tuple[str, bool]] = deque()  # (name, may be skipped for a newer one)
        self._current: str | None = None
        self._error: BaseException | None = None
        self._lock = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False

    # -- what the loop calls ---------------------------------------------------------------------
    def enqueue(self, name: str, *, newest_first: bool = True) -> None:
        """Copy the parts of ``name`` once committed (returns at once; every rank queues the same names).
        ``newest_first``: skip it if a newer checkpoint is already waiting when its turn comes (saves); ``False``
        for copies an earlier run left unmade, which are all made."""
        with self._lock:
            if self._closed:
                raise RuntimeError("This peer replicator was closed.")
            self._queue.append((name, newest_first))
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="dcp-plugin-peer-replicas", daemon=True)
                self._thread.start()
            self._lock.notify_all()

    def busy(self) -> set[str]:
        """Names queued or being copied: the node's retention keeps their parts."""
        with self._lock:
            return {name for name, _ in self._queue} | ({self._current} if self._current else set())

    def wait(self) -> None:
        """Block until every queued copy is done; raise the first error."""
        with self._lock:
            while self._queue or self._current is not None:
                self._lock.wait()
        self.raise_error()

    def raise_error(self) -> None:
        """Raise (once) the error of a copy that failed."""
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

    # -- the background thread ---------------------------------------------------------------------
    def _run(self) -> None:
        lower_priority()
        while True:
            with self._lock:
                while not self._queue and not self._closed:
                    self._lock.wait()
                if not self._queue:
                    return
                self._current, skippable = self._queue.popleft()
            name = self._current
            try:
                self.copy(name, skippable=skippable)
            except BaseException as err:  # noqa: BLE001 - handed to the loop by raise_error()
                log.warning("Copying the parts of %s to other nodes failed: %s", self.local.url(name), err)
                with self._lock:
                    if self._error is None:
                        self._error = ReplicationError(f"Copying the parts of {self.local.url(name)} failed: {err}")
                        self._error.__cause__ = err
            finally:
                with self._lock:
                    self._current = None
                    self._lock.notify_all()

    def copy(self, name: str, *, skippable: bool = False) -> None:
        """One round: each node's own copy of ``name`` (its part, or the whole checkpoint a lone rank saved) to its
        peers that lack it (collective over the exchange group)."""
        layout = self.groups.layout
        own, kept = None, {}
        if layout.is_leader:
            if self.local.save_id_of(name) is not None:
                manifest = self.local.info(name).manifest
                own = (manifest["save_id"], manifest) if part_of(manifest) is not None else None
            kept = {part: replica_storage(self.local, part).save_id_of(name) for part in replica_parts(self.local)}
        with self._lock:
            later = bool(self._queue)
        views = self.groups.all_gather((own, kept, later))
        if skippable and all(view[2] for view in views):
            self.skipped.append(name)  # a newer checkpoint waits on every rank: copies keep up with the newest
            log.info("Not copying %s to other nodes: a newer checkpoint is waiting to be copied.", name)
            return
        owners = {node: views[leader][0] for node, leader in enumerate(layout.leaders) if views[leader][0] is not None}
        if not owners or len({save_id for save_id, _ in owners.values()}) != 1:
            return  # committed nowhere (its save failed and said so), or two saves of that name: nothing to copy
        save_id, manifest = next(iter(owners.values()))
        records = manifest["files"]
        transfers, receiving = [], set()
        for node, (_, held) in sorted(owners.items()):
            part = part_of(held)["node"]  # type: ignore[index]
            for peer in layout.peers(node, self.copies):
                if views[layout.leader_of(peer)][1].get(part) == save_id:
                    continue  # that peer keeps this copy already (a copy made before a restart)
                if peer == layout.node:
                    receiving.add(part)
                for file in part_files(held, part):
                    size = int(records[file]["size"])
                    transfers.append(Transfer(layout.leader_of(node), layout.leader_of(peer), file, size, part))
        problem = None
        try:
            self._exchange(name, manifest, transfers, receiving if layout.is_leader else set())
        except Exception as err:  # noqa: BLE001 - every rank learns it below
            problem = f"node {layout.node}: {type(err).__name__}: {err}"
        failed = [text for text in self.groups.all_gather(problem) if text]
        if failed:
            raise ReplicationError(f"a copy was not committed ({failed[0]}); the checkpoint itself is committed")
        if layout.is_leader and receiving:
            self._apply_retention()

    def _exchange(self, name: str, manifest: dict[str, Any], transfers: list[Transfer], receiving: set[int]) -> None:
        """Send this node's files and receive the parts this node keeps copies of, then commit those copies."""
        layout = self.groups.layout
        own = self.local.root_path(name)
        pending: dict[int, Any] = {}
        setup: BaseException | None = None
        try:
            for part in sorted(receiving):
                pending[part] = replica_storage(self.local, part).begin_write(name, overwrite=True)
        except Exception as err:  # noqa: BLE001 - the transfers still run (the senders wait for them)
            setup = err

        def receive(transfer: Transfer, buffers: Buffers) -> None:
            write = pending.get(transfer.part)
            directory = write.directory if write is not None else f"{own}/.dcp-plugin-no-copy"  # received, dropped
            record = manifest["files"][transfer.name]
            target = f"{directory}/{transfer.name}"
            receive_file(target, record, transfer.source, self.groups.exchange, buffers, durable=True)
            self.copied_bytes += transfer.size

        try:
            group = self.groups.exchange
            try:
                run_transfers(transfers, layout.rank, group, source_path=lambda t: f"{own}/{t.name}", receive=receive)
            except Exception:
                if setup is None:
                    raise
            if setup is not None:
                raise setup  # the cause: no place to keep the copy
            for part, write in sorted(pending.items()):
                reached("replica.written")
                replica_storage(self.local, part).strategy.commit(write, with_part(manifest, part))
                reached("replica.committed")
                log.info("Keeping a copy of node %d's part of %s on this node.", part, name)
        except BaseException:
            for part, write in pending.items():
                replica_storage(self.local, part).abort(write)
            raise

    def missing(self, view: JobView) -> list[str]:
        """The complete checkpoints of ``view`` with a node's own copy that a peer lacks (a copy interrupted by a
        crash): every node computes the same list from the same view."""
        layout, out = self.groups.layout, []
        for checkpoint in view.complete:
            owners = {copy.node: copy.part for copy in checkpoint.copies if copy.own and copy.part is not None}
            kept = {(copy.node, copy.part) for copy in checkpoint.copies if not copy.own}
            if any(
                (peer, part) not in kept for node, part in owners.items() for peer in layout.peers(node, self.copies)
            ):
                out.append(checkpoint.name)
        return out

    def _apply_retention(self) -> None:
        """The run's retention, applied to the copies this node keeps."""
        schedule = self.schedule
        if schedule.retention is None:
            return
        for part in replica_parts(self.local):
            storage = replica_storage(self.local, part)
            apply_retention(schedule.retention, storage, run_id=schedule.run_id, owned=schedule.owned)

    def __getstate__(self) -> dict[str, Any]:
        raise TypeError("PeerReplicator runs a thread on a process group and cannot be copied.")


__all__ = ["PeerReplicator"]
