"""Bounded-memory staging (``max_staging_bytes``): the snapshot goes through a fixed host pool in waves.

Without a bound, an async save first copies the whole state to host memory and then writes that copy. With
``max_staging_bytes=B`` a staging thread copies tensors into a pool of ``B`` bytes, in the order DCP's writer
threads will write them, as far as the pool has room; each writer thread takes its next staged tensor, writes
it, and the space is reused once the thread asks for its next tensor (or closes its file). So the state is
copied and written in waves, with back-pressure from the pool.

The snapshot stays consistent because the live tensors may not change until every one of them has been copied:
the session's ``completion`` future resolves then, and the engine treats it as the end of staging (``save``
returns then, or with ``async_staging`` the next optimizer step waits for it in ``wait_for_staging``).

No deadlock: tensors of one file are staged in the order its thread writes them, and a thread gives back what
it wrote before it waits for its next tensor. So whenever the staging thread waits for room, every tensor in
the pool either is being written or is the next one of a thread that is not waiting; room always comes back.
A tensor larger than the whole pool is staged alone, beside the pool (one at a time): peak pool memory is at
most ``B`` plus the largest tensor.
"""

from __future__ import annotations

import contextlib
import threading
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from typing import Any

import torch
from torch.distributed.checkpoint.planner import WriteItemType
from torch.distributed.checkpoint.staging import AsyncStager

from dcp_plugin.errors import ConfigError

ALIGNMENT = 64
"""Every tensor in the pool starts at a multiple of this many bytes (enough for every dtype)."""


class _Block:
    """One live allocation: a range of the arena, or a tensor of its own (larger than the pool)."""

    __slots__ = ("offset", "size", "nbytes", "own")

    def __init__(self, offset: int, size: int, nbytes: int, own: torch.Tensor | None = None) -> None:
        self.offset, self.size, self.nbytes, self.own = offset, size, nbytes, own


