"""Saves that repeat the structure of the save before, written without DCP (``sync`` and ``thread`` mode).

When every rank saves exactly the structure DCP planned in an earlier save (the nesting and, per tensor, type,
dtype, shape, layout, gradient flag: :func:`dcp_plugin.engine.plans.structure`), and nothing else that decides
where bytes go changed (which tensors are tied, which are kept in shared blobs, the storage root, and in ``sync``
mode where the large tensors sit in memory: :meth:`RepeatSaves.number`), DCP would plan the same writes and
pickle the same ``.metadata`` once more, at tens of µs per tensor. Such a save skips DCP:

* each rank copies its tensors into the images of its files, all at once (``torch._foreach_copy_``; in the
  background with asynchronous staging, as DCP's stager would), and writes each file with one write per segment
  (:mod:`dcp_plugin.storage.layout`, :mod:`dcp_plugin.storage.repeat_io`);
* one gather brings each rank's file checksums and the storage entries that moved to the coordinator, which writes
  ``.metadata`` from bytes pickled once, seals and commits like any save; one broadcast brings the outcome back.

So a save costs three collectives (the all-gather that opens every save, the gather, the broadcast) whose payload
does not grow with the tensor count, against DCP's five (plans gathered and scattered, results gathered, the
outcome broadcast) whose first two carry every write item. The first save of a structure goes through DCP and
leaves its plan (each rank's final write items, the global ``Metadata``) as the seed; every rank agrees on using
it in the all-gather that opens each save (:meth:`RepeatSaves.ready` travels in it). ``process`` mode and bounded
staging keep DCP's path: the writer daemon plans in its own process, and the bounded pool stages in writing order.
"""

from __future__ import annotations

import logging
import threading
import traceback
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import torch
from torch.distributed.checkpoint.api import CheckpointException

from dcp_plugin.config import CheckpointConfig
from dcp_plugin.engine.groups import ProcessGroups
from dcp_plugin.storage.layout import BLOCK
from dcp_plugin.storage.record_writer import DIRECT_FROM_MEMORY
from dcp_plugin.storage.repeat_io import Coordinator, RankTemplate, RepeatReport, rank_metadata

log = logging.getLogger(__name__)


@dataclass
class RepeatRequest:
    """What one save hands the engine so that it can be written without DCP (see :class:`RepeatSaves`)."""

    tensors: Mapping[str, Any]
    """Every tensor of this rank's save under its checkpoint key."""
    plain: Mapping[str, Any]
    """The plain values DCP stores as byte items, under their DCP keys."""
    aliases: Mapping[str, str]
    """Keys whose tensor views the same memory as an earlier key's (stored once)."""
    blob_keys: frozenset[str]
    """Keys of the tensors kept in shared blobs (incremental saves)."""
    key: str
    """The save's key, agreed over all ranks (structure and repeat numbers of every rank)."""
    repeat: bool
    """Every rank agreed to write this save without DCP."""


class _Numbering:
    """A number that changes whenever the description it is given does."""

    def __init__(self) -> None:
        self._last: Any = None
        self.generation = 0

    def number(self, described: Any) -> int:
        if described != self._last:
            self._last = described
            self.generation += 1
        return self.generation


