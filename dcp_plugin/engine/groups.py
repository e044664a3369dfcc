"""Process groups for checkpoint collectives: who takes part in a save, and the groups they talk on.

DCP's background collectives must not share a group with the training loop (a deadlock with gloo DDP and
async saves). This module creates those groups once and releases them in one place. A process that saves alone
never gets a process group from us, in any mode: ``torch.distributed`` stays as the user left it (uninitialized in
a single-process run), and in ``process`` mode the writer daemon sets up its own (:mod:`dcp_plugin.engine.daemon`).
"""

from __future__ import annotations

import os
from typing import Any

import torch.distributed as dist

from dcp_plugin.engine.nodes import NodeLayout, detect_layout
from dcp_plugin.errors import ConfigError


class ProcessGroups:
    """The ranks that save together and the dedicated gloo groups they use.

    Args:
        distributed: ``None`` saves collectively when ``torch.distributed`` is initialized; ``False`` makes
            this process save alone; ``True`` requires an initialized process group.
        async_mode: in ``"process"`` mode a rank that saves alone while other ranks exist gets a one-rank group,
            so its writer daemon does not wait for the others.
    """

    def __init__(self, distributed: bool | None = None, *, async_mode: str = "thread") -> None:
        self._request = distributed
        self._async_mode = async_mode
        self._group: dist.ProcessGroup | None = None
        self._control_group: dist.ProcessGroup | None = None
        self._group_ready = False
        self._layout: NodeLayout | None = None

    @property
    def collective(self) -> bool:
        """Whether saves and loads are collective over all ranks of the default process group."""
        if self._request is False:
            return False
        self._check_same_process()
        initialized = dist.is_available() and dist.is_initialized()
        if self._request is True and not initialized:
            raise ConfigError("distributed=True but torch.distributed is not initialized.")
        return initialized

    @property
    def rank(self) -> int:
        return dist.get_rank() if self.collective else 0

    @property
    def world_size(self) -> int:
        return dist.get_world_size() if self.collective else 1

    @property
    def is_coordinator(self) -> bool:
        return self.rank == 0

    def checkpoint_group(self) -> dist.ProcessGroup | None:
        """The gloo group DCP's collectives run on (created once, by every rank that takes part)."""
        if self._group_ready:
            self._check_same_process()
            return self._group
        self._made_in = os.getpid()
        if self.collective:
            self._group = dist.new_group(backend="gloo")
        elif self._async_mode == "process":
            self._group = self._single_process_group()
        self._group_ready = True
        return self._group

    def _check_same_process(self) -> None:
        """A group made before ``fork()`` cannot be used in the child (gloo's threads stayed in the parent; a
        collective there waits forever), nor can an asynchronous engine's staging threads and writer (a staging
        job queued in the child never runs): say so instead."""
        made_in = getattr(self, "_made_in", os.getpid())
        made_here = self._group is not None or getattr(self, "_owns_default_group", False)
        if (made_here or self._async_mode != "sync") and made_in != os.getpid():
            raise ConfigError(
                f"This checkpointer was set up in process {made_in} and is used in process {os.getpid()}, forked "
                "from it: its process groups, background threads and writer belong to the parent and cannot work "
                "here. Create a new CheckpointManager (or Checkpointer) in the child; it starts its own writer."
            )

    def _single_process_group(self) -> dist.ProcessGroup | None:
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            # This rank saves alone (e.g. Lightning's rank 0): give its writer daemon a one-rank group, so
            # the daemon does not wait for the other ranks of the default group. Only this rank joins it.
            return dist.new_group(ranks=[dist.get_rank()], backend="gloo", use_local_synchronization=True)
        # One process: no group at all (torch.distributed uninitialized, as the user left it), or the user's own
        # one-rank default group. The writer daemon is started without one (engine/daemon.py).
        return None

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (identity without a process group)."""
        if not self.collective:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.checkpoint_group())
        return box[0]

    def all_gather(self, obj: Any) -> list[Any]:
        if not self.collective:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.checkpoint_group())
        return out

    def gather(self, obj: Any) -> list[Any] | None:
        """Every rank's ``obj`` on rank 0 (``None`` on the other ranks)."""
        if not self.collective:
            return [obj]
        out: list[Any] | None = [None] * self.world_size if self.is_coordinator else None
        dist.gather_object(obj, out, dst=0, group=self.checkpoint_group())
        return out

    def all_gather_control(self, obj: Any) -> list[Any]:
        """``all_gather`` for small control messages (e.g. save decisions), safe while a save is in flight.

        A background save runs collectives on the checkpoint group; issuing others there from the training
        thread at the same time would interleave them. This uses a second gloo group, created on first use
        (by every rank, at the same point of the loop).
        """
        if not self.collective:
            return [obj]
        if self._control_group is None:
            self._control_group = dist.new_group(backend="gloo")
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self._control_group)
        return out

    def node_layout(self) -> NodeLayout:
        """Which node each rank runs on, agreed by every rank at its first call (collective then; safe while a
        save is in flight: it runs on the control group)."""
        if self._layout is None:
            self._layout = detect_layout(self.rank, self.all_gather_control)
        return self._layout

    def close(self) -> None:
        """Release the groups created here."""
        for group in (self._group, self._control_group):
            if group is not None:
                try:
                    dist.destroy_process_group(group)
                except Exception:  # noqa: BLE001 - the default group may already be gone
                    pass
        self._group = self._control_group = None
        self._group_ready = False
