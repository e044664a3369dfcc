"""Lower CPU and I/O priority for the threads that write checkpoints in the background.

Training and the background writer share the host's cores and disk. The writer only has to finish before the
next save, so on Linux DCP's write runs in a thread of its own (:func:`run_lowered`) that lowers its nice value
and I/O priority first; the writer threads DCP starts from it inherit both. Linux keeps nice values per thread,
so the training threads keep theirs, and so do the long-lived threads around the write (DCP's executor thread,
the writer daemon's main thread, which must answer the trainer promptly when the next save is handed over).
Nothing here is raised: a host that refuses (another OS, a seccomp profile) keeps normal priority.
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform
import sys
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

log = logging.getLogger(__name__)

MAX_NICE = 19

_IOPRIO_WHO_PROCESS = 1  # with a thread id: that thread only
_IOPRIO_CLASS_BE = 2
_IOPRIO_CLASS_SHIFT = 13
_IOPRIO_LOWEST_BE_LEVEL = 7
_SYS_IOPRIO_SET = {"x86_64": 251, "aarch64": 30, "ppc64le": 273, "s390x": 282}


def thread_nice(native_id: int | None = None) -> int:
    """The nice value of a thread of this process (default: the calling thread); Linux only."""
    return os.getpriority(os.PRIO_PROCESS, threading.get_native_id() if native_id is None else native_id)


def lower_current_thread(nice_increment: int) -> bool:
    """Add ``nice_increment`` to the calling thread's nice value (at most 19) and move its I/O to the lowest
    best-effort level; threads it starts afterwards inherit both. Returns whether the CPU priority changed."""
    if nice_increment <= 0 or not sys.platform.startswith("linux"):
        return False
    tid = threading.get_native_id()
    changed = False
    try:
        current = os.getpriority(os.PRIO_PROCESS, tid)
        target = min(MAX_NICE, current + nice_increment)
        if target > current:
            os.setpriority(os.PRIO_PROCESS, tid, target)
            changed = True
    except OSError as err:
        log.debug("Could not lower the writer thread's CPU priority: %s", err)
    _lower_io_priority(tid)
    return changed


def run_lowered(nice_increment: int, work: Callable[[], T]) -> T:
    """``work()`` in a new thread that first lowers its priority by ``nice_increment``; returns its result or
    raises its error here. Without an increment (or off Linux), ``work()`` runs on the calling thread."""
    if nice_increment <= 0 or not sys.platform.startswith("linux"):
        return work()
    outcome: dict[str, Any] = {}

    def run() -> None:
        lower_current_thread(nice_increment)
        try:
            outcome["result"] = work()
        except BaseException as err:  # noqa: BLE001 - raised on the calling thread below
            outcome["error"] = err

    thread = threading.Thread(target=run, name="dcp-plugin-writer", daemon=True)
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def _lower_io_priority(tid: int) -> None:
    """Best effort: ``ioprio_set`` has no Python wrapper; schedulers without priorities (``none``,
    ``mq-deadline``) ignore it, BFQ honours it. Never the idle class, which could starve the writer."""
    number = _SYS_IOPRIO_SET.get(platform.machine())
    if number is None:
        return
    value = (_IOPRIO_CLASS_BE << _IOPRIO_CLASS_SHIFT) | _IOPRIO_LOWEST_BE_LEVEL
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.syscall(number, _IOPRIO_WHO_PROCESS, tid, value) != 0:
            log.debug("ioprio_set failed: %s", os.strerror(ctypes.get_errno()))
    except (OSError, AttributeError) as err:
        log.debug("ioprio_set unavailable: %s", err)


__all__ = ["MAX_NICE", "lower_current_thread", "run_lowered", "thread_nice"]
