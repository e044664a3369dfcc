"""Replicating a checkpoint written by several ranks: each rank uploads its own files, rank 0 commits.

DCP names each rank's data file ``__<rank>_<n>.distcp``. When the ranks that saved a checkpoint replicate it,
rank 0 starts the copy in the remote's work area and broadcasts the plan; every rank copies the data files it
wrote (rank 0 also the ``.metadata`` and the files of ranks no longer present), checks each one against the
checksum committed locally while it streams, reads its copies back from the remote, and reports their records.
The records are all-gathered; rank 0 commits the remote checkpoint only when every rank reported all its files
checked, and otherwise aborts the copy (nothing is committed remotely). The outcome is broadcast, so every rank
knows whether the copy committed.

The exchange runs in each rank's replication thread on a dedicated gloo group (not the groups saves or the
training loop use), one checkpoint at a time, in the same order on every rank: each rank queues the same
checkpoints (the replicate policy decides on the step; the checkpoints to catch up on are broadcast by rank 0).
"""

from __future__ import annotations

import datetime
import re
from collections.abc import Callable
from typing import Any

import torch.distributed as dist

from dcp_plugin.storage import CheckpointStorage
from dcp_plugin.storage.transfer import CopyPlan, commit_copy, copy_files

RANK_FILE = re.compile(r"^__(\d+)_\d+\.distcp$")

# A rank waits in the all-gather until the slowest rank uploaded its files: allow long uploads.
REPLICATION_TIMEOUT = datetime.timedelta(hours=24)


def owner(relative: str, world_size: int) -> int:
    """The rank that uploads file ``relative``: the rank that wrote it, else rank 0."""
    match = RANK_FILE.match(relative)
    rank = int(match.group(1)) if match else 0
    return rank if rank < world_size else 0


class RankCopies:
    """The per-checkpoint exchange between the replication threads of all ranks (see the module docstring).

    Created collectively (by every rank, at the same point) when a two-tier manager is built on several ranks.
    """

    def __init__(self, local: CheckpointStorage, remote: CheckpointStorage) -> None:
        self.local = local
        self.remote = remote
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self._group: Any = dist.new_group(backend="gloo", timeout=REPLICATION_TIMEOUT)
        self.uploaded: list[str] = []
        """The files this rank uploaded for the latest checkpoint it took part in."""

    @property
    def is_coordinator(self) -> bool:
        return self.rank == 0

    def lead(self, begin: Callable[[], CopyPlan | None]) -> CopyPlan | None:
        """Rank 0: start the copy (``begin`` returns ``None`` when there is nothing to copy), copy this rank's
        files, commit once every rank's files are checked. Raises why the copy did not commit."""
        plan: CopyPlan | None = None
        failure: BaseException | None = None
        try:
            plan = begin()
        except BaseException as err:  # noqa: BLE001 - the other ranks are told first, then it is raised
            failure = err
        self._broadcast(None if plan is None else (plan.info, plan.source_dir, plan.names, plan.pending))
        if plan is None:
            if failure is not None:
                raise failure
            return None
        results = self._all_gather(self._copy_mine(plan))
        problems = [result for result in results if isinstance(result, str)]
        if not problems:
            copied = {name: record for result in results for name, record in result.items()}
            try:
                commit_copy(plan, copied)
            except BaseException as err:  # noqa: BLE001 - the other ranks are told first, then it is raised
                failure = err
                problems = [str(err)]
        if problems:
            self.remote.abort(plan.pending)
        self._broadcast("; ".join(problems) or None)
        if failure is not None:
            raise failure
        if problems:
            raise RuntimeError("; ".join(problems))
        return plan

    def follow(self) -> None:
        """Ranks other than 0: take part in rank 0's next copy. Raises if it did not commit."""
        shared = self._broadcast(None)
        if shared is None:
            return  # nothing to copy this time
        info, source_dir, names, pending = shared
        if self.local.node_layout is not None:  # node-local disks: this rank's files are in its own node's directory
            source_dir = self.local.root_path(info.name)
        plan = CopyPlan(self.local, info, source_dir, names, self.remote, pending)
        self._all_gather(self._copy_mine(plan))
        outcome = self._broadcast(None)
        if outcome is not None:
            raise RuntimeError(outcome)

    def close(self) -> None:
        try:
            dist.destroy_process_group(self._group)
        except Exception:  # noqa: BLE001 - the default group may already be gone
            pass

    def _copy_mine(self, plan: CopyPlan) -> dict[str, dict[str, Any]] | str:
        mine = [name for name in plan.names if owner(name, self.world_size) == self.rank]
        self.uploaded = mine
        try:
            return copy_files(plan, mine)
        except Exception as err:  # noqa: BLE001 - reported to rank 0, which does not commit
            return f"rank {self.rank}: {err}"

    def _broadcast(self, obj: Any) -> Any:
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self._group)
        return box[0]

    def _all_gather(self, obj: Any) -> list[Any]:
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self._group)
        return out

    def __getstate__(self) -> dict[str, Any]:
        raise TypeError("RankCopies holds a process group and cannot be copied.")


__all__ = ["REPLICATION_TIMEOUT", "RankCopies", "owner"]
