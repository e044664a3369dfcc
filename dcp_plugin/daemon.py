"""Lifecycle of DCP's writer daemon (``async_mode="process"``): one per trainer process, shared by all engines.

DCP starts the daemon on first use and offers no way to stop it, nor to recover once it died: both need
DCP's private ``_async_process_executor`` module (its ``_CHECKPOINT_PROCESS`` global), which is touched
only here. The daemon re-imports ``__main__``; a script without the ``if __name__ == "__main__":`` guard
would run training again in it and hang, so that is checked before the daemon is started.
"""

from __future__ import annotations

import functools
import logging
import re
import sys
from typing import Any

from dcp_plugin.errors import ConfigError

log = logging.getLogger(__name__)

_users: set[int] = set()


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


def prepare() -> None:
    """Before a ``process`` save: check the ``__main__`` guard and forget a daemon that died."""
    check_main_guard()
    executor = _executor()
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
    executor = _executor()
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