class RepeatSaves:
    """One engine's saves that repeat a structure: the seed DCP left, the template built from it, and one save's
    copy and write (see the module docstring)."""

    def __init__(self, config: CheckpointConfig, groups: ProcessGroups) -> None:
        self._config = config
        self._groups = groups
        self._numbers = _Numbering()
        self._large: tuple[int, list[str]] = (0, [])  # (structure number, keys of tensors written from memory)
        self._seed: tuple[str, Any] | None = None  # (key, DCP's Metadata of the save that planned the structure)
        self._template: RankTemplate | None = None
        self._coordinator: Coordinator | None = None

    @property
    def possible(self) -> bool:
        """Whether this engine's saves can skip DCP at all (not in ``process`` mode, not with bounded staging)."""
        return self._config.async_mode in ("sync", "thread") and self._config.max_staging_bytes is None

    @property
    def staged(self) -> bool:
        """Whether saves copy every tensor (the write runs after ``save`` returned)."""
        return self._config.async_mode != "sync"

    def number(
        self,
        structure: int,
        tensors: Mapping[str, Any],
        aliases: Mapping[str, str],
        blob_keys: frozenset[str],
        root: str,
    ) -> int:
        """This rank's repeat number for a save of local structure number ``structure``: it changes whenever
        something that decides where this rank's bytes go changes (gathered with the structure numbers)."""
        cpu = all(t.is_cpu for t in tensors.values() if isinstance(t, torch.Tensor))
        described: tuple[Any, ...] = (root, cpu, tuple(sorted(aliases.items())), blob_keys)
        if not self.staged:  # sync mode writes large tensors from their own memory: where it starts matters
            if self._large[0] != structure:  # tensors kept in blobs are copied, never written from their memory
                self._large = (structure, [k for k, t in tensors.items() if _large(t) and k not in blob_keys])
            where = []
            for key in self._large[1]:
                tensor = tensors[key]
                where.append((tensor.is_contiguous(), tensor.data_ptr() % BLOCK))
            described += (tuple(where),)
        return self._numbers.number(described)

    def ready(self) -> str | None:
        """The key of the save this engine can repeat without DCP (``None``: none)."""
        return self._seed[0] if self._seed is not None and self.possible else None

    def seed(
        self, request: RepeatRequest, items: list[Any] | None, metadata: Any, release_staging: Callable[[], None]
    ) -> None:
        """After a save DCP wrote (``metadata``; ``None`` if it failed): when saves of the same structure can be written
        without DCP, lay this rank's files out for them now, in the background of the save that just ended (with
        staged saves, DCP's staging buffers are released first: the images take their place)."""
        self.forget()
        if not self.possible or items is None or metadata is None:
            return
        if not RankTemplate.eligible(items, request.tensors, request.plain):
            return
        if self.staged:
            release_staging()
        template = RankTemplate.build(
            items,
            request.tensors,
            request.plain,
            request.aliases,
            request.blob_keys,
            rank=self._groups.rank,
            thread_count=self._config.thread_count,
            staged=self.staged,
        )
        if template is not None:
            self._template = template
            self._coordinator = Coordinator(metadata) if self._groups.is_coordinator else None
            self._seed = (request.key, metadata)

    def seeding(
        self, request: RepeatRequest | None, writer: Any, on_done: Any, release_staging: Callable[[], None]
    ) -> Any:
        """``on_done`` for a save DCP writes: first keeps its plan as the seed of later saves (on success)."""
        if request is None or not self.possible:
            return on_done

        def done(metadata: Any) -> None:
            try:
                self.seed(request, getattr(writer, "final_items", None), metadata, release_staging)
            except Exception as err:  # noqa: BLE001 - a save that cannot seed is still saved
                self.forget()
                log.debug("Not keeping the plan of this save: %s", err)
            if on_done is not None:
                on_done(metadata)

        return done

    def begin(self, request: RepeatRequest, writer: Any, background: bool) -> Any:
        """Start a save without DCP: its ``Metadata`` once committed (``sync``), or its (staging, upload) futures
        (``thread``: the write, and with ``background`` staging the copy too, run in a thread of their own)."""
        job = self.start(request, writer)
        if not self.staged:
            job.copy()
            return self.complete(job)
        if not background:
            job.copy()
        staging: Future | None = Future() if background else None
        upload: Future = Future()

        def run() -> None:
            try:
                if staging is not None:
                    try:
                        job.copy()
                    except BaseException as err:  # noqa: BLE001 - the write below reports it to every rank
                        staging.set_exception(err)
                    else:
                        staging.set_result(None)
                upload.set_result(self.complete(job))
            except BaseException as err:  # noqa: BLE001 - raised by the next call on the engine
                upload.set_exception(err)

        threading.Thread(target=run, name="dcp-plugin-save", daemon=True).start()
        return staging, upload

    def forget(self) -> None:
        """Drop the seed and the template (and the template's images)."""
        self._seed = None
        self._template = None
        self._coordinator = None

    def start(self, request: RepeatRequest, writer: Any) -> RepeatJob:
        """The job of one save without DCP: its snapshot copy (:meth:`RepeatJob.copy`) and its write."""
        assert self._seed is not None and self._seed[0] == request.key and self._template is not None
        return RepeatJob(self, self._template, request, writer)

    def complete(self, job: RepeatJob) -> Any:
        """Write, gather, commit (coordinator), broadcast: every rank calls it, whatever happened on it."""
        error: BaseException | None = job.error
        report = RepeatReport(error=_text(error)) if error is not None else None
        if report is None:
            try:
                report = job.write()
            except BaseException as err:  # noqa: BLE001 - reported to every rank below
                error, report = err, RepeatReport(error=_text(err))
        reports = self._groups.gather(report)
        outcome: dict[str, Any] = {}
        if self._groups.is_coordinator:
            assert reports is not None and self._coordinator is not None
            try:
                outcome = self._coordinator.finish(job.context(), reports)
            except BaseException as err:  # noqa: BLE001 - every rank learns of it
                outcome = {"error": err if _picklable(err) else RuntimeError(_text(err))}
        outcome = self._groups.broadcast(outcome)
        failure = outcome.get("error") or error
        if failure is not None:
            self.forget()
            rank = 0 if outcome.get("error") is not None else self._groups.rank
            raise CheckpointException("a save written without DCP failed", {rank: (failure, traceback.StackSummary())})
        assert self._seed is not None and report is not None
        return rank_metadata(self._seed[1], job.template.entries, outcome, report.fingerprints)


