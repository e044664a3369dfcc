"""Byte-level reading for the verifying readers: regions of local files read straight into the caller's buffer,
whole-file hashing, and the sequential helpers of the streamed path."""

from __future__ import annotations

import io
import os
from collections.abc import Callable
from typing import Any

import xxhash

CHUNK = 16 * 2**20


class FileRegion(io.RawIOBase):
    """A seekable binary stream over ``length`` bytes of the open file ``fd`` starting at ``base``.

    Reads go from the page cache straight into the caller's buffer (``os.preadv``): ``torch.load`` of a stored
    tensor copies its bytes once, into the tensor it allocates, with no mapping, no intermediate buffer and
    without holding the GIL while the kernel copies."""

    def __init__(self, fd: int, base: int, length: int) -> None:
        super().__init__()
        self._fd, self._base, self._length = fd, base, length
        self._position = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        target = memoryview(buffer).cast("B")
        wanted = max(0, min(len(target), self._length - self._position))
        done = 0
        while done < wanted:
            count = os.preadv(self._fd, [target[done:wanted]], self._base + self._position + done)
            if not count:
                break  # the file shrank under us; the caller sees a short read
            done += count
        target.release()
        self._position += done
        return done

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._position, io.SEEK_END: self._length}[whence]
        self._position = max(0, base + offset)
        return self._position

    def tell(self) -> int:
        return self._position


def hash_descriptor(fd: int, progress: Callable[[int], None] | None = None) -> str:
    """The xxh3-128 digest of the open file ``fd``, read with large sequential reads into one reused buffer (the
    disk is read at full speed and the pages stay cached for the items read next). Neither the reads nor the
    hashing hold the GIL. ``progress`` is called with the byte count of each chunk hashed."""
    hasher = xxhash.xxh3_128()
    buffer = bytearray(CHUNK)
    view = memoryview(buffer)
    offset = 0
    while True:
        count = os.preadv(fd, [buffer], offset)
        if not count:
            break
        hasher.update(view[:count])
        offset += count
        if progress is not None:
            progress(count)
    view.release()
    return hasher.hexdigest()


def span(info: Any) -> tuple[int, int]:
    return (info.offset, info.length)


def read_exactly(stream: Any, length: int) -> bytes:
    parts, left = [], length
    while left > 0:
        chunk = stream.read(left)
        if not chunk:
            break
        parts.append(chunk)
        left -= len(chunk)
    return parts[0] if len(parts) == 1 else b"".join(parts)


def advance(stream: Any, hasher: Any, position: int, target: int, hashing: bool) -> int:
    """Move from ``position`` to ``target``: hash the bytes in between when verifying, else seek past them."""
    if target <= position:
        return position
    if not hashing:
        stream.seek(target)
        return target
    while position < target:
        chunk = stream.read(min(CHUNK, target - position))
        if not chunk:
            break
        hasher.update(chunk)
        position += len(chunk)
    return position
