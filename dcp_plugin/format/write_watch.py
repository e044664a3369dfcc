"""Whether a tensor's memory was written since a point in time, asked of the kernel instead of reading the bytes.

Linux (5.11+ for unprivileged use, 6.7+ for ``PAGEMAP_SCAN``) can track writes to a range of memory without a
fault reaching user space: the range is registered with a ``userfaultfd`` in *asynchronous write-protect* mode
(``UFFD_FEATURE_WP_ASYNC``); arming it write-protects its pages; the first write to a page afterwards is
resolved by the kernel, which marks the page *written*; ``PAGEMAP_SCAN`` on ``/proc/self/pagemap`` reports
written pages. Every write made through this process's page tables is seen: in-place ops, writes through
``.data`` or a NumPy view, ``copy_`` from ``load_state_dict``, a file read into the memory. It costs about
0.2 ms per 200 MiB to ask, 4 ms per 200 MiB to arm again after a write, and nothing while nobody writes.

Only memory whose every write goes through this process's page tables is watched: private anonymous memory of
CPU tensors (not shared memory, not file mappings, not pinned memory a device copies into). Everything else
(and every tensor on a system without this facility) gets :func:`watch` ``None``: its content is fingerprinted
at every save instead. Registration is per range, so nothing process-wide is reset.
"""

from __future__ import annotations

import ctypes
import fcntl
import logging
import os
import struct
import sys
import threading
import weakref
from dataclasses import dataclass
from typing import Any

import torch

log = logging.getLogger(__name__)

MIN_BYTES = 256 * 1024
"""Smaller tensors are fingerprinted: that costs microseconds, and each watched range splits a mapping."""

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_SYS_USERFAULTFD = {"x86_64": 323, "aarch64": 282}
_UFFD_USER_MODE_ONLY = 1
_UFFD_API = 0xAA
_UFFD_FEATURE_WP_UNPOPULATED = 1 << 13
_UFFD_FEATURE_WP_ASYNC = 1 << 15
_UFFDIO_API = 0xC018AA3F
_UFFDIO_REGISTER = 0xC020AA00
_UFFDIO_REGISTER_MODE_WP = 1 << 1
_UFFDIO_WRITEPROTECT = 0xC018AA06
_UFFDIO_WRITEPROTECT_MODE_WP = 1
_PAGEMAP_SCAN = 0xC0606610
_PM_SCAN_CHECK_WPASYNC = 1 << 1
_PAGE_IS_WRITTEN = 1 << 1


