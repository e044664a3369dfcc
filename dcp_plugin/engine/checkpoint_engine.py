"""The save/load pipeline around ``dcp.save`` / ``dcp.async_save`` / ``dcp.load``.

Owns what must live as long as the run: the staging buffers, the one save in flight
(:mod:`dcp_plugin.engine.pending`), and the errors raised in the background and the finished saves' stats
(:mod:`dcp_plugin.engine.outcomes`). Process groups live in :mod:`dcp_plugin.engine.groups`, the writer daemon in
:mod:`dcp_plugin.engine.daemon`. Knows nothing about Lightning or Accelerate and nothing about paths (it receives
DCP writers and readers).
"""

from __future__ import annotations

import contextlib
import logging
import time
import warnings
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED
from concurrent.futures import wait as wait_for_first
from typing import Any

import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import DefaultLoadPlanner
from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType, AsyncSaveResponse

from dcp_plugin.config import CheckpointConfig
from dcp_plugin.engine import daemon, inflight, plans, shutdown
from dcp_plugin.engine.failures import call_done as _call_done
from dcp_plugin.engine.failures import cleanup_after_failure as _cleanup_after_failure
from dcp_plugin.engine.failures import describe as _describe
from dcp_plugin.engine.failures import project_error as _project_error
from dcp_plugin.engine.groups import ProcessGroups
from dcp_plugin.engine.outcomes import SaveOutcomes
from dcp_plugin.engine.pending import PendingSave, then
from dcp_plugin.engine.pending import bytes_written as _bytes
from dcp_plugin.engine.repeat import RepeatRequest, RepeatSaves
from dcp_plugin.engine.staging.pool import BoundedStager
from dcp_plugin.engine.staging.stagers import Stagers
from dcp_plugin.engine.stats import SaveStats
from dcp_plugin.errors import CheckpointLoadError, CheckpointSaveError

log = logging.getLogger(__name__)

COMPLETED_LIMIT = 1000
"""At most this many finished saves wait in :meth:`CheckpointEngine.drain_completed` (oldest dropped)."""


_SINGLE_PROCESS_NOTICE = "torch.distributed is disabled, unavailable or uninitialized"
_background_notice_silenced = False


@contextlib.contextmanager
def _single_process_intent() -> Iterator[None]:
    # DCP warns on every non-distributed call that it assumes a single process; that is exactly our intent.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_SINGLE_PROCESS_NOTICE)
        yield


def _silence_background_single_process_notice() -> None:
    """DCP's thread executor calls ``dcp.save`` again in its own thread after ``async_save`` returned, where no
    ``catch_warnings`` around our call reaches. From the first single-process background save on (never at
    import), ignore exactly that notice, and only when DCP's own modules raise it."""
    global _background_notice_silenced
    if not _background_notice_silenced:
        _background_notice_silenced = True
        warnings.filterwarnings("ignore", message=_SINGLE_PROCESS_NOTICE, module=r"torch\.distributed\.checkpoint")


def _quiet_discarded_dcp_telemetry() -> None:
    """DCP builds a DEBUG log record for every state-dict entry of every save and hands it to a NullHandler.
    That costs ~0.1 ms per tensor on the training thread (tens of ms per save for a real model) and goes
    nowhere; raise the level unless someone attached a real handler."""
    for name in ("c10d-NullHandler-dcp_logger", "c10d-NullHandler-default"):
        telemetry = logging.getLogger(name)
        if telemetry.level <= logging.DEBUG and all(isinstance(h, logging.NullHandler) for h in telemetry.handlers):
            telemetry.setLevel(logging.INFO)


