"""Room for a save in host memory: a local checkpoint directory on ``/dev/shm`` (or any tmpfs) is the in-memory
tier of node-local checkpoints, and its size is fixed when it is mounted. A save that would not fit is refused
before anything is written, with the size it needs, instead of failing halfway with "No space left on device"."""

from __future__ import annotations

import os

from dcp_plugin.errors import CheckpointSaveError

MEMORY_FILESYSTEMS = ("tmpfs", "ramfs", "hugetlbfs")
"""Filesystems whose files live in host memory."""


def mount_of(path: str) -> tuple[str, str] | None:
    """``(mount point, filesystem type)`` of the mount holding ``path`` (Linux; ``None`` where unknown)."""
    path = _existing(os.path.realpath(path))
    try:
        with open("/proc/self/mounts", encoding="utf-8", errors="replace") as handle:
            mounts = [line.split()[1:3] for line in handle if len(line.split()) >= 3]
    except OSError:
        return None
    best: tuple[str, str] | None = None
    for point, kind in mounts:
        point = point.replace("\\040", " ")
        inside = path == point or path.startswith(point.rstrip("/") + "/")
        if inside and (best is None or len(point) >= len(best[0])):
            best = (point, kind)
    return best


def check_room(directory: str, needed: int, what: str) -> None:
    """Raise :class:`CheckpointSaveError` if ``directory`` is in host memory and has less than ``needed`` bytes
    free (``what`` says what they are for). Disks are not checked: their free space is not fixed in advance."""
    found = mount_of(directory)
    if found is None or found[1] not in MEMORY_FILESYSTEMS:
        return
    point, kind = found
    stats = os.statvfs(_existing(directory))
    free = stats.f_bavail * stats.f_frsize
    if needed <= free:
        return
    shm_size = -(-needed * 2 // 2**30)
    raise CheckpointSaveError(
        f"{directory} is in host memory ({kind} mounted at {point}) with {size_text(free)} free, but this save needs "
        f"about {size_text(needed)} there ({what}); nothing was written. Enlarge it (docker run --shm-size="
        f"{shm_size}g, or mount -o remount,size=... {point}), keep fewer checkpoints (retention), or use a disk."
    )


def _existing(path: str) -> str:
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    return path


def size_text(count: int, digits: int = 1) -> str:
    """``count`` bytes as people read them (``3.0 GiB``)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if count < 1024 or unit == "TiB":
            return f"{count:.{digits}f} {unit}" if unit != "B" else f"{count} B"
        count /= 1024  # type: ignore[assignment]
    return f"{count} B"


__all__ = ["MEMORY_FILESYSTEMS", "check_room", "mount_of", "size_text"]
