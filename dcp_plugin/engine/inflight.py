"""Checkpoint writes in flight in this process, by URL, whichever engine started them.

A background save is invisible under its final name until it commits. Code that asks about that name in the
meantime (a load by another plugin or manager instance, Lightning's ``ModelCheckpoint`` choosing a ``-vN``
name, a removal) must see the write: it asks here, and waits for it where an answer needs the committed
checkpoint. Engines register a write before DCP starts it and finish it once it committed or was aborted, so
waiting here never depends on the waiter (no deadlock when the writer is the waiter's own engine).
"""

from __future__ import annotations

import os
import threading
from collections import Counter

_lock = threading.Condition()
_writing: Counter[str] = Counter()


def key(url: str | os.PathLike[str]) -> str:
    """The registry key of a checkpoint URL: local paths absolute, with symbolic links resolved (a link such as
    Lightning's ``last.ckpt`` names the write of its target)."""
    text = os.fspath(url).rstrip("/")
    if "://" in text and not text.startswith("file://"):
        return text
    text = text.removeprefix("file://")
    return os.path.realpath(text)


def begin(url: str) -> str:
    """Record that ``url`` is being written; returns the key to pass to :func:`finish`."""
    k = key(url)
    with _lock:
        _writing[k] += 1
    return k


def finish(k: str) -> None:
    """The write recorded by :func:`begin` committed or was aborted."""
    with _lock:
        _writing[k] -= 1
        if _writing[k] <= 0:
            del _writing[k]
        _lock.notify_all()


def is_writing(url: str | os.PathLike[str]) -> bool:
    """Whether a write of ``url`` is in flight in this process."""
    k = key(url)
    with _lock:
        return k in _writing


def is_writing_under(root: str | os.PathLike[str]) -> bool:
    """Whether a write of any checkpoint directly under the directory ``root`` is in flight."""
    prefix = key(root) + "/"
    with _lock:
        return any(k.startswith(prefix) and "/" not in k[len(prefix) :] for k in _writing)


def wait_for(url: str | os.PathLike[str], timeout: float | None = None) -> bool:
    """Block until no write of ``url`` is in flight in this process; False if ``timeout`` passed first."""
    k = key(url)
    with _lock:
        return _lock.wait_for(lambda: k not in _writing, timeout)


def wait_under(root: str | os.PathLike[str], timeout: float | None = None) -> bool:
    """Block until no write of a checkpoint directly under ``root`` is in flight in this process."""
    prefix = key(root) + "/"
    with _lock:
        return _lock.wait_for(
            lambda: not any(k.startswith(prefix) and "/" not in k[len(prefix) :] for k in _writing), timeout
        )


__all__ = ["begin", "finish", "is_writing", "is_writing_under", "key", "wait_for", "wait_under"]