class CheckpointEngine:
    """Runs saves and loads with DCP: one save in flight, background errors raised by the next call.

    Args:
        config: the options (mode, staging, writer threads).
        distributed: ``None`` (default) saves collectively with every rank when ``torch.distributed`` is
            initialized; ``False`` makes this process save alone (every rank must then use its own path).
    """

    def __init__(self, config: CheckpointConfig | None = None, *, distributed: bool | None = None) -> None:
        self.config = config or CheckpointConfig.resolve()
        """The options this engine runs with (arguments, then ``DCP_PLUGIN_*`` variables, then defaults)."""
        self.groups = ProcessGroups(distributed, async_mode=self.config.async_mode)
        """Which ranks save together, and the gloo groups their collectives run on."""
        self._stagers = Stagers(self.config)
        self.plan_keys = plans.PlanKeys()
        """Its DCP plan cache keys; ``plan_keys.number(plans.structure(...))`` numbers a save's structure."""
        self._in_flight: PendingSave | None = None
        self.repeats = RepeatSaves(self.config, self.groups)
        """Saves that repeat an earlier save's structure, written without DCP (:mod:`dcp_plugin.engine.repeat`)."""
        self._outcomes = SaveOutcomes(COMPLETED_LIMIT)  # the first background error, the finished saves' stats
        self._closed = False
        _quiet_discarded_dcp_telemetry()
        if self.config.async_mode == "process":
            daemon.check_main_guard()  # at construction, not at the first save
            daemon.register(self)
        shutdown.track(self)

    # -- who takes part (see ProcessGroups) ------------------------------------------------------
    @property
    def collective(self) -> bool:
        """Whether every rank of the default process group takes part in each save and load."""
        return self.groups.collective

    @property
    def rank(self) -> int:
        """This process's rank among those that save together (``0`` when it saves alone)."""
        return self.groups.rank

    @property
    def world_size(self) -> int:
        """How many ranks save together (``1`` when this process saves alone)."""
        return self.groups.world_size

    @property
    def is_coordinator(self) -> bool:
        """Whether this is rank 0, the one that opens and commits each checkpoint and deletes old ones."""
        return self.groups.is_coordinator

    def broadcast(self, obj: Any) -> Any:
        """Deprecated: use ``engine.groups.broadcast`` (removed in the next release)."""
        _moved("broadcast")
        return self.groups.broadcast(obj)

    def all_gather(self, obj: Any) -> list[Any]:
        """Deprecated: use ``engine.groups.all_gather`` (removed in the next release)."""
        _moved("all_gather")
        return self.groups.all_gather(obj)

    def all_gather_control(self, obj: Any) -> list[Any]:
        """Deprecated: use ``engine.groups.all_gather_control`` (removed in the next release)."""
        _moved("all_gather_control")
        return self.groups.all_gather_control(obj)

    # -- saving ----------------------------------------------------------------------------------
    def warm_up(self) -> None:
        """``process`` mode: start the writer daemon now, in the background (every saving rank calls it)."""
        if self.config.async_mode == "process":
            self._check_open()
            daemon.start(self.groups.checkpoint_group())

    def prepare(self, flat_state: dict[str, Any]) -> None:
        """Allocate and touch the staging buffers for these tensors now, in a background thread, so that the
        first save only copies into them like every later one (asynchronous modes with ``reuse_buffers``; once
        per engine; a save waits for it). Buffers are found again by the tensors' storage, so pass the live
        tensors that later saves will hold, e.g. after the first optimizer step has created its state."""
        self._check_open()
        self._stagers.prepare(flat_state)

    @property
    def needs_prepare(self) -> bool:
        """Whether :meth:`prepare` would still do something (not yet prepared or saved; buffers are kept)."""
        return self._stagers.needs_prepare

    def save(
        self,
        flat_state: dict[str, Any],
        writer: Any,
        *,
        stats: SaveStats,
        started: float,
        on_failure: Any = None,
        on_done: Any = None,
        structure: str = "",
        repeat: RepeatRequest | None = None,
        on_written: Any = None,
    ) -> SaveStats:
        """Start writing ``flat_state`` with ``writer``; returns once the snapshot is safe to mutate (or, with async
        staging, once staging started). Fills ``stats`` in (now and when done). ``on_done(metadata)`` runs once the
        write committed (with the save's ``Metadata``) or failed (``None``). ``structure``: the save's structure
        agreed over all ranks (:func:`~dcp_plugin.engine.plans.agreed`), a cached plan's key. ``repeat``: what lets
        a save DCP planned before be written without DCP, if all ranks agreed to (:mod:`dcp_plugin.engine.repeat`).
        ``on_written(metadata)`` runs on every rank after DCP's write, as part of the save (the commit across
        nodes); a save with one is always written through DCP."""
        self._check_open()
        self.wait()
        mode = self.config.async_mode
        if on_written is not None:
            repeat = None  # the commit across nodes runs where DCP's write ends
        if repeat is None or not repeat.repeat:
            self.repeats.forget()  # its images go before DCP stages anew
            on_done = self.repeats.seeding(repeat, writer, on_done, self._stagers.close)
        writing = inflight.begin(stats.url)  # visible to every instance in this process until committed
        try:
            if repeat is not None and repeat.repeat:
                result = self.repeats.begin(repeat, writer, self.config.stages_in_background)
            else:
                result = _start_dcp(self, flat_state, writer, structure)
                if on_written is not None and not isinstance(result, tuple):  # sync: written, not yet done
                    on_written(result)
        except BaseException as err:
            _cleanup_after_failure(on_failure, stats.url)
            inflight.finish(writing)
            _call_done(on_done)
            if isinstance(err, (KeyboardInterrupt, SystemExit)):
                raise
            message = f"Saving checkpoint {stats.url} failed: {_describe(err)}"
            if mode == "process":
                message += daemon.shared_memory_hint(err, flat_state)
            raise _project_error(err, CheckpointSaveError, message) from err
        if not isinstance(result, tuple):  # written and committed already (sync mode)
            inflight.finish(writing)
            _call_done(on_done, result)
            stats.blocking_s = stats.staging_s = stats.durable_s = time.perf_counter() - started
            stats.bytes_written = _bytes(result, writer)
            stats.direct_io = getattr(result, "dcp_plugin_direct_io", None)
            self._outcomes.finished(stats)
            return stats
        staging, upload = result
        upload = upload if on_written is None else then(upload, on_written)
        stats.blocking_s = time.perf_counter() - started
        if staging is None:
            stats.staging_s = stats.blocking_s
        else:
            staging.add_done_callback(lambda _f: setattr(stats, "staging_s", time.perf_counter() - started))
        flight = PendingSave(stats, started, upload, staging, on_failure, writing, on_done, writer)
        if mode == "process":  # staging in the background may be what fills /dev/shm
            flight.error_hint = lambda err: daemon.shared_memory_hint(err, flat_state)
        self._in_flight = flight
        upload.add_done_callback(lambda future: flight.upload_done(future, self._outcomes))
        return stats

    def wait_for_staging(self) -> None:
        """Block until the snapshot of the save in flight has been copied (no-op without async staging)."""
        flight = self._in_flight
        if flight is not None:
            flight.wait_for_staging()

    def wait(self) -> SaveStats | None:
        """Block until the save in flight is committed; raise its error (or an earlier one) here."""
        flight = self._in_flight
        if flight is not None:
            # PendingSave.upload_done records the outcome (and any error) before it sets the event
            flight.finished.wait()
            flight.join_writer()
            self._in_flight = None
        self.raise_error()
        return flight.stats if flight is not None else None

    @property
    def in_flight(self) -> SaveStats | None:
        """The save being written right now, if any."""
        flight = self._in_flight
        if flight is None or flight.finished.is_set():
            return None
        return flight.stats

    def raise_error(self) -> None:
        """Raise (once) the error of a background save that failed."""
        self._outcomes.raise_error()

    def drain_completed(self) -> list[SaveStats]:
        """Stats of saves finished since the last call (for the owner's logger; at most the last 1000)."""
        return self._outcomes.drain()

    # -- loading ---------------------------------------------------------------------------------
    def load(self, flat_state: dict[str, Any], reader: Any, *, url: str, planner: Any = None) -> None:
        """Load tensors in place (collectively when distributed); ``planner`` replaces DCP's default one."""
        self._check_open()
        self.wait()
        collective = self.groups.collective
        try:
            with _single_process_intent():
                dcp.load(
                    flat_state,
                    storage_reader=reader,
                    planner=planner if planner is not None else DefaultLoadPlanner(allow_partial_load=False),
                    process_group=self.groups.checkpoint_group() if collective else None,
                    no_dist=not collective,
                )
        except BaseException as err:
            if isinstance(err, (KeyboardInterrupt, SystemExit)):
                raise
            raise _project_error(
                err, CheckpointLoadError, f"Loading checkpoint {url} failed: {_describe(err)}"
            ) from err

    # -- shutdown --------------------------------------------------------------------------------
    def close(self) -> None:
        """Flush the save in flight, release staging buffers, stop the writer daemon; raise pending errors."""
        if self._closed:
            return
        try:
            self.wait()
        finally:
            self._closed = True
            self.repeats.forget()
            self.plan_keys.forget()
            self._stagers.close()
            if self.config.async_mode == "process":
                daemon.unregister(self)
            self.groups.close()

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("This checkpoint engine was closed; create a new CheckpointManager.")


