"""The one exit-time flush: saves still in flight when the interpreter exits are committed (or their errors
logged), then DCP's writer daemon is stopped.

Every :class:`~dcp_plugin.engine.checkpoint_engine.CheckpointEngine` registers itself here (weakly: an engine that was
garbage-collected is forgotten). This covers loops that never call ``close()``, Lightning strategies that
never call ``teardown()`` and Accelerate scripts that never call ``end_training()``.
"""

from __future__ import annotations

import atexit
import logging
import weakref
from typing import Any

from dcp_plugin.engine import daemon

log = logging.getLogger(__name__)

_live: weakref.WeakSet[Any] = weakref.WeakSet()


def track(engine: Any) -> None:
    """Flush ``engine`` (anything with ``wait()``) at interpreter exit unless it is gone by then."""
    _live.add(engine)


def flush_all() -> None:
    for engine in list(_live):
        try:
            engine.wait()
        except BaseException as err:  # noqa: BLE001 - at exit there is nobody left to raise to
            log.error("A checkpoint save that was still in flight at exit failed: %s", err)
    daemon.shutdown()


atexit.register(flush_all)