class _Kernel:
    """This process's userfaultfd (asynchronous write-protect) and ``/proc/self/pagemap`` descriptors."""

    def __init__(self) -> None:
        machine = os.uname().machine
        libc = ctypes.CDLL(None, use_errno=True)
        libc.syscall.restype = ctypes.c_long
        fd = libc.syscall(_SYS_USERFAULTFD[machine], os.O_CLOEXEC | os.O_NONBLOCK | _UFFD_USER_MODE_ONLY)
        if fd < 0:
            raise OSError(ctypes.get_errno(), "userfaultfd")
        try:
            api = bytearray(struct.pack("QQQ", _UFFD_API, _UFFD_FEATURE_WP_ASYNC | _UFFD_FEATURE_WP_UNPOPULATED, 0))
            fcntl.ioctl(fd, _UFFDIO_API, api)
            self.pagemap = os.open("/proc/self/pagemap", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            os.close(fd)
            raise
        self.uffd = fd
        self.pid = os.getpid()
        self._vec = (ctypes.c_uint64 * 3)()
        self._lock = threading.Lock()

    def register(self, start: int, end: int) -> None:
        fcntl.ioctl(
            self.uffd, _UFFDIO_REGISTER, bytearray(struct.pack("QQQQ", start, end - start, _UFFDIO_REGISTER_MODE_WP, 0))
        )

    def arm(self, start: int, end: int) -> None:
        fcntl.ioctl(
            self.uffd,
            _UFFDIO_WRITEPROTECT,
            bytearray(struct.pack("QQQ", start, end - start, _UFFDIO_WRITEPROTECT_MODE_WP)),
        )

    def written(self, start: int, end: int) -> bool:
        """Whether a page of the range was written since it was armed (``True`` if the kernel cannot say)."""
        with self._lock:  # one result vector
            arg = struct.pack(
                "12Q", 96, _PM_SCAN_CHECK_WPASYNC, start, end, 0, ctypes.addressof(self._vec), 1, 0, 0,
                _PAGE_IS_WRITTEN, 0, _PAGE_IS_WRITTEN,
            )  # fmt: skip
            try:
                found = fcntl.ioctl(self.pagemap, _PAGEMAP_SCAN, bytearray(arg), True)
            except OSError:  # e.g. EPERM: part of the range is no longer registered (unmapped and mapped again)
                return True
        return found != 0


_kernel_lock = threading.Lock()
_kernel_state: dict[str, Any] = {}


def _kernel() -> _Kernel | None:
    """The process's write tracking, or ``None`` where the system has none (asked once per process)."""
    with _kernel_lock:
        kernel = _kernel_state.get("kernel")
        if "kernel" in _kernel_state and (kernel is None or kernel.pid == os.getpid()):
            return kernel
        kernel = None
        if sys.platform.startswith("linux") and os.uname().machine in _SYS_USERFAULTFD:
            try:
                kernel = _Kernel()
            except (OSError, AttributeError) as err:
                log.debug("No write tracking here (%s): frozen tensors are fingerprinted at every save.", err)
        _kernel_state["kernel"] = kernel
        return kernel


def available() -> bool:
    """Whether this process can watch tensor memory for writes."""
    return _kernel() is not None


def _identity(tensor: torch.Tensor) -> tuple[Any, ...]:
    storage = tensor.untyped_storage()
    return (
        tensor.data_ptr(),
        storage.data_ptr(),
        storage.nbytes(),
        tuple(tensor.shape),
        tuple(tensor.stride()),
        tensor.storage_offset(),
        tensor.dtype,
        tensor._version,
    )


@dataclass
class Watch:
    """The armed pages inside one tensor, and a copy of its bytes in the pages it shares with other memory (whose
    writes would make the pages look written); :meth:`unwritten` says whether it still holds what it held."""

    identity: tuple[Any, ...]
    start: int
    end: int
    edges: bytes
    storage: weakref.ref  # dead once the storage is freed, even if new memory comes at the same address

    def unwritten(self, tensor: torch.Tensor) -> bool:
        """Whether ``tensor`` is the same memory as when this watch was armed, and none of it was written."""
        kernel = _kernel()
        if kernel is None or not _watchable(tensor) or _identity(tensor) != self.identity:
            return False
        if self.storage() is not tensor.untyped_storage():
            return False
        return _edges(tensor, self.start, self.end) == self.edges and not kernel.written(self.start, self.end)


def _pages(tensor: torch.Tensor) -> tuple[int, int]:
    """The whole pages inside the tensor's bytes."""
    begin = tensor.data_ptr()
    return (begin + _PAGE - 1) & ~(_PAGE - 1), (begin + tensor.nbytes) & ~(_PAGE - 1)


def _edges(tensor: torch.Tensor, start: int, end: int) -> bytes:
    """The tensor's bytes before ``start`` and from ``end`` (less than a page each)."""
    begin, stop = tensor.data_ptr(), tensor.data_ptr() + tensor.nbytes
    return ctypes.string_at(begin, start - begin) + ctypes.string_at(end, stop - end)


def _watchable(tensor: Any) -> bool:
    return (
        type(tensor) is torch.Tensor  # not a DTensor or another subclass: its memory is elsewhere
        and tensor.device.type == "cpu"
        and tensor.layout == torch.strided
        and tensor.nbytes >= MIN_BYTES
        and tensor.is_contiguous()
    )


def _private_anonymous(start: int, end: int) -> bool:
    """Whether ``[start, end)`` lies in private anonymous mappings (writes only through this process)."""
    covered = start
    with open("/proc/self/maps", encoding="ascii", errors="replace") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            low, high = (int(x, 16) for x in fields[0].split("-"))
            if high <= start or low >= end:
                continue
            if fields[1][3] != "p" or fields[4] != "0" or low > covered:
                return False
            covered = high
    return covered >= end


def watch(tensor: torch.Tensor, previous: Watch | None = None) -> Watch | None:
    """Arm a watch on ``tensor``'s memory now (``previous``: its last watch, armed again if it still fits).
    ``None`` where the memory cannot be watched: the caller fingerprints the tensor's content instead."""
    kernel = _kernel()
    if kernel is None or not _watchable(tensor):
        return None
    if torch.cuda.is_initialized() and tensor.is_pinned():  # a device copies into it, past the page tables
        return None
    storage = tensor.untyped_storage()
    if storage.is_shared():  # another process may write it
        return None
    start, end = _pages(tensor)
    identity = _identity(tensor)
    try:
        if previous is None or previous.identity != identity or previous.storage() is not storage:
            if not _private_anonymous(start, end):
                return None
            kernel.register(start, end)
        kernel.arm(start, end)
    except OSError as err:  # EBUSY: watched by another userfaultfd of the program; EINVAL: not watchable
        log.debug("Cannot watch a tensor's memory for writes (%s); it is fingerprinted at every save.", err)
        return None
    # the edges are read after arming, so that a write in between shows at the next save
    return Watch(identity, start, end, _edges(tensor, start, end), weakref.ref(storage))


__all__ = ["MIN_BYTES", "Watch", "available", "watch"]