class StagingPool:
    """A fixed host arena of ``budget`` bytes that hands out exact-size tensors, and waits when it is full.

    Counts the bytes it hands out (``live_bytes`` now, ``peak_bytes`` since :meth:`reset_peak`, the largest
    single tensor in ``largest_bytes``), so the bound can be checked. The arena is allocated at the first
    allocation and kept until :meth:`close`.
    """

    def __init__(self, budget: int, *, pinned: bool = False) -> None:
        self.budget = budget
        self.pinned = pinned
        self._arena: torch.UntypedStorage | None = None
        self._free: list[tuple[int, int]] = [(0, budget)]  # (offset, size), sorted by offset, coalesced
        self._oversized: _Block | None = None
        self._cond = threading.Condition()
        self.live_bytes = 0
        self.peak_bytes = 0
        self.largest_bytes = 0

    def reset_peak(self) -> None:
        with self._cond:
            self.peak_bytes = self.live_bytes
            self.largest_bytes = 0

    def allocate(self, nbytes: int, give_up: Callable[[], bool]) -> _Block | None:
        """Wait for room for ``nbytes`` and take it; ``None`` when ``give_up()`` became true while waiting."""
        with self._cond:
            while True:
                if give_up():
                    return None
                block = self._take(nbytes)
                if block is not None:
                    self.live_bytes += nbytes
                    self.peak_bytes = max(self.peak_bytes, self.live_bytes)
                    self.largest_bytes = max(self.largest_bytes, nbytes)
                    return block
                self._cond.wait()

    def _take(self, nbytes: int) -> _Block | None:
        if nbytes > self.budget:
            if self._oversized is not None:
                return None
            own = torch.empty(nbytes, dtype=torch.uint8, pin_memory=self.pinned)
            self._oversized = _Block(0, nbytes, nbytes, own)
            return self._oversized
        size = max(ALIGNMENT, -(-nbytes // ALIGNMENT) * ALIGNMENT)
        for i, (offset, free) in enumerate(self._free):
            if free >= size or (free >= nbytes and offset + free == self.budget):
                taken = min(size, free)
                if free == taken:
                    del self._free[i]
                else:
                    self._free[i] = (offset + taken, free - taken)
                return _Block(offset, taken, nbytes)
        return None

    def release(self, block: _Block) -> None:
        with self._cond:
            self.live_bytes -= block.nbytes
            if block.own is not None:
                self._oversized = None
            else:
                self._give_back(block.offset, block.size)
            self._cond.notify_all()

    def _give_back(self, offset: int, size: int) -> None:
        free = self._free
        i = 0
        while i < len(free) and free[i][0] < offset:
            i += 1
        free.insert(i, (offset, size))
        if i + 1 < len(free) and offset + size == free[i + 1][0]:  # merge with the next range
            free[i] = (offset, size + free.pop(i + 1)[1])
        if i > 0 and free[i - 1][0] + free[i - 1][1] == offset:  # and with the previous one
            free[i - 1] = (free[i - 1][0], free[i - 1][1] + free.pop(i)[1])

    def tensor(self, block: _Block, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
        """A contiguous tensor over ``block`` whose storage is exactly its bytes (so DCP writes it as it is)."""
        if block.own is not None:
            storage = block.own.untyped_storage()
        else:
            if self._arena is None:
                self._arena = torch.empty(self.budget, dtype=torch.uint8, pin_memory=self.pinned).untyped_storage()
            storage = self._arena[block.offset : block.offset + block.nbytes]
        return torch.empty(0, dtype=dtype).set_(storage, 0, shape, _contiguous_strides(shape))

    def wake(self) -> None:
        """Wake waiting allocations so they can check whether to give up."""
        with self._cond:
            self._cond.notify_all()

    def close(self) -> None:
        """Free the arena (allocations still live keep their memory)."""
        self._arena = None


def _contiguous_strides(shape: Sequence[int]) -> tuple[int, ...]:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= max(size, 1)
    return tuple(reversed(strides))


class StagingSession:
    """One save through the pool: the staging thread, the staged tensors handed to the writer threads, the
    ``completion`` future (every tensor copied), and the first error of any thread involved."""

    def __init__(self, pool: StagingPool) -> None:
        self.pool = pool
        self.completion: Future[None] = Future()
        self._cond = threading.Condition()
        self._staged: dict[Any, tuple[Any, _Block | None, int]] = {}  # index -> (data, block, bucket)
        self._held: dict[int, _Block] = {}  # writer thread -> the block it is writing (or wrote last)
        self._ahead: list[int] = []  # bytes staged but not yet taken, per file
        self._queues: list[deque] = []  # per file, the tensor items not yet staged, in writing order
        self._error: BaseException | None = None
        self._stopping = False
        self._done_staging = False
        self._cuda_ready: Any = None
        self._thread: threading.Thread | None = None

    # -- the training thread ---------------------------------------------------------------------
    def begin(self) -> None:
        """Called where ``save`` is called: copies must see every device operation queued before it."""
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            self._cuda_ready = torch.cuda.Event()
            self._cuda_ready.record()

    # -- the writer (DCP's background save) --------------------------------------------------------
    @contextlib.contextmanager
    def writing(self, buckets: Sequence[Sequence[Any]], planner: Any) -> Iterator[Any]:
        """Stage ``buckets`` (each file's write items in writing order) while the body writes them through the
        planner this yields. Raises the first error of the staging or any writer thread."""
        self._ahead = [0] * len(buckets)
        self._queues = [deque(item for item in bucket if item.type != WriteItemType.BYTE_IO) for bucket in buckets]
        small = [(b, item) for b, bucket in enumerate(buckets) for item in bucket if item.type == WriteItemType.BYTE_IO]
        self._thread = threading.Thread(
            target=self._stage_all, args=(small, planner), name="dcp-plugin-staging", daemon=True
        )
        self._thread.start()
        try:
            yield _PoolPlanner(planner, self)
        except BaseException as err:  # noqa: BLE001 - the first error of any thread is raised below
            self.fail(err)
        finally:
            self._finish()
        if self._error is not None:  # also a writer thread's error, which DCP itself would not raise
            raise self._error

    def take(self, item: Any) -> Any:
        """A writer thread's next item, once staged; what this thread took before is given back first."""
        me = threading.get_ident()
        with self._cond:
            self._give_back_held(me)
            while item.index not in self._staged:
                if self._error is not None:
                    raise RuntimeError(f"Staging stopped before {item.index.fqn} was copied") from self._error
                if self._done_staging:
                    raise RuntimeError(f"{item.index.fqn} was not among the tensors staged for this save.")
                if self._out_of_order(item):  # waiting could never end: fail clearly instead of hanging
                    raise RuntimeError(
                        f"DCP's writer asked for {item.index.fqn} before the tensors written ahead of it in its file; "
                        f"this torch version ({torch.__version__}) writes in another order than bounded staging "
                        "expects. Leave max_staging_bytes unset."
                    )
                self._cond.wait()
            data, block, bucket = self._staged.pop(item.index)
            if block is not None:
                self._held[me] = block
                self._ahead[bucket] -= block.nbytes
                self._cond.notify_all()
        return data

    def stream_closed(self, error: BaseException | None) -> None:
        """A writer thread closed a file: what it wrote goes back to the pool; its error stops the save."""
        with self._cond:
            self._give_back_held(threading.get_ident())
        if error is not None:
            self.fail(error)

    def fail(self, error: BaseException) -> None:
        with self._cond:
            if self._error is None:
                self._error = error
            self._cond.notify_all()
        self.pool.wake()

    # -- the staging thread ------------------------------------------------------------------------
    def _out_of_order(self, item: Any) -> bool:
        """Whether ``item`` waits in a file's queue behind other tensors (under the lock)."""
        return any(
            queue and queue[0].index != item.index and any(i.index == item.index for i in queue)
            for queue in self._queues
        )

    def _stage_all(self, small: Sequence[tuple[int, Any]], planner: Any) -> None:
        try:
            for b, item in small:  # non-tensor items are small: snapshot them first
                self._publish(item, planner.resolve_data(item), None, b)
            queues = self._queues
            with self._device_stream():
                while any(queues) and not self._stopped():
                    with self._cond:  # the file with the fewest bytes waiting goes next
                        b = min((i for i, q in enumerate(queues) if q), key=lambda i: self._ahead[i])
                        item = queues[b].popleft()
                    source = planner.resolve_data(item).detach()
                    block = self.pool.allocate(source.nbytes, self._stopped)
                    if block is None:
                        return
                    staged = self.pool.tensor(block, source.shape, source.dtype)
                    with torch.no_grad():
                        staged.copy_(source)
                    self._publish(item, staged, block, b)
            if not self._stopped():
                with self._cond:
                    self._done_staging = True
                    self._cond.notify_all()
                self.completion.set_result(None)
        except BaseException as err:  # noqa: BLE001 - raised by the writer threads and the save
            self.fail(err)

    @contextlib.contextmanager
    def _device_stream(self) -> Iterator[None]:
        if self._cuda_ready is None:
            yield
            return
        stream = torch.cuda.Stream()
        stream.wait_event(self._cuda_ready)
        with torch.cuda.stream(stream):
            yield

    def _publish(self, item: Any, data: Any, block: _Block | None, bucket: int) -> None:
        with self._cond:
            self._staged[item.index] = (data, block, bucket)
            if block is not None:
                self._ahead[bucket] += block.nbytes
            self._cond.notify_all()

    def _stopped(self) -> bool:
        return self._stopping or self._error is not None

    def _give_back_held(self, thread: int) -> None:
        block = self._held.pop(thread, None)
        if block is not None:
            self.pool.release(block)

    def _finish(self) -> None:
        """The write ended (either way): stop staging and give every block back."""
        self._stopping = True
        self.pool.wake()
        if self._thread is not None:
            self._thread.join()
        with self._cond:
            blocks = list(self._held.values()) + [block for _, block, _ in self._staged.values() if block]
            self._held.clear()
            self._staged.clear()
        for block in blocks:
            self.pool.release(block)
        if not self.completion.done():
            error = self._error or RuntimeError("The save ended before every tensor was staged.")
            self.completion.set_exception(error)


class _PoolPlanner:
    """The planner DCP's writer threads see: tensors come from the pool, everything else from the planner."""

    def __init__(self, planner: Any, session: StagingSession) -> None:
        self._planner = planner
        self._session = session

    def resolve_data(self, item: Any) -> Any:
        return self._session.take(item)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._planner, name)


class BoundedStager(AsyncStager):
    """The stager ``dcp.async_save`` calls: hands the live state through (DCP plans on it) and starts the
    session; the writer it was made for copies through the pool while it writes."""

    _synchronize_after_execute = False

    def __init__(self, session: StagingSession) -> None:
        self.session = session

    @property
    def completion(self) -> Future[None]:
        """Resolves once every tensor was copied into the pool (the live state may change from then on)."""
        return self.session.completion

    def stage(self, state_dict: Any, **_kwargs: Any) -> Any:
        self.session.begin()
        return state_dict

    def synchronize_staging(self) -> None:
        self.session.completion.result()

    def close(self) -> None:
        pass


def bounded_stager(pool: StagingPool, writer: Any) -> BoundedStager:
    """A stager for one save of ``writer`` through ``pool`` (the writer must be one of dcp-plugin's)."""
    attach = getattr(writer, "attach_staging", None)
    if attach is None:
        raise ConfigError(
            f"max_staging_bytes needs a dcp-plugin storage writer; {type(writer).__name__} cannot write from the "
            "staging pool. Save through Checkpointer / CheckpointManager, or leave max_staging_bytes unset."
        )
    session = StagingSession(pool)
    attach(session)
    return BoundedStager(session)


__all__ = ["ALIGNMENT", "BoundedStager", "StagingPool", "StagingSession", "bounded_stager"]
