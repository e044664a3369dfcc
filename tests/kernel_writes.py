"""Ways to change a tensor's memory that bypass torch, for the tests of change detection.

Each function changes the bytes of ``tensor`` (a contiguous CPU tensor) in a way that no version counter sees:
through the kernel (``io_uring`` fixed buffers, ``preadv`` with ``O_DIRECT``, ``/proc/self/mem``), from another
process (``process_vm_writev``), or by dropping its pages (``madvise(MADV_DONTNEED)``: they read back as zeros
although nothing wrote them). The io_uring one registers the memory as a fixed buffer (a long-term pin, as RDMA
does) and has the kernel fill it without a write through this process's page tables.
"""

from __future__ import annotations

import ctypes
import functools
import mmap
import os
import struct
import subprocess
import sys
import tempfile

import torch

from tests.paths import REPO

_LIBC = ctypes.CDLL(None, use_errno=True)
_LIBC.syscall.restype = ctypes.c_long
_LIBC.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
_PAGE = mmap.PAGESIZE
_MADV_DONTNEED = 4
_SYS = {
    "x86_64": {"io_uring_setup": 425, "io_uring_enter": 426, "io_uring_register": 427, "process_vm_writev": 311},
    "aarch64": {"io_uring_setup": 425, "io_uring_enter": 426, "io_uring_register": 427, "process_vm_writev": 271},
}


def _syscall(name: str, *args: int) -> int:
    result = _LIBC.syscall(_SYS[os.uname().machine][name], *[ctypes.c_long(a) for a in args])
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{name}: {os.strerror(err)}")
    return result


def _inner_pages(tensor: torch.Tensor) -> tuple[int, int]:
    start = (tensor.data_ptr() + _PAGE - 1) & ~(_PAGE - 1)
    return start, (tensor.data_ptr() + tensor.nbytes) & ~(_PAGE - 1)


def _file_of(data: bytes) -> int:
    handle, path = tempfile.mkstemp()
    os.write(handle, data)
    os.unlink(path)
    return handle


class FixedBuffer:
    """An ``io_uring`` with ``tensor``'s whole pages registered as fixed buffer 0 (pinned until :meth:`close`);
    ``fixed=False``: nothing registered, reads go to plain addresses (the kernel copies through the page tables)."""

    def __init__(self, tensor: torch.Tensor, fixed: bool = True) -> None:
        self.fixed = fixed
        params = ctypes.create_string_buffer(120)
        self.fd = _syscall("io_uring_setup", 4, ctypes.addressof(params))
        fields = struct.unpack_from("6I", params.raw, 0)
        sq_entries, cq_entries = fields[0], fields[1]
        sq_off = struct.unpack_from("8IQ", params.raw, 40)
        cq_off = struct.unpack_from("8IQ", params.raw, 80)
        self._sq_off, self._cq_off = sq_off, cq_off
        ring_size = max(sq_off[6] + sq_entries * 4, cq_off[5] + cq_entries * 16)
        self._ring = mmap.mmap(self.fd, ring_size, offset=0)
        self._cq = mmap.mmap(self.fd, cq_off[5] + cq_entries * 16, offset=0x8000000)
        self._sqes = mmap.mmap(self.fd, sq_entries * 64, offset=0x10000000)
        self.start, self.end = _inner_pages(tensor)
        if fixed:
            iovec = (ctypes.c_uint64 * 2)(self.start, self.end - self.start)
            _syscall("io_uring_register", self.fd, 0, ctypes.addressof(iovec), 1)  # IORING_REGISTER_BUFFERS

    def read_into(self, offset: int, data: bytes) -> None:
        """Have the kernel read ``data`` (from a file) into the pages at ``offset`` (READ_FIXED, or READ)."""
        source = _file_of(data)
        try:
            sq_tail = struct.unpack_from("I", self._ring, self._sq_off[1])[0]
            mask = struct.unpack_from("I", self._ring, self._sq_off[2])[0]
            index = sq_tail & mask
            opcode = 4 if self.fixed else 22  # IORING_OP_READ_FIXED, IORING_OP_READ
            sqe = struct.pack(
                "BBHiQQIIQHHiQQ", opcode, 0, 0, source, 0, self.start + offset, len(data), 0, 7, 0, 0, 0, 0, 0
            )
            self._sqes[index * 64 : index * 64 + 64] = sqe
            struct.pack_into("I", self._ring, self._sq_off[6] + index * 4, index)
            struct.pack_into("I", self._ring, self._sq_off[1], sq_tail + 1)
            _syscall("io_uring_enter", self.fd, 1, 1, 1, 0, 0)  # submit one, wait for one (GETEVENTS)
            head = struct.unpack_from("I", self._cq, self._cq_off[0])[0]
            cq_mask = struct.unpack_from("I", self._cq, self._cq_off[2])[0]
            _, result, _ = struct.unpack_from("QiI", self._cq, self._cq_off[5] + (head & cq_mask) * 16)
            struct.pack_into("I", self._cq, self._cq_off[0], head + 1)
            if result != len(data):
                raise OSError(-result if result < 0 else 0, f"READ_FIXED returned {result}")
        finally:
            os.close(source)

    def close(self) -> None:
        for area in (self._sqes, self._cq, self._ring):
            area.close()
        os.close(self.fd)


