"""Lifecycle of DCP's writer daemon (``async_mode="process"``): one per trainer process, shared by all engines.

DCP starts the daemon on first use and offers no way to stop it, nor to recover once it died: both need
DCP's private ``_async_process_executor`` module (its ``_CHECKPOINT_PROCESS`` global), which is touched
only here. The daemon re-imports ``__main__``; a script without the ``if __name__ == "__main__":`` guard
would run training again in it and hang, so that is checked before the daemon is started.

DCP's daemon logs several INFO lines per save to its own stderr handler; the daemons started through this
module (and by DCP itself once :func:`prepare` ran) log warnings and errors only. :func:`start` starts the
daemon ahead of the first save, in the background, so that save does not wait for it.

DCP sets the daemon up with a collective over the saving ranks' process group, so it needs
``torch.distributed`` initialized even for one process. A process that saves alone without it (a single-device
run) gets its daemon started here from the same description built by hand (rank 0 of 1, a free local port for the
daemon's own store): the training process itself never initializes ``torch.distributed``.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import sys
import threading
import warnings
from typing import Any

from dcp_plugin.errors import ConfigError

log = logging.getLogger(__name__)

_users: set[int] = set()
_starting: threading.Thread | None = None
_start_error: BaseException | None = None


def register(user: Any) -> None:
    """``user`` (an engine in ``process`` mode) may start the daemon; it is stopped when the last one leaves."""
    _users.add(id(user))


def unregister(user: Any) -> None:
    _users.discard(id(user))
    if not _users:
        shutdown()


def _executor() -> Any:
    # No public route: DCP keeps its one daemon in this private module's global.
    from torch.distributed.checkpoint import _async_process_executor

    return _async_process_executor


def _quiet_daemon_main(pg_init_info: Any, parent_conn: Any) -> None:
    """The daemon's entry point: DCP's own, with its logging at WARNING instead of INFO."""
    executor = _executor()
    executor._init_logger = _warnings_only_logger
    # A single-process save reaches the daemon with no_dist=True, where DCP warns on each save that it assumes one
    # process: that is the intent.
    warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
    _loud_class()._checkpointing_subprocess(pg_init_info, parent_conn)


def _warnings_only_logger(rank: int) -> None:
    root = logging.getLogger()  # DCP's daemon logs to the root logger of its own process
    root.setLevel(logging.WARNING)
    handler = logging.StreamHandler()
    handler.setLevel(logging.WARNING)
    handler.setFormatter(logging.Formatter(f"[{rank}] %(asctime)s - dcp writer - %(levelname)s - %(message)s"))
    root.addHandler(handler)


@functools.cache
def _loud_class() -> Any:
    return _executor()._AsyncCheckpointProcess


@functools.cache
def _quiet_class() -> Any:
    class QuietCheckpointProcess(_loud_class()):  # type: ignore[misc, valid-type]
        _checkpointing_subprocess = staticmethod(_quiet_daemon_main)

    return QuietCheckpointProcess


def _use_quiet_daemon() -> None:
    """Make DCP start the quiet daemon whenever it starts one (it looks the class up when it does)."""
    executor = _executor()
    _loud_class()
    executor._AsyncCheckpointProcess = _quiet_class()


def _distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def _lone_init_info() -> Any:
    """DCP's ``_ProcessGroupInitInfo`` for a process that saves alone without ``torch.distributed``: what DCP's
    own constructor computes for rank 0 of 1, without the collective (and the default group) it needs for that."""
    from torch.distributed.elastic.utils.distributed import get_free_port

    info = object.__new__(_executor()._ProcessGroupInitInfo)
    info.local_rank, info.global_rank, info.world_size = 0, 0, 1
    info.tcp_store_master_addr, info.tcp_store_master_port = "127.0.0.1", get_free_port()
    info.use_prefix_store = False  # the prefix store reuses the job's MASTER_ADDR/PORT; there is no job here
    info.disable_automatic_gc = os.environ.get("DCP_DISABLE_AUTOMATIC_GC", "0") == "1"
    info.disable_manual_gc = os.environ.get("DCP_DISABLE_MANUAL_GC", "0") == "1"
    return info


def start(group: Any) -> None:
    """Start the daemon now, in the background, if none runs (every rank of ``group`` calls it, like a save;
    ``None`` without ``torch.distributed``: this process alone).

    The next :func:`prepare` waits for it; an error starting it is raised there."""
    global _starting
    prepare()
    executor = _executor()
    if executor._CHECKPOINT_PROCESS is not None or _starting is not None:
        return
    # DCP's description is a collective over the group: on the calling thread, like DCP does
    info = executor._ProcessGroupInitInfo(group) if _distributed() else _lone_init_info()

    def run() -> None:
        global _start_error
        try:
            process = _quiet_class()(info)
        except BaseException as err:  # noqa: BLE001 - raised by the next prepare()
            _start_error = err
            return
        if executor._CHECKPOINT_PROCESS is None:
            executor._CHECKPOINT_PROCESS = process

    _starting = threading.Thread(target=run, name="dcp-plugin-daemon-start", daemon=True)
    _starting.start()


def _finish_start(*, raise_error: bool = False) -> None:
    global _starting, _start_error
    if _starting is not None:
        _starting.join()
        _starting = None
    error, _start_error = _start_error, None
    if error is not None and raise_error:
        raise error
    if error is not None:
        log.warning("Starting the checkpoint writer process ahead of time failed (%s); DCP starts one itself.", error)


def ensure_running(group: Any) -> None:
    """Before a ``process`` save (after :func:`prepare`): without ``torch.distributed`` DCP cannot start the daemon
    itself, so start it here (or finish starting it) and raise if that failed. With it, DCP starts one when needed."""
    if _distributed() or _executor()._CHECKPOINT_PROCESS is not None:
        return
    start(group)
    _finish_start(raise_error=True)


def prepare() -> None:
    """Before a ``process`` save: check the ``__main__`` guard and forget a daemon that died."""
    check_main_guard()
    _use_quiet_daemon()
    _finish_start()
    executor = _executor()
    _forget_inherited(executor)
    _restart_inherited_fd_sharing()
    process = executor._CHECKPOINT_PROCESS
    if process is not None and not process._save_process.is_alive():
        log.warning(
            "The checkpoint writer process (pid %s) died with exit code %s; starting a new one.",
            process._save_process.pid,
            process._save_process.exitcode,
        )
        executor._CHECKPOINT_PROCESS = None


def shutdown() -> None:
    """Stop the daemon if it runs (asks it to terminate, then terminates it)."""
    _finish_start()
    executor = _executor()
    _forget_inherited(executor)
    process = executor._CHECKPOINT_PROCESS
    if process is None:
        return
    executor._CHECKPOINT_PROCESS = None
    try:
        if process._save_process.is_alive():
            process._send(executor._CheckpointSaveProcessControlOpts.TERMINATE)
            process._save_process.join(timeout=10)
    except Exception:  # noqa: BLE001 - pipe already closed
        pass
    if process._save_process.is_alive():
        process._save_process.terminate()
        process._save_process.join(timeout=5)


# -- fork ----------------------------------------------------------------------------------------------------
class _Inherited:
    """A writer daemon handle inherited through ``fork()``: the daemon belongs to the parent. It must never be
    signalled, waited for or stopped from the child (DCP's finaliser would send it TERMINATE), so the handle
    becomes this inert class and is kept until the child exits."""


_inherited: list[Any] = []


def _forget_inherited(executor: Any) -> None:
    """Drop the daemon handle this process inherited from its parent, if any, without touching the daemon."""
    process = executor._CHECKPOINT_PROCESS
    save_process = getattr(process, "_save_process", None)
    if save_process is None or getattr(save_process, "_parent_pid", os.getpid()) == os.getpid():
        return
    executor._CHECKPOINT_PROCESS = None
    pipe = getattr(process, "_process_pipe", None)
    try:
        if pipe is not None:
            pipe.close()  # this process's copy only: the daemon still hears its parent
    except OSError:
        pass
    import multiprocessing.process as mp_process

    # multiprocessing would terminate the parent's daemonic writer at this process's exit (and fail to join it)
    mp_process._children.discard(save_process)  # type: ignore[attr-defined]
    process.__class__ = _Inherited
    _inherited.append(process)


def _restart_inherited_fd_sharing() -> None:
    """The snapshot reaches the daemon as file descriptors served by multiprocessing's resource sharer, a listener
    and thread of this process. A child made by ``os.fork()`` inherits the parent's listener without its thread,
    so its daemon would ask the parent for the child's descriptors; reset it as multiprocessing does in the
    children it starts itself (its ``_afterfork``), and it starts afresh here on first use."""
    from multiprocessing import resource_sharer

    sharer = resource_sharer._resource_sharer  # type: ignore[attr-defined]
    thread = getattr(sharer, "_thread", None)
    if getattr(sharer, "_listener", None) is not None and (thread is None or not thread.is_alive()):
        sharer._afterfork()


def _after_fork_in_child() -> None:
    """In a forked child: the parent's daemon, its start in progress and its users are the parent's."""
    global _starting, _start_error
    _starting, _start_error = None, None
    _users.clear()
    executor = sys.modules.get("torch.distributed.checkpoint._async_process_executor")
    if executor is not None:
        try:
            _forget_inherited(executor)
        except Exception:  # noqa: BLE001 - never fail a fork; prepare() tries again before a save
            pass


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


_GUARD = re.compile(r"""^if\s+__name__\s*==\s*['"]__main__['"]\s*:""", re.MULTILINE)

_GUARD_MESSAGE = (
    "async_mode='process' starts a writer process that re-imports {path}; that script has no "
    '`if __name__ == "__main__":` guard, so the writer would run your training code again and hang. Move the '
    "script's top-level code under such a guard, or use async_mode='thread'."
)


@functools.cache
def _script_has_guard(path: str) -> bool:
    try:
        with open(path, encoding="utf-8") as handle:
            return bool(_GUARD.search(handle.read()))
    except OSError:
        return True  # cannot tell: let DCP try


def check_main_guard() -> None:
    """Raise :class:`ConfigError` if the main script would run again inside the writer process."""
    main = sys.modules.get("__main__")
    if getattr(main, "__name__", "") == "__mp_main__":
        raise ConfigError(_GUARD_MESSAGE.format(path=getattr(main, "__file__", "your script")))
    path = getattr(main, "__file__", None)
    if not path or not path.endswith(".py") or getattr(main, "__spec__", None) is not None:
        return  # interactive session, `python -m module`, or a console entry point
    if not _script_has_guard(path):
        raise ConfigError(_GUARD_MESSAGE.format(path=path))


SHM_DIR = "/dev/shm"


def shared_memory_hint(err: BaseException, state: Any) -> str:
    """For a save that failed because ``/dev/shm`` is full: what it needed, what there is, and the fixes
    (``""`` for any other failure). The snapshot travels to the writer process through ``/dev/shm``."""
    chain, seen = [], set()
    cause: BaseException | None = err
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        chain.append(str(cause))
        cause = cause.__cause__ or cause.__context__
    text = " ".join(chain).lower()
    if "shared memory" not in text and SHM_DIR not in text:
        return ""
    if "no space left" not in text and "errno 28" not in text and "(28)" not in text:
        return ""
    needed = _tensor_bytes(state)
    try:
        stat = os.statvfs(SHM_DIR)
        total, free = stat.f_blocks * stat.f_frsize, stat.f_bavail * stat.f_frsize
        room = f"; {SHM_DIR} holds {_mib(total)} in all, {_mib(free)} free"
    except OSError:
        room = ""
    return (
        f"\n{SHM_DIR} is too small for this snapshot: async_mode='process' hands it to the writer process through "
        f"shared memory and needs about {_mib(needed)} there{room}. Give {SHM_DIR} more room (Docker: "
        f"`docker run --shm-size={_suggested_gib(needed)}g ...`; Kubernetes: an emptyDir with medium: Memory mounted "
        "at /dev/shm), or use async_mode='thread', which needs no shared memory."
    )


def _tensor_bytes(value: Any) -> int:
    import torch  # loaded already: this is a failed save

    if isinstance(value, torch.Tensor):
        return int(value.nbytes)
    if isinstance(value, dict):
        return sum(_tensor_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_tensor_bytes(v) for v in value)
    return 0


def _mib(count: int) -> str:
    return f"{count / 2**20:.1f} MiB"


def _suggested_gib(needed: int) -> int:
    return max(1, -(-2 * needed // 2**30))  # twice the snapshot: room for a second save's buffers
