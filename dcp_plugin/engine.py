"""The save/load pipeline around ``dcp.save`` / ``dcp.async_save`` / ``dcp.load``.

Owns what must live as long as the run: the staging buffers, the dedicated gloo process group, the one
save in flight, and the errors raised in the background. Knows nothing about Lightning or Accelerate and
nothing about paths (it receives DCP writers and readers).
"""

from __future__ import annotations

import atexit
import dataclasses
import functools
import logging
import os
import re
import sys
import threading
import time
import warnings
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import DefaultLoadPlanner
from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType, AsyncSaveResponse

from dcp_plugin.config import CheckpointConfig
from dcp_plugin.errors import CheckpointLoadError, CheckpointSaveError, ConfigError

log = logging.getLogger(__name__)

# DCP warns on every non-distributed call that it assumes a single process; that is exactly our intent.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")


def _quiet_discarded_dcp_telemetry() -> None:
    """DCP builds a DEBUG log record for every state-dict entry of every save and hands it to a NullHandler.
    That costs ~0.1 ms per tensor on the training thread (tens of ms per save for a real model) and goes
    nowhere; raise the level unless someone attached a real handler."""
    for name in ("c10d-NullHandler-dcp_logger", "c10d-NullHandler-default"):
        telemetry = logging.getLogger(name)
        if telemetry.level <= logging.DEBUG and all(isinstance(h, logging.NullHandler) for h in telemetry.handlers):
            telemetry.setLevel(logging.INFO)




@dataclass
class SaveStats:
    """Timings of one save, as the training loop experienced them."""

    name: str
    url: str
    step: int | None
    mode: str
    blocking_s: float
    """How long ``save`` kept the caller from continuing."""
    staging_s: float | None = None
    """Time to copy the snapshot off the live tensors (measured from the start of ``save``)."""
    durable_s: float | None = None
    """Time from the start of ``save`` until the checkpoint was committed (files written and synced)."""
    bytes_written: int | None = None
    """Bytes this save wrote (all ranks together)."""
    staging_wait_s: float = 0.0
    """With async staging: time the loop later spent in ``wait_for_staging`` for this save."""
    error: str | None = None

    @property
    def training_wait_s(self) -> float:
        """Everything the training loop waited for this save: ``save`` itself plus any staging wait."""
        return self.blocking_s + self.staging_wait_s

    @property
    def throughput_bytes_per_s(self) -> float | None:
        if not self.bytes_written or not self.durable_s:
            return None
        return self.bytes_written / self.durable_s

    def summary(self) -> str:
        parts = [f"{self.name}: blocked {self.blocking_s * 1000:.1f} ms"]
        if self.staging_wait_s:
            parts.append(f"+{self.staging_wait_s * 1000:.1f} ms waiting for staging")
        if self.staging_s is not None:
            parts.append(f"staged {self.staging_s * 1000:.1f} ms")
        if self.durable_s is not None:
            parts.append(f"durable {self.durable_s:.2f} s")
        if self.bytes_written:
            parts.append(f"{self.bytes_written / 2**20:.1f} MiB")
        if self.throughput_bytes_per_s:
            parts.append(f"{self.throughput_bytes_per_s / 2**20:.0f} MiB/s")
        if self.error:
            parts.append(f"FAILED: {self.error}")
        return ", ".join(parts)


@dataclass
class _InFlight:
    stats: SaveStats
    started: float
    upload: Future
    staging: Future | None
    on_failure: Any
    finished: threading.Event = dataclasses.field(default_factory=threading.Event)