@functools.cache
def io_uring_available() -> str | None:
    """``None`` where io_uring fixed buffers work here, else why not. Probed in a child process: a fixed buffer is
    a long-term pin, released by the kernel some time after the ring closes, and a process that ever held one
    never trusts the write-watch again (every later test in it would fingerprint its frozen tensors)."""
    probe = "import torch\nfrom tests.kernel_writes import FixedBuffer\nFixedBuffer(torch.zeros(4096)).close()\n"
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, cwd=REPO,
        env=dict(os.environ, PYTHONPATH=REPO),
    )  # fmt: skip
    if done.returncode != 0:
        last = done.stderr.strip().splitlines()[-1:] or [f"exit code {done.returncode}"]
        return f"io_uring is not usable here: {last[0]}"
    return None


def proc_mem_write(tensor: torch.Tensor, offset: int, data: bytes) -> None:
    """Write through ``/proc/self/mem`` (the kernel writes on behalf of the process, as a debugger does)."""
    with open("/proc/self/mem", "r+b", buffering=0) as mem:
        mem.seek(tensor.data_ptr() + offset)
        mem.write(data)


def direct_read_into(tensor: torch.Tensor, offset: int, data: bytes, directory: str) -> None:
    """``preadv`` with ``O_DIRECT`` into the tensor's pages (the device copies into pinned pages)."""
    start, _ = _inner_pages(tensor)
    aligned = (tensor.data_ptr() + offset) % _PAGE == 0 and len(data) % _PAGE == 0
    assert start - tensor.data_ptr() <= offset and aligned
    path = os.path.join(directory, "direct.bin")
    with open(path, "wb") as out:
        out.write(data)
        out.flush()
        os.fsync(out.fileno())
    handle = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        view = (ctypes.c_char * len(data)).from_address(tensor.data_ptr() + offset)
        assert os.preadv(handle, [memoryview(view).cast("B")], 0) == len(data)
    finally:
        os.close(handle)


def io_uring_read(tensor: torch.Tensor, offset: int, data: bytes) -> None:
    """An io_uring READ into plain (not registered) memory: the kernel copies through the page tables."""
    ring = FixedBuffer(tensor, fixed=False)
    try:
        ring.read_into(offset - (ring.start - tensor.data_ptr()), data)
    finally:
        ring.close()


def map_over(tensor: torch.Tensor, offset: int, length: int) -> None:
    """Map fresh anonymous pages over part of the tensor (``mmap(MAP_FIXED)``): they read as zeros."""
    _LIBC.mmap.restype = ctypes.c_void_p
    _LIBC.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long)
    address = tensor.data_ptr() + offset
    assert address % _PAGE == 0 and length % _PAGE == 0
    mapped = _LIBC.mmap(address, length, mmap.PROT_READ | mmap.PROT_WRITE, 0x22 | 0x10, -1, 0)  # PRIVATE|ANON|FIXED
    if mapped != address:
        raise OSError(ctypes.get_errno(), "mmap(MAP_FIXED)")


def dont_need(tensor: torch.Tensor) -> None:
    """Drop the tensor's whole pages (``MADV_DONTNEED``): they read back as zeros; nothing wrote them."""
    start, end = _inner_pages(tensor)
    if _LIBC.madvise(start, end - start, _MADV_DONTNEED) != 0:
        raise OSError(ctypes.get_errno(), "madvise")


def write_from_child(tensor: torch.Tensor, offset: int, data: bytes) -> None:
    """Another process writes into this one's memory (``process_vm_writev``), as a debugger or injector does."""
    parent = os.getpid()
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the child
        try:
            source = ctypes.create_string_buffer(data, len(data))
            local = (ctypes.c_uint64 * 2)(ctypes.addressof(source), len(data))
            remote = (ctypes.c_uint64 * 2)(tensor.data_ptr() + offset, len(data))
            done = _syscall("process_vm_writev", parent, ctypes.addressof(local), 1, ctypes.addressof(remote), 1, 0)
            os._exit(0 if done == len(data) else 1)
        except BaseException:
            os._exit(2)
    _, status = os.waitpid(child, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise OSError(f"process_vm_writev failed in the child ({status})")
