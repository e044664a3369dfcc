"""Whether a tensor's memory was written since a point in time, asked of the kernel instead of reading the bytes.

Linux (5.11+ for unprivileged use, 6.7+ for ``PAGEMAP_SCAN``) can track writes to a range of memory without a
fault reaching user space: the range is registered with a ``userfaultfd`` in *asynchronous write-protect* mode
(``UFFD_FEATURE_WP_ASYNC``); a protected page that is written is unprotected by the kernel, which marks it
*written*; ``PAGEMAP_SCAN`` on ``/proc/self/pagemap`` reports the written pages and protects them again in the same
step. Every write made through this process's page tables is seen: in-place ops, writes through ``.data`` or a
NumPy view, ``copy_`` from ``load_state_dict``, a file read into the memory, ``/proc/self/mem``, another process's
``process_vm_writev``, pages dropped with ``madvise``. It costs about 0.2 ms per 200 MiB to ask and nothing while
nobody writes.

**The memory, not the name, is the unit.** The kernel keeps one mark per page for the whole process, and reading
the marks of a range clears them. So this module reads them for everybody: one process-wide :class:`_Registry`
folds every written page it finds into a generation counter per watched *region* (the whole pages of a tensor),
and each :class:`Watch` remembers the generation at which it was armed. A watch is unwritten only while no write
to any page of its region was seen since; whoever asked first, the marks are never lost to the others. Two
names of one storage (tied weights), two checkpointers of one model and two tensors viewing overlapping memory
all see every write.

**When in doubt, fingerprint.** Only memory whose every write goes through this process's page tables is
watched: private anonymous memory of CPU tensors. Shared memory, file mappings, pinned memory a device copies
into, tensors smaller than :data:`MIN_BYTES`, and every tensor on a system without this facility get
:func:`watch` ``None``: their content is fingerprinted at every save instead. Pages the kernel fills through a
long-term pin (io_uring fixed buffers, RDMA registrations) are written without a page-table write and never
marked: once the process holds such pins (``VmPin`` in ``/proc/self/status``), nothing is trusted to the watch
any more. The bytes of the partial pages at a tensor's edges (shared with other memory) are compared in full.
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
from dataclasses import dataclass, field
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
_PAGEMAP_SCAN = 0xC0606610
_PM_SCAN_WP_MATCHING = 1 << 0
_PM_SCAN_CHECK_WPASYNC = 1 << 1
_PAGE_IS_WRITTEN = 1 << 1
_PAGE_IS_PRESENT = 1 << 3
_PAGE_IS_SWAPPED = 1 << 4
_VEC_LEN = 64


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
        self._vec = (ctypes.c_uint64 * (3 * _VEC_LEN))()

    def register(self, start: int, end: int) -> None:
        fcntl.ioctl(
            self.uffd, _UFFDIO_REGISTER, bytearray(struct.pack("QQQQ", start, end - start, _UFFDIO_REGISTER_MODE_WP, 0))
        )

    def _scan(self, start: int, end: int, flags: int, inverted: int, mask: int) -> list[tuple[int, int]] | None:
        """The page ranges of ``[start, end)`` matching ``mask`` (after ``inverted``); ``None`` if the kernel cannot
        say (e.g. part of the range is no longer registered: unmapped and mapped again)."""
        found: list[tuple[int, int]] = []
        address = start
        while address < end:
            arg = bytearray(
                struct.pack(
                    "12Q", 96, flags, address, end, 0, ctypes.addressof(self._vec), _VEC_LEN, 0, inverted, mask, 0,
                    mask,
                )
            )  # fmt: skip
            try:
                count = fcntl.ioctl(self.pagemap, _PAGEMAP_SCAN, arg, True)
            except OSError:
                return None
            found.extend((self._vec[3 * i], self._vec[3 * i + 1]) for i in range(count))
            walk_end = struct.unpack_from("Q", arg, 32)[0]
            if walk_end <= address:
                return None
            address = walk_end
        return found

    def take_written(self, start: int, end: int) -> list[tuple[int, int]] | None:
        """The written page ranges of ``[start, end)``, protected again in the same step (so a write that races
        with the scan is either reported now or marked for the next one); ``None`` if the kernel cannot say."""
        written = self._scan(start, end, _PM_SCAN_WP_MATCHING | _PM_SCAN_CHECK_WPASYNC, 0, _PAGE_IS_WRITTEN)
        if written is None:
            return None
        # Pages that are neither present nor swapped out were dropped (madvise DONTNEED, a reclaimed MADV_FREE):
        # they read back as zeros, although nothing wrote them.
        holes = self._scan(start, end, 0, _PAGE_IS_PRESENT | _PAGE_IS_SWAPPED, _PAGE_IS_PRESENT | _PAGE_IS_SWAPPED)
        return None if holes is None else written + holes


def _pinned_kib() -> int:
    """Long-term pinned memory of this process (io_uring fixed buffers, RDMA registrations), in KiB."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as status:
            for line in status:
                if line.startswith("VmPin:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


@dataclass
class _Region:
    """The whole pages of one watched tensor, and the last generation in which a write to them was seen."""

    start: int
    end: int
    storage: weakref.ref
    last_write: int


@dataclass
class _Registry:
    """The process's one reader of the kernel's marks: every mark it reads is folded into ``last_write`` of every
    region containing the page, so a watch armed earlier still sees the write, whoever read the marks."""

    kernel: _Kernel
    generation: int = 0
    regions: dict[tuple[int, int], _Region] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def collect(self, start: int, end: int) -> None:
        """Read (and clear) the marks of ``[start, end)``; each region touching a written page gets a new
        generation. Called with ``lock`` held."""
        written = self.kernel.take_written(start, end)
        if written == []:
            return
        self.generation += 1
        touched = [(start, end)] if written is None else written
        for region in self.regions.values():
            if any(low < region.end and high > region.start for low, high in touched):
                region.last_write = self.generation

    def region(self, start: int, end: int, storage: Any) -> _Region | None:
        """The region of ``[start, end)`` of ``storage``, registered with the kernel and armed on first use;
        ``None`` where the memory cannot be watched."""
        key = (start, end)
        known = self.regions.get(key)
        if known is not None and known.storage() is storage:
            return known
        for dead in [k for k, r in self.regions.items() if r.storage() is None]:
            del self.regions[dead]
        if not _private_anonymous(start, end):
            return None
        try:
            self.kernel.register(start, end)
        except OSError as err:  # EBUSY: watched by another userfaultfd of the program; EINVAL: not watchable
            log.debug("Cannot watch a tensor's memory for writes (%s); it is fingerprinted at every save.", err)
            return None
        region = _Region(start, end, weakref.ref(storage), self.generation)
        self.regions[key] = region
        # Pages not protected yet count as written: this protects the whole range, and any write to pages of
        # overlapping regions that nobody had read yet is kept for those.
        self.collect(start, end)
        region.last_write = self.generation
        return region


_state_lock = threading.Lock()
_state: dict[str, Any] = {}


def _registry() -> _Registry | None:
    """The process's write tracking, or ``None`` where the system has none or it is no longer trusted (asked once
    per process and again in a forked child, whose memory the parent's registrations do not cover)."""
    with _state_lock:
        if _state.get("pid") != os.getpid():
            _state.clear()
            _state["pid"] = os.getpid()
            _state["registry"] = _new_registry()
        return _state["registry"]


def trustworthy() -> bool:
    """Whether the watch can still vouch for this process's memory; call before asking about a save's tensors
    and again after arming them. Once the process holds long-term pinned memory (``VmPin``: io_uring fixed
    buffers, RDMA registrations), which the kernel fills without marking pages written, it never can again."""
    if _registry() is None:
        return False
    if _pinned_kib() == 0:
        return True
    with _state_lock:
        if _state.get("registry") is not None:
            log.info(
                "This process holds long-term pinned memory (io_uring fixed buffers or RDMA registrations), which "
                "the kernel can fill without marking pages written: frozen tensors are fingerprinted at every save "
                "from now on."
            )
        _state["registry"] = None
    return False


def _new_registry() -> _Registry | None:
    if not (sys.platform.startswith("linux") and os.uname().machine in _SYS_USERFAULTFD):
        return None
    try:
        return _Registry(_Kernel())
    except (OSError, AttributeError) as err:
        log.debug("No write tracking here (%s): frozen tensors are fingerprinted at every save.", err)
        return None


def available() -> bool:
    """Whether this process can watch tensor memory for writes."""
    return _registry() is not None


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
    """One tensor's watched pages as of one point in time (the generation it was armed at), and a copy of its bytes
    in the pages it shares with other memory; :meth:`unwritten` says whether it still holds what it held."""

    identity: tuple[Any, ...]
    start: int
    end: int
    armed_at: int
    edges: bytes
    storage: weakref.ref  # dead once the storage is freed, even if new memory comes at the same address
    pid: int

    def unwritten(self, tensor: torch.Tensor) -> bool:
        """Whether ``tensor`` is the same memory as when this watch was armed, and none of it was written since."""
        if self.pid != os.getpid() or not _watchable(tensor) or _identity(tensor) != self.identity:
            return False
        storage = tensor.untyped_storage()
        if self.storage() is not storage or _edges(tensor, self.start, self.end) != self.edges:
            return False
        registry = _registry()
        if registry is None:
            return False
        with registry.lock:
            region = registry.regions.get((self.start, self.end))
            if region is None or region.storage() is not storage:
                return False
            registry.collect(self.start, self.end)
            return region.last_write <= self.armed_at


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


def watch(tensor: torch.Tensor) -> Watch | None:
    """A watch on ``tensor``'s memory as of now: every write from here on shows in :meth:`Watch.unwritten`.
    ``None`` where the memory cannot be watched: the caller fingerprints the tensor's content instead."""
    if not _watchable(tensor):
        return None
    if torch.cuda.is_initialized() and tensor.is_pinned():  # a device copies into it, past the page tables
        return None
    storage = tensor.untyped_storage()
    if storage.is_shared():  # another process may write it
        return None
    registry = _registry()
    if registry is None:
        return None
    start, end = _pages(tensor)
    if end <= start:
        return None
    identity = _identity(tensor)
    with registry.lock:
        region = registry.region(start, end, storage)
        if region is None:
            return None
        registry.collect(start, end)  # what was written before now is not this watch's concern
        armed_at = registry.generation
    # the edges are read after arming, so that a write in between shows at the next save
    return Watch(identity, start, end, armed_at, _edges(tensor, start, end), weakref.ref(storage), os.getpid())


__all__ = ["MIN_BYTES", "Watch", "available", "trustworthy", "watch"]
