"""How a failed DCP call reaches the caller: one line per failing rank, the kind of a project error kept, and
the callbacks of a finished save run without letting their own errors replace the save's outcome."""

from __future__ import annotations

import logging
from typing import Any

from dcp_plugin.errors import CheckpointCorruptError, CheckpointError, CheckpointLoadError, CheckpointSaveError

log = logging.getLogger("dcp_plugin.engine.checkpoint_engine")  # a save's warnings come from the engine


def cleanup_after_failure(on_failure: Any, url: str) -> None:
    """Run a failed save's cleanup without letting its own error replace the save's."""
    if on_failure is None:
        return
    try:
        on_failure()
    except Exception as cleanup_error:  # noqa: BLE001
        log.warning("Cleanup after the failed save of %s failed: %s", url, cleanup_error)


def call_done(on_done: Any, metadata: Any = None) -> None:
    """Call a save's ``on_done(metadata)`` (``None`` when the save failed); its errors are logged, never raised."""
    if on_done is None:
        return
    try:
        on_done(metadata)
    except Exception as err:  # noqa: BLE001 - bookkeeping must not replace the save's outcome
        log.warning("Finishing the bookkeeping of a save failed: %s", err)


def _causes(err: BaseException) -> list[BaseException]:
    """The per-rank causes inside DCP's CheckpointException (or the error itself)."""
    failures = getattr(err, "failures", None)
    if isinstance(failures, dict) and failures:
        return [failure[0] if isinstance(failure, tuple) else failure for _, failure in sorted(failures.items())]
    return [err]


def project_error(err: BaseException, fallback: type[CheckpointError], message: str) -> CheckpointError:
    """Keep the kind of a project error raised inside DCP (a checkpoint committed by another writer, a damaged
    or unsafe file, unreachable storage), so callers can catch it by type; anything else becomes ``fallback``."""
    for cause in _causes(err):
        if isinstance(cause, CheckpointError) and not isinstance(cause, (CheckpointSaveError, CheckpointLoadError)):
            return type(cause)(message)
        if isinstance(cause, CheckpointCorruptError):
            return CheckpointCorruptError(message)
    return fallback(message)


def describe(err: BaseException) -> str:
    """One line per failing rank (DCP's CheckpointException carries a traceback per rank; the full text
    stays available on ``__cause__``)."""
    failures = getattr(err, "failures", None)
    if isinstance(failures, dict) and failures:
        parts = []
        for rank, failure in sorted(failures.items()):
            cause = failure[0] if isinstance(failure, tuple) else failure
            parts.append(f"rank {rank}: {_one_line(cause)}")
        return "; ".join(parts)
    return _one_line(err)


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text if text.startswith(type(err).__name__) else f"{type(err).__name__}: {text}"


__all__ = ["call_done", "cleanup_after_failure", "describe", "project_error"]
