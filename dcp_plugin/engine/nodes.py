"""Which ranks share a node, and the process groups the nodes talk on.

With ``local_scope="node"`` every node writes its ranks' files to its own disk, so the job must know which ranks
share one. The launcher says so: torchrun (and ``accelerate launch``, which runs torchrun) sets ``GROUP_RANK``,
the node's rank in the job; launchers that only say how many processes run on a node (``LOCAL_WORLD_SIZE`` and
its MPI forms, as Accelerate reads them) place rank ``r`` on node ``r // local_world_size``; without either, the
host name decides. Every rank states its node and all agree by one all-gather (:func:`detect_layout`).

Node ranks can change between launches (torchrun's c10d rendezvous numbers nodes in the order they arrive), so
nothing stored depends on a node keeping its rank: a checkpoint's parts are numbered by the node that wrote
them at save time, and a restore looks for each part wherever it is now.
"""

from __future__ import annotations

import datetime
import os
import socket
from collections.abc import Callable, Mapping
from typing import Any

import torch.distributed as dist

from dcp_plugin.engine.priority import run_lowered
from dcp_plugin.errors import ConfigError
from dcp_plugin.storage.node_parts import NodeLayout

LOCAL_WORLD_SIZE_VARIABLES = (
    "LOCAL_WORLD_SIZE",
    "MPI_LOCALNRANKS",
    "OMPI_COMM_WORLD_LOCAL_SIZE",
    "MV2_COMM_WORLD_LOCAL_SIZE",
)
"""Where launchers say how many processes run on this node (torchrun first, then the MPI launchers Accelerate
reads)."""

COPY_NICENESS = 10
"""How much lower than training the threads that copy between nodes run (``nice``, Linux): copies yield the
cores to training and to the saves' own writers."""

EXCHANGE_TIMEOUT = datetime.timedelta(hours=24)
"""The nodes' exchange group waits this long in a collective: a node copying a large part to a slow peer keeps
the others waiting in the round's last all-gather."""


def node_key(rank: int, environ: Mapping[str, str] | None = None) -> tuple[int, str]:
    """What this rank says about its node: ``(0, "<node rank>")`` from the launcher, else ``(1, host name)``."""
    environ = os.environ if environ is None else environ
    group = environ.get("GROUP_RANK", "").strip()
    if group.isdigit():
        return (0, group)
    for name in LOCAL_WORLD_SIZE_VARIABLES:
        size = environ.get(name, "").strip()
        if size.isdigit() and int(size) > 0:
            return (0, str(rank // int(size)))
    return (1, socket.gethostname())


def detect_layout(
    rank: int, all_gather: Callable[[Any], list[Any]], environ: Mapping[str, str] | None = None
) -> NodeLayout:
    """Agree on every rank's node (collective: every rank calls it with its own ``rank``)."""
    keys = all_gather(node_key(rank, environ))
    if len({kind for kind, _ in keys}) > 1:
        raise ConfigError(
            "Some ranks know their node from the launcher (GROUP_RANK or LOCAL_WORLD_SIZE) and others do not; start "
            "every node with the same launcher (torchrun, accelerate launch)."
        )
    if keys[0][0] == 0:
        order = sorted({int(value) for _, value in keys})
        number = {str(value): index for index, value in enumerate(order)}
    else:
        first: dict[str, int] = {}
        for where, (_, value) in enumerate(keys):
            first.setdefault(value, where)
        number = {value: index for index, value in enumerate(sorted(first, key=first.__getitem__))}
    return NodeLayout(rank=rank, node_of_rank=tuple(number[value] for _, value in keys))


class NodeGroups:
    """The node layout and the gloo group the nodes exchange copies on (created collectively: every rank builds
    one at the same point). Without ``torch.distributed`` the job is one node and has no group."""

    def __init__(self, layout: NodeLayout, collective: bool) -> None:
        self.layout = layout
        """Which node each rank runs on."""
        self._exchange: Any = None
        if collective:  # made by a thread of lower priority: gloo's own threads, which move the bytes, inherit it
            self._exchange = run_lowered(
                COPY_NICENESS, lambda: dist.new_group(backend="gloo", timeout=EXCHANGE_TIMEOUT)
            )
        self.collective = collective
        """Whether other ranks take part (``False``: this process is the whole job)."""

    @property
    def exchange(self) -> Any:
        """The group copies between nodes travel on (neither the training loop's nor the saves')."""
        return self._exchange

    def all_gather(self, obj: Any) -> list[Any]:
        """``obj`` of every rank, on the exchange group."""
        if not self.collective:
            return [obj]
        out: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(out, obj, group=self._exchange)
        return out

    def close(self) -> None:
        """Release the exchange group."""
        group, self._exchange = self._exchange, None
        if group is not None:
            try:
                dist.destroy_process_group(group)
            except Exception:  # noqa: BLE001 - the default group may already be gone
                pass

    def __getstate__(self) -> dict[str, Any]:
        raise TypeError("NodeGroups holds a process group and cannot be copied.")


__all__ = ["COPY_NICENESS", "EXCHANGE_TIMEOUT", "NodeGroups", "NodeLayout", "detect_layout", "node_key"]