def _start_dcp(engine: CheckpointEngine, flat_state: dict[str, Any], writer: Any, structure: str) -> Any:
    """Hand the save to DCP: its ``Metadata`` once committed (``sync``), or its (staging, upload) futures."""
    group = engine.groups.checkpoint_group()
    no_dist = not engine.groups.collective
    mode = engine.config.async_mode
    if mode == "thread" and no_dist:
        _silence_background_single_process_notice()  # outside catch_warnings, which would undo it
    with _single_process_intent():
        planner = plans.save_planner(engine.plan_keys.use(structure))
        if mode == "sync":
            return dcp.save(flat_state, storage_writer=writer, planner=planner, process_group=group, no_dist=no_dist)
        if mode == "process":
            daemon.prepare()
            daemon.ensure_running(group)
        stager = engine._stagers.for_save(writer)  # a head start of staging is finished here
        kind = AsyncCheckpointerType.PROCESS if mode == "process" else AsyncCheckpointerType.THREAD
        result = dcp.async_save(
            flat_state,
            storage_writer=writer,
            process_group=group,
            async_checkpointer_type=kind,
            async_stager=stager,
            planner=planner,
            no_dist=no_dist,
        )
    if isinstance(result, AsyncSaveResponse):
        return result.staging_completion, result.upload_completion
    staging = stager.completion if isinstance(stager, BoundedStager) else None
    if staging is not None and not engine.config.stages_in_background:
        wait_for_first([staging, result], return_when=FIRST_COMPLETED)  # save alone guarantees the snapshot
    return staging, result


def _moved(name: str) -> None:
    warnings.warn(f"CheckpointEngine.{name} moved to CheckpointEngine.groups.{name}.", DeprecationWarning, stacklevel=3)


__all__ = ["CheckpointEngine", "CheckpointLoadError", "CheckpointSaveError", "SaveStats"]
