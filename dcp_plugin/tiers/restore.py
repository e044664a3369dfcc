"""Restoring a checkpoint on node-local disks from the nearest copy of each file.

Every node's leader assembles the checkpoint in ``.dcp-plugin/restore/<name>.<id>/`` on its own disk: the files
of every copy the node holds (its own part, the peer replicas it keeps) are linked there, with the manifest of the
whole checkpoint. The load then reads that directory like any committed checkpoint (checksums checked before any
byte is used), and at the start of each read every rank names the files its part of the read uses
(:attr:`~dcp_plugin.storage.reader.SafeFileSystemReader.fetch_missing`): a file the node lacks comes from another
node that holds it, over the process group, or else from the remote tier. So a node that lost its disk reads its
part from a peer, a job restarted on fewer nodes gathers the parts it reshards from, and nothing is read from the
remote tier unless no node has the file. The bytes read from each place are counted (:attr:`NodeRestore.counts`).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from typing import Any

from dcp_plugin.errors import CheckpointLoadError
from dcp_plugin.storage import CheckpointInfo, CheckpointStorage
from dcp_plugin.storage.commit import write_local_manifest
from dcp_plugin.storage.names import METADATA_NAME, RESTORE, work_name
from dcp_plugin.storage.node_parts import NodeLayout, part_files, without_part
from dcp_plugin.storage.room import MEMORY_FILESYSTEMS, mount_of
from dcp_plugin.storage.transfer import fetch_file
from dcp_plugin.tiers.holdings import Checkpoint, replica_storage
from dcp_plugin.tiers.wire import Transfer, receive_file, run_transfers

log = logging.getLogger(__name__)

SOURCES = ("local", "peer", "remote")


class RestoreStorage(CheckpointStorage):
    """The checkpoint assembled on this node for one restore; its readers fetch what the node lacks."""

    restore: NodeRestore

    def metadata_reader(self, name: str | CheckpointInfo) -> Any:
        info = name if isinstance(name, CheckpointInfo) else self.info(name)
        here = CheckpointInfo(name=info.name, url=self.url(info.name), manifest=info.manifest)  # this node's copy
        reader = super().metadata_reader(here)
        reader.fetch_missing = self.restore.fetch
        return reader


class NodeRestore:
    """One restore of ``checkpoint`` on every rank of the job (built collectively by :meth:`assemble`).

    Args:
        local: this node's checkpoint directory.
        checkpoint: what to restore and which node holds which copy (the same on every rank).
        layout: which node each rank runs on.
        all_gather: the collective the ranks agree through (the nodes' exchange group).
        group: the process group files travel on.
        remote: the remote tier, when it holds the checkpoint.
    """

    def __init__(
        self,
        local: CheckpointStorage,
        checkpoint: Checkpoint,
        layout: NodeLayout,
        all_gather: Callable[[Any], list[Any]],
        group: Any,
        remote: CheckpointStorage | None,
    ) -> None:
        self.local, self.checkpoint, self.layout = local, checkpoint, layout
        self._all_gather, self._group, self._remote = all_gather, group, remote
        self.manifest = without_part(checkpoint.manifest)
        self.records: dict[str, dict[str, Any]] = self.manifest["files"]
        self.present: dict[int, set[str]] = {node: set() for node in range(layout.nodes)}
        """The files each node has in its restore directory (the same on every rank)."""
        for copy in checkpoint.copies:
            self.present.setdefault(copy.node, set()).update(part_files(copy.manifest, copy.part))
        self.counts = dict.fromkeys(SOURCES, 0)
        """Bytes each place gave this restore, over all nodes: ``local``, ``peer``, ``remote``."""
        self._counted: dict[int, set[str]] = {node: set() for node in range(layout.nodes)}
        self.arrived: dict[str, str] = {}
        """The files this node received for this restore, checked as they arrived, and where they are."""
        self._entry = ""
        self._scratch: str | None = None
        self.storage: RestoreStorage | None = None

    # -- assembling ---------------------------------------------------------------------------------
    def assemble(self) -> RestoreStorage:
        """Assemble the checkpoint on every node (collective); returns this node's :class:`RestoreStorage`."""
        problem: str | None = None
        entry = work_name(self.checkpoint.name)
        if self.layout.is_leader:
            try:
                self._link_copies(entry)
            except Exception as err:  # noqa: BLE001 - every rank learns it below
                problem = f"node {self.layout.node}: {type(err).__name__}: {err}"
        scratch = None
        if self.layout.is_leader and problem is None:
            lacking = set(self.records) - self.present.get(self.layout.node, set())
            scratch = memory_scratch(self.local, sum(int(self.records[name]["size"]) for name in lacking))
        answers = self._all_gather((entry, problem, scratch))
        failed = [text for _, text, _ in answers if text]
        self._entry, _, self._scratch = answers[self.layout.leader_of(self.layout.node)]
        if failed:
            self.close()
            raise CheckpointLoadError(f"Restoring {self.checkpoint.name} failed: {failed[0]}")
        storage = RestoreStorage(self.local.work_path(RESTORE, self._entry), self.local.storage_options)
        storage.restore = self
        self.storage = storage
        self.fetch([".metadata"])  # a node that lost its disk gets .metadata before DCP reads it
        return storage

    def _link_copies(self, entry: str) -> None:
        directory = f"{self.local.make_work_entry(RESTORE, entry)}/{self.checkpoint.name}"  # never through a link
        os.mkdir(directory)
        for copy in self.checkpoint.copies:
            if copy.node != self.layout.node:
                continue
            root = self.local if copy.own else replica_storage(self.local, copy.part or 0)
            source = root.root_path(copy.name)
            for name in part_files(copy.manifest, copy.part):
                target = f"{directory}/{name}"
                if not os.path.lexists(target):
                    _link_or_copy(f"{source}/{name}", target)
        write_local_manifest(directory, self.manifest)

    # -- fetching ---------------------------------------------------------------------------------
    def fetch(self, names: list[str]) -> dict[str, str]:
        """Make the files this rank's read uses present on its node (collective: every rank calls it at the start
        of each read, with the files it reads); returns those its node received, checked against their checksums as
        they arrived (the reader does not hash them again), and where each is."""
        wanted = self._all_gather((self.layout.node, sorted(names)))
        needed: dict[int, set[str]] = {}
        for node, files in wanted:
            needed.setdefault(node, set()).update(files)
        peer, remote, lacking = self._plan(needed)
        problem: str | None = None
        if lacking:
            problem = "; ".join(f"{name} (needed on node {node})" for node, name in lacking)
            problem = f"no node holds {problem}, and there is no remote tier with this checkpoint"
        else:
            try:
                self._move(peer, remote)
            except Exception as err:  # noqa: BLE001 - every rank learns it below
                problem = f"node {self.layout.node}: {type(err).__name__}: {err}"
        failed = [text for text in self._all_gather(problem) if text]
        if failed:
            raise CheckpointLoadError(f"Restoring {self.checkpoint.name} failed: {failed[0]}")
        self._account(needed, peer, remote)
        here = self.layout.leader_of(self.layout.node)
        arrived = {t.name for t in peer if t.target == here} | {n for node, n in remote if node == self.layout.node}
        self.arrived.update({name: self._landing(name) for name in arrived})
        return dict(self.arrived)

    def _plan(self, needed: dict[int, set[str]]) -> tuple[list[Transfer], list[tuple[int, str]], list[tuple[int, str]]]:
        """Where each missing file comes from: another node, the remote tier, or nowhere (the same on every rank)."""
        leader, peer, remote, lacking = self.layout.leader_of, [], [], []
        for node in sorted(needed):
            for name in sorted(needed[node] - self.present.get(node, set())):
                if name not in self.records:
                    continue  # not a file of this checkpoint: the reader refuses it
                holders = sorted(other for other, files in self.present.items() if name in files and other != node)
                if holders:
                    peer.append(Transfer(leader(holders[0]), leader(node), name, int(self.records[name]["size"])))
                elif self._remote is not None:
                    remote.append((node, name))
                else:
                    lacking.append((node, name))
        return peer, remote, lacking

    def _move(self, peer: list[Transfer], remote: list[tuple[int, str]]) -> None:
        run_transfers(
            peer,
            self.layout.rank,
            self._group,
            source_path=lambda transfer: self.arrived.get(transfer.name, f"{self._directory()}/{transfer.name}"),
            receive=lambda t, buffers: receive_file(
                self._landing(t.name), self.records[t.name], t.source, self._group, buffers, durable=False
            ),
        )
        mine = [name for node, name in remote if node == self.layout.node and self.layout.is_leader]
        if mine:
            assert self._remote is not None and self.storage is not None
            info = self._remote.info(self.checkpoint.name)
            if info.manifest.get("save_id") != self.checkpoint.save_id:
                raise CheckpointLoadError(f"the remote tier's {info.url} is another save of that name now")
            source = self._remote.data_path(info)
            for name in mine:
                fetch_file(self._remote, f"{source}/{name}", self.storage, self._landing(name), self.records[name])

    def _account(self, needed: dict[int, set[str]], peer: list[Transfer], remote: list[tuple[int, str]]) -> None:
        fetched = {(transfer.target, transfer.name): "peer" for transfer in peer}
        fetched.update({(self.layout.leader_of(node), name): "remote" for node, name in remote})
        for node, files in needed.items():
            files = {name for name in files if name in self.records}
            for name in files - self._counted[node]:
                place = fetched.get((self.layout.leader_of(node), name), "local")
                self.counts[place] += int(self.records[name]["size"])
                self._counted[node].add(name)
            self.present[node] |= files

    def _directory(self) -> str:
        return self.local.work_path(RESTORE, self._entry, self.checkpoint.name)

    def _landing(self, name: str) -> str:
        """Where a fetched file goes: host memory when the node has room there (the reader uses it right away, and
        a disk would first have to take it), the restore directory otherwise; ``.metadata`` always there."""
        if self._scratch is None or name == METADATA_NAME:
            return f"{self._directory()}/{name}"
        return f"{self._scratch}/{name}"

    # -- finishing ---------------------------------------------------------------------------------
    def close(self) -> None:
        """Remove this node's restore directory (its leader; after every rank of the node finished reading)."""
        if not self.layout.is_leader or not self._entry:
            return
        if self._scratch is not None:
            shutil.rmtree(self._scratch, ignore_errors=True)
        try:
            self.local.remove_work_entry(RESTORE, self._entry)
        except OSError as err:
            log.warning("Could not remove %s: %s (purge removes it)", self.local.work_path(RESTORE, self._entry), err)


SCRATCH_PREFIX = "dcp-plugin-restore-"
"""Folders in ``/dev/shm`` holding the files a restore fetched (one per restore; the node root they belong to is
written in their ``root`` file, so the next start of a job on that root removes what a crash left)."""
SHM = "/dev/shm"


def memory_scratch(local: CheckpointStorage, needed: int) -> str | None:
    """A fresh folder in host memory for ``needed`` bytes of fetched files, or ``None`` when the node's directory is
    in memory already, or ``/dev/shm`` is missing, not a tmpfs, or has less than that room (with a margin)."""
    here, shm = mount_of(local.root), mount_of(SHM)
    if (
        not needed
        or shm is None
        or shm[1] not in MEMORY_FILESYSTEMS
        or (here is not None and here[1] in MEMORY_FILESYSTEMS)
    ):
        return None
    stats = os.statvfs(SHM)
    if stats.f_bavail * stats.f_frsize < needed * 5 // 4 + 2**26:
        return None
    scratch = tempfile.mkdtemp(prefix=SCRATCH_PREFIX, dir=SHM)
    with open(os.path.join(scratch, "root"), "w", encoding="utf-8") as handle:
        handle.write(local.root)
    return scratch


def remove_scratch_of(local: CheckpointStorage) -> None:
    """Remove the host-memory folders of restores of ``local`` that a crash left (at the next start)."""
    try:
        entries = [entry for entry in os.listdir(SHM) if entry.startswith(SCRATCH_PREFIX)]
    except OSError:
        return
    for entry in entries:
        folder = os.path.join(SHM, entry)
        try:
            with open(os.path.join(folder, "root"), encoding="utf-8") as handle:
                mine = handle.read() == local.root
        except OSError:
            continue
        if mine and not os.path.islink(folder):
            shutil.rmtree(folder, ignore_errors=True)


def _link_or_copy(source: str, target: str) -> None:
    try:
        os.link(source, target, follow_symlinks=False)
    except OSError:
        shutil.copyfile(source, target, follow_symlinks=False)


__all__ = ["NodeRestore", "RestoreStorage", "SOURCES", "memory_scratch", "remove_scratch_of"]