class RepeatJob:
    """One save without DCP on this rank: the sources and byte items taken at ``save``, the snapshot copy, the
    write."""

    def __init__(self, saves: RepeatSaves, template: RankTemplate, request: RepeatRequest, writer: Any) -> None:
        self.template = template
        self._writer = writer
        self._rank = saves._groups.rank
        self.error: BaseException | None = None
        self._sources = template.sources(request.tensors)
        self._bytes = template.serialize(request.plain)  # now: a plain value changed later is not what is saved
        plan = getattr(writer, "incremental_plan", None)
        unchanged = plan.unchanged if plan is not None else frozenset()
        self._stage_blobs = (
            [position for item, position in template.blob_items if item.index.fqn not in unchanged]
            if template.staged
            else []
        )

    def copy(self) -> None:
        """The snapshot: every byte this save writes from the images is copied into them now."""
        try:
            targets, values = self.template.copies(self._sources, self._stage_blobs)
            with torch.no_grad():
                torch._foreach_copy_(targets, values)
            if self.template.staged:
                self._sources = []  # the write reads the images only: the live tensors may change now
        except BaseException as err:
            self.error = err
            raise

    def context(self) -> Any:
        return self._writer.repeat_context()

    def write(self) -> RepeatReport:
        return self.template.write(self.context(), self._sources, self._bytes, self._rank)


def _large(tensor: Any) -> bool:
    return isinstance(tensor, torch.Tensor) and tensor.numel() * tensor.element_size() >= DIRECT_FROM_MEMORY


def _text(err: BaseException | None) -> str:
    return "" if err is None else " ".join(f"{type(err).__name__}: {err}".split())


def _picklable(err: BaseException) -> bool:
    import pickle

    try:
        pickle.loads(pickle.dumps(err))
        return True
    except Exception:  # noqa: BLE001
        return False


__all__ = ["RepeatJob", "RepeatRequest", "RepeatSaves"]