class CheckpointEngine:
    """Runs saves and loads with DCP. One engine per trainer process is enough; managers can share it.

    Args:
        config: the options (mode, staging, writer threads).
        distributed: ``None`` (default) saves collectively with every rank when ``torch.distributed`` is
            initialized; ``False`` makes this process save alone (every rank must then use its own path).
    """

    def __init__(self, config: CheckpointConfig | None = None, *, distributed: bool | None = None) -> None:
        self.config = config or CheckpointConfig()
        self._distributed_request = distributed
        self._group: dist.ProcessGroup | None = None
        self._control_group: dist.ProcessGroup | None = None
        self._group_ready = False
        self._stager: DefaultStager | None = None
        self._in_flight: _InFlight | None = None
        self._error: BaseException | None = None
        self._completed: deque[SaveStats] = deque()
        self._lock = threading.Lock()
        self._closed = False
        self._owns_default_group = False
        _quiet_discarded_dcp_telemetry()
        if self.config.async_mode == "process":
            _ProcessDaemon.register(self)

    # -- process groups --------------------------------------------------------------------------
    @property
    def collective(self) -> bool:
        """Whether saves and loads are collective over all ranks of the default process group."""
        if self._distributed_request is False:
            return False
        initialized = dist.is_available() and dist.is_initialized()
        if self._distributed_request is True and not initialized:
            raise ConfigError("distributed=True but torch.distributed is not initialized.")
        return initialized and not self._owns_default_group

    @property
    def rank(self) -> int:
        return dist.get_rank() if self.collective else 0

    @property
    def world_size(self) -> int:
        return dist.get_world_size() if self.collective else 1

    @property
    def is_coordinator(self) -> bool:
        return self.rank == 0

    def process_group(self) -> dist.ProcessGroup | None:
        """The dedicated gloo group for checkpoint collectives (created once, by every rank)."""
        if self._group_ready:
            return self._group
        if self.collective:
            self._group = dist.new_group(backend="gloo")
        elif self.config.async_mode == "process":
            self._group = self._single_process_group()
        self._group_ready = True
        return self._group

    def _single_process_group(self) -> dist.ProcessGroup | None:
        if dist.is_initialized():
            if dist.get_world_size() > 1:
                # This rank saves alone (e.g. Lightning's rank 0): give its writer daemon a one-rank group, so
                # the daemon does not wait for the other ranks of the default group. Only this rank joins it.
                return dist.new_group(ranks=[dist.get_rank()], backend="gloo", use_local_synchronization=True)
            return None
        # DCP's process executor needs an initialized process group even for one process.
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        self._owns_default_group = True
        return None

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (identity without a process group)."""
        if not self.collective:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.process_group())
        return box[0]

    def all_gather(self, obj: Any) -> list[Any]:
        if not self.collective:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.process_group())
        return out

    def all_gather_control(self, obj: Any) -> list[Any]:
        """``all_gather`` for small control messages (e.g. save decisions), safe while a save is in flight.

        A background save runs collectives on the checkpoint group; issuing others there from the training
        thread at the same time would interleave them. This uses a second gloo group, created on first use
        (by every rank, at the same point of the loop).
        """
        if not self.collective:
            return [obj]
        if self._control_group is None:
            self._control_group = dist.new_group(backend="gloo")
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self._control_group)
        return out

    def barrier(self) -> None:
        if self.collective:
            dist.barrier(group=self.process_group())

    # -- saving ----------------------------------------------------------------------------------
    def save(
        self,
        flat_state: dict[str, Any],
        writer: Any,
        *,
        stats: SaveStats,
        started: float,
        on_failure: Any = None,
    ) -> SaveStats:
        """Start writing ``flat_state`` with ``writer``; returns once the snapshot is safe to mutate
        (or, with async staging, once staging was started)."""
        self._check_open()
        self.wait()
        group = self.process_group()
        no_dist = not self.collective
        mode = self.config.async_mode
        try:
            if mode == "sync":
                metadata = dcp.save(flat_state, storage_writer=writer, process_group=group, no_dist=no_dist)
                done = time.perf_counter()
                stats.blocking_s = stats.staging_s = stats.durable_s = done - started
                stats.bytes_written = _bytes(metadata)
                self._completed.append(stats)
                return stats
            if mode == "process":
                _ProcessDaemon.prepare()
            result = dcp.async_save(
                flat_state,
                storage_writer=writer,
                process_group=group,
                async_checkpointer_type=AsyncCheckpointerType.PROCESS
                if mode == "process"
                else AsyncCheckpointerType.THREAD,
                async_stager=self._stager_for_save(),
                no_dist=no_dist,
            )
        except BaseException as err:
            _cleanup_after_failure(on_failure, stats.url)
            if isinstance(err, (KeyboardInterrupt, SystemExit)):
                raise
            raise CheckpointSaveError(f"Saving checkpoint {stats.url} failed: {_describe(err)}") from err
        if isinstance(result, AsyncSaveResponse):
            staging, upload = result.staging_completion, result.upload_completion
        else:
            staging, upload = None, result
        returned = time.perf_counter()
        stats.blocking_s = returned - started
        if staging is None:
            stats.staging_s = stats.blocking_s
        else:
            staging.add_done_callback(lambda _f: setattr(stats, "staging_s", time.perf_counter() - started))
        flight = _InFlight(stats=stats, started=started, upload=upload, staging=staging, on_failure=on_failure)
        self._in_flight = flight
        upload.add_done_callback(lambda future: self._upload_done(flight, future))
        return stats

    def _stager_for_save(self) -> DefaultStager:
        if self._stager is not None and self.config.reuse_buffers:
            return self._stager
        cuda = torch.cuda.is_available()
        pinned = cuda if self.config.pinned_memory is None else self.config.pinned_memory
        shared = (
            (self.config.async_mode == "process") if self.config.shared_memory is None else self.config.shared_memory
        )
        options = StagingOptions(
            use_pinned_memory=pinned and cuda,
            use_shared_memory=shared,
            use_async_staging=self.config.async_staging,
            use_non_blocking_copy=pinned and cuda,
        )
        if self._stager is not None:
            self._stager.close()
        self._stager = DefaultStager(options)
        return self._stager

    def _upload_done(self, flight: _InFlight, future: Future) -> None:
        stats = flight.stats
        try:
            stats.durable_s = time.perf_counter() - flight.started
            try:
                metadata = future.result()
                stats.bytes_written = _bytes(metadata)
            except BaseException as err:  # noqa: BLE001 - CheckpointException is a BaseException
                stats.error = _describe(err)
                with self._lock:
                    if self._error is None:
                        self._error = CheckpointSaveError(f"Saving checkpoint {stats.url} failed: {stats.error}")
                        self._error.__cause__ = err
                _cleanup_after_failure(flight.on_failure, stats.url)
            self._completed.append(stats)
        finally:
            flight.finished.set()  # whatever happened above, wait() must not hang

    def wait_for_staging(self) -> None:
        """Block until the snapshot of the save in flight has been copied (no-op without async staging)."""
        flight = self._in_flight
        if flight is not None and flight.staging is not None and not flight.staging.done():
            began = time.perf_counter()
            try:
                flight.staging.result()
            except BaseException:  # noqa: BLE001 - reported through the upload future
                pass
            flight.stats.staging_wait_s += time.perf_counter() - began

    def wait(self) -> SaveStats | None:
        """Block until the save in flight is committed; raise its error (or an earlier one) here."""
        flight = self._in_flight
        if flight is not None:
            # _upload_done records the outcome (and any error) before it sets the event
            flight.finished.wait()
            self._in_flight = None
        self.raise_error()
        return flight.stats if flight is not None else None

    @property
    def in_flight(self) -> SaveStats | None:
        flight = self._in_flight
        if flight is None or flight.finished.is_set():
            return None
        return flight.stats

    def raise_error(self) -> None:
        """Raise (once) the error of a background save that failed."""
        with self._lock:
            error, self._error = self._error, None
        if error is not None:
            raise error

    def drain_completed(self) -> list[SaveStats]:
        """Stats of saves finished since the last call (for loggers)."""
        out = []
        while self._completed:
            out.append(self._completed.popleft())
        return out

    # -- loading ---------------------------------------------------------------------------------
    def load(self, flat_state: dict[str, Any], reader: Any, *, url: str) -> None:
        """Load tensors in place (collectively when distributed)."""
        self._check_open()
        self.wait()
        try:
            dcp.load(
                flat_state,
                storage_reader=reader,
                planner=DefaultLoadPlanner(allow_partial_load=False),
                process_group=self.process_group() if self.collective else None,
                no_dist=not self.collective,
            )
        except BaseException as err:
            if isinstance(err, (KeyboardInterrupt, SystemExit)):
                raise
            raise CheckpointLoadError(f"Loading checkpoint {url} failed: {_describe(err)}") from err

    # -- shutdown --------------------------------------------------------------------------------
    def close(self) -> None:
        """Flush the save in flight, release staging buffers, stop the writer daemon; raise pending errors."""
        if self._closed:
            return
        try:
            self.wait()
        finally:
            self._closed = True
            if self._stager is not None:
                self._stager.close()
                self._stager = None
            if self.config.async_mode == "process":
                _ProcessDaemon.unregister(self)
            for group in (self._group, self._control_group):
                if group is not None:
                    try:
                        dist.destroy_process_group(group)
                    except Exception:  # noqa: BLE001 - the default group may already be gone
                        pass
            self._group = self._control_group = None
            self._group_ready = False
            if self._owns_default_group and dist.is_initialized():
                dist.destroy_process_group()
                self._owns_default_group = False

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("This checkpoint engine was closed; create a new CheckpointManager.")


def _cleanup_after_failure(on_failure: Any, url: str) -> None:
    """Run a failed save's cleanup without letting its own error replace the save's."""
    if on_failure is None:
        return
    try:
        on_failure()
    except Exception as cleanup_error:  # noqa: BLE001
        log.warning("Cleanup after the failed save of %s failed: %s", url, cleanup_error)


def _bytes(metadata: Any) -> int | None:
    storage = getattr(metadata, "storage_data", None)
    if not storage:
        return None
    return sum(int(getattr(info, "length", 0)) for info in storage.values())


def _describe(err: BaseException) -> str:
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


class _ProcessDaemon:
    """Lifecycle of DCP's writer daemon (one per trainer process, shared by all engines in it).

    DCP starts it on first use and offers no way to stop it or to recover once it died; we do both.
    """

    _engines: set[int] = set()

    @classmethod
    def register(cls, engine: CheckpointEngine) -> None:
        cls._engines.add(id(engine))

    @classmethod
    def unregister(cls, engine: CheckpointEngine) -> None:
        cls._engines.discard(id(engine))
        if not cls._engines:
            cls.shutdown()

    @classmethod
    def prepare(cls) -> None:
        _check_main_guard()
        from torch.distributed.checkpoint import _async_process_executor as executor

        process = executor._CHECKPOINT_PROCESS
        if process is not None and not process._save_process.is_alive():
            log.warning(
                "The checkpoint writer process (pid %s) died with exit code %s; starting a new one.",
                process._save_process.pid,
                process._save_process.exitcode,
            )
            executor._CHECKPOINT_PROCESS = None

    @staticmethod
    def shutdown() -> None:
        from torch.distributed.checkpoint import _async_process_executor as executor

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


atexit.register(_ProcessDaemon.shutdown)

_GUARD = re.compile(r"""^if\s+__name__\s*==\s*['"]__main__['"]\s*:""", re.MULTILINE)


@functools.cache
def _main_script_has_guard(path: str) -> bool:
    try:
        with open(path, encoding="utf-8") as handle:
            return bool(_GUARD.search(handle.read()))
    except OSError:
        return True  # cannot tell: let DCP try


def _check_main_guard() -> None:
    """``process`` mode re-imports the main script in the writer process; without the guard it would run
    training there again (and hang). Detect it before DCP spawns the daemon."""
    main = sys.modules.get("__main__")
    if getattr(main, "__name__", "") == "__mp_main__":
        raise ConfigError(_GUARD_MESSAGE.format(path=getattr(main, "__file__", "your script")))
    path = getattr(main, "__file__", None)
    if not path or not path.endswith(".py") or getattr(main, "__spec__", None) is not None:
        return  # interactive session, `python -m module`, or a console entry point
    if not _main_script_has_guard(path):
        raise ConfigError(_GUARD_MESSAGE.format(path=path))


_GUARD_MESSAGE = (
    "async_mode='process' starts a writer process that re-imports {path}; that script has no "
    '`if __name__ == "__main__":` guard, so the writer would run your training code again and hang. Move the '
    "script's top-level code under such a guard, or use async_mode='thread'."
)
