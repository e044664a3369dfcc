"""Checkpoints written on several nodes with their own disks: which node holds which file.

With ``local_scope="node"`` every node writes its ranks' files into its own directory (the same path on every
node), so each node holds one *part* of a checkpoint: the data files its ranks wrote, plus ``.metadata`` and a
manifest, which are the same on every node. The manifest of a part carries a ``part`` record::

    "part": {"node": 1, "nodes": 2, "holders": {"__0_0.distcp": 0, "__1_0.distcp": 1}}

``node`` is the part (the node that wrote it, numbered as at save time), ``nodes`` how many parts the checkpoint
has, ``holders`` the part of every data file. ``files`` still lists every file of the checkpoint with its size and
checksum, so any node can check a file it receives from another. A copy of node 1's part kept on another node
(a peer replica) is the same directory with the same manifest. A checkpoint copied elsewhere whole (a remote tier)
has no ``part`` record.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from dcp_plugin.storage.names import METADATA_NAME

PART_KEY = "part"
_RANK_FILE = re.compile(r"^__(\d+)_\d+\.distcp$")


@dataclass(frozen=True)
class NodeLayout:
    """Which node each rank of the job runs on (nodes numbered 0..N-1). Agreed by every rank when the job starts
    (:func:`dcp_plugin.engine.nodes.detect_layout`)."""

    rank: int
    """This process's rank."""
    node_of_rank: tuple[int, ...]
    """The node of every rank, by rank."""

    @property
    def nodes(self) -> int:
        """How many nodes the job runs on."""
        return max(self.node_of_rank) + 1

    @property
    def node(self) -> int:
        """This rank's node."""
        return self.node_of_rank[self.rank]

    def ranks_of(self, node: int) -> list[int]:
        """The ranks running on ``node``, lowest first."""
        return [rank for rank, where in enumerate(self.node_of_rank) if where == node]

    def leader_of(self, node: int) -> int:
        """The rank that reads and writes ``node``'s directory on behalf of its ranks (its lowest rank)."""
        return self.ranks_of(node)[0]

    @property
    def is_leader(self) -> bool:
        """Whether this rank acts for its node (commits its part, sends and receives its copies)."""
        return self.leader_of(self.node) == self.rank

    @property
    def leaders(self) -> list[int]:
        """The leader of every node, by node."""
        return [self.leader_of(node) for node in range(self.nodes)]

    def peers(self, node: int, count: int) -> list[int]:
        """The nodes that keep copies of ``node``'s part: the next ``count`` nodes in a ring (never ``node``)."""
        return [(node + step) % self.nodes for step in range(1, min(count, self.nodes - 1) + 1)]


def writer_rank(relative: str) -> int | None:
    """The rank that wrote a data file, from DCP's file names (``__<rank>_<n>.distcp``)."""
    match = _RANK_FILE.match(relative)
    return int(match.group(1)) if match else None


def part_record(files: Mapping[str, Any], node_of_rank: tuple[int, ...], node: int) -> dict[str, Any]:
    """The ``part`` record of ``node``'s part of a checkpoint whose files are ``files`` (DCP's names say which
    rank wrote each; a file of no rank, or of a rank this job does not have, is the first node's)."""
    holders = {}
    for name in sorted(files):
        if name == METADATA_NAME:
            continue
        rank = writer_rank(name)
        holders[name] = node_of_rank[rank] if rank is not None and rank < len(node_of_rank) else 0
    return {"node": node, "nodes": max(node_of_rank) + 1, "holders": holders}


def part_of(manifest: Mapping[str, Any]) -> dict[str, Any] | None:
    """The manifest's ``part`` record, or ``None`` for a checkpoint held whole."""
    part = manifest.get(PART_KEY)
    return part if isinstance(part, dict) else None


def part_files(manifest: Mapping[str, Any], node: int | None = None) -> list[str]:
    """The files of part ``node`` (default: the manifest's own part), ``.metadata`` included; every file for a
    checkpoint held whole."""
    files = sorted(manifest.get("files") or {})
    part = part_of(manifest)
    if part is None:
        return files
    node = part["node"] if node is None else node
    return [name for name in files if name == METADATA_NAME or part["holders"].get(name) == node]


def with_part(manifest: Mapping[str, Any], node: int) -> dict[str, Any]:
    """A copy of a part's manifest that describes part ``node``."""
    part = part_of(manifest)
    assert part is not None
    return {**manifest, PART_KEY: {**part, "node": node}}


def without_part(manifest: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of a manifest for the checkpoint held whole (restores, copies to another storage)."""
    return {key: value for key, value in manifest.items() if key != PART_KEY}


def missing_file(relative: str, part: Mapping[str, Any] | None) -> str:
    """Why a data file named in ``.metadata`` is not in a checkpoint directory: missing, or on another node's disk
    (the directory holds one node's part)."""
    holder = None if part is None else part["holders"].get(relative)
    if part is None or holder is None or holder == part["node"]:
        return f"{relative} is missing"
    return (
        f"{relative} is on node {holder}'s disk: this directory holds node {part['node']}'s part of a checkpoint "
        f"written on {part['nodes']} nodes with their own disks; load it with local_scope='node' on the job's nodes "
        "(CheckpointManager(directory, local_scope='node')), which fetches each file from the node that holds it"
    )


def part_problems(part: Any) -> list[str]:
    """What is wrong with a manifest's ``part`` record (for the manifest's validation)."""
    if part is None:
        return []
    if not isinstance(part, dict):
        return ['"part" is not an object']
    nodes, node, holders = part.get("nodes"), part.get("node"), part.get("holders")
    if not (_count(nodes) and _count(node, zero=True) and node < nodes):
        return ['"part" has no valid "node" and "nodes"']
    if not isinstance(holders, dict) or not all(_count(v, zero=True) and v < nodes for v in holders.values()):
        return ['"part" has malformed "holders"']
    return []


def _count(value: Any, zero: bool = False) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= (0 if zero else 1)


__all__ = [
    "PART_KEY",
    "NodeLayout",
    "missing_file",
    "part_files",
    "part_of",
    "part_problems",
    "part_record",
    "with_part",
    "without_part",
    "writer_rank",
]
