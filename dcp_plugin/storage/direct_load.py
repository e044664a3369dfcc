"""The verifying reader's direct path: a load's tensors read straight from local files into their destinations,
each file hashed in the same pass, and everything the path does not take handed back for DCP's reader.

Per file (:mod:`~dcp_plugin.storage.read_pipeline` reads them, several requests in flight): every byte is read once
and hashed in order. Records for placeholders made for the load (Lightning's dict, ``read()``, the state given to
an optimizer that never stepped) are read straight into them in that pass. Records for live tensors are only
hashed in that pass and read into the tensors from the page cache once the whole file matched its checksum, so a
load that fails on a damaged file leaves the live state as it was. Then each record's head and tail must be what
PyTorch writes for its tensor (:mod:`~dcp_plugin.storage.record_layout`); one that is not is handed back, with
what :func:`~dcp_plugin.storage.direct_read.plan` did not take, to be read by ``torch.load`` through DCP.

Every data file a load touches is opened once (``O_NOFOLLOW | O_NONBLOCK``, regular files only, its size checked
against the manifest) and held until the load ends (:class:`HeldFiles`): what DCP's reader reads later from the
same file, and the final check of files read without hashing, go through the same descriptor. A file replaced by
another process during the load cannot mix its bytes into the load; the checkpointer's replaced-while-read check
starts the load over instead.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import IO, Any

import torch
from torch.distributed.checkpoint.metadata import Metadata

from dcp_plugin.storage import direct_read
from dcp_plugin.storage.integrity import ALGORITHM
from dcp_plugin.storage.read_io import hash_descriptor
from dcp_plugin.storage.read_items import filled
from dcp_plugin.storage.read_pipeline import BATCH_BYTES, FileRead, Pipeline, ShortFile
from dcp_plugin.storage.safe_io import open_local_regular

log = logging.getLogger(__name__)


class HeldFiles:
    """The open data files of one load: one descriptor per file, closed when the load ends."""

    def __init__(self) -> None:
        self.active = False
        self._open: dict[str, IO[bytes]] = {}

    def open(self, relative: str, path: str) -> tuple[IO[bytes], bool]:
        """(the open file, whether it is held); a file that is not held is the caller's to close."""
        handle = self._open.get(relative)
        if handle is not None:
            return handle, True
        handle = open_local_regular(path)
        if self.active:
            self._open[relative] = handle
        return handle, self.active

    @contextmanager
    def holding(self) -> Iterator[None]:
        """Hold every file opened until the block ends, then close them all."""
        self.active = True
        try:
            yield
        finally:
            self.close()

    def held(self, relative: str) -> IO[bytes] | None:
        return self._open.get(relative)

    def close(self) -> None:
        self.active = False
        opened, self._open = self._open, {}
        for handle in opened.values():
            handle.close()


class _Outcome:
    """What the reads of one call produced: tensors filled, records left to DCP's reader."""

    def __init__(self, planned: direct_read.Planned, flat: Mapping[str, Any]) -> None:
        self.planned, self.flat = planned, flat
        self.filled: list[torch.Tensor] = []

    def took(self, record: direct_read.Record) -> None:
        self.filled.append(record.dest)
        for copy in record.copies:
            copy.copy_(record.dest)
            self.filled.append(copy)

    def left(self, relative: str, records: list[direct_read.Record]) -> None:
        if records:
            log.debug("%d records of %s are not laid out as expected; torch.load reads them", len(records), relative)
            self.planned.give_back(relative, records, self.flat)


def read_direct(reader: Any, flat: Mapping[str, Any], metadata: Metadata, *, verify: bool) -> dict[str, Any]:
    """Read every tensor of ``flat`` (checkpoint key -> destination) that the direct path takes, through
    ``reader`` (a verifying reader holding its files); returns the rest, for DCP's reader. With ``verify``, each
    file read is hashed whole and checked against its checksum before this returns; without, the files are only
    marked used (``finish_verification`` checks them)."""
    if not reader._dcp_plugin_root.is_local or not reader._dcp_plugin_held.active or reader.fetch_missing is not None:
        return dict(flat)  # a restore on node-local disks fetches the files it lacks inside DCP's read (collective)
    planned = direct_read.plan(flat, metadata)
    outcome = _Outcome(planned, flat)
    total = sum(record.length for records in planned.files.values() for record in records)
    pipeline = Pipeline(threads=total > 2 * BATCH_BYTES)
    try:
        for relative, records in planned.files.items():
            read = _first_read(reader, relative, records, verify, outcome, pipeline)
            if read is None:
                planned.give_back(relative, records, flat)
            else:
                pipeline.add(read)
        pipeline.run()
    except ShortFile as err:
        reader._raise_damaged(str(err))
    finally:
        pipeline.close()
    if outcome.filled:
        torch.autograd.graph.increment_version(outcome.filled)  # written through their memory, as copy_ marks them
        for tensor in outcome.filled:
            filled(tensor)
    return planned.rest


def _first_read(
    reader: Any, relative: str, records: list[direct_read.Record], verify: bool, outcome: _Outcome, pipeline: Any
) -> FileRead | None:
    """The read of ``relative`` that hashes it (if it is to be verified now) and fills what may be filled before
    it is; ``None`` where the file is better left to DCP's reader."""
    committed = reader._check_record(relative)
    handle, _held = reader._open_local(relative)
    fd = handle.fileno()
    size = os.fstat(fd).st_size
    if not _disjoint_spans(records) or not _probe(fd, records[0]):
        return None
    end = records[-1].offset + records[-1].length
    if end > size:
        reader._raise_damaged(f"{relative} ends early (at {size} bytes)")
    whole = verify and committed is not None and relative not in reader._dcp_plugin_verified
    if not whole and committed is not None and relative not in reader._dcp_plugin_verified:
        reader._dcp_plugin_used.add(relative)
    read = FileRead(fd, relative, hashing=whole)
    later = []
    for record in records:
        if whole:
            read.scratch(record.offset - read.position)
        else:
            read.skip_to(record.offset)
        layout = record.layout
        read.scratch(len(layout.head), record.set_head)
        if whole and record.live:
            read.scratch(layout.nbytes)
            later.append(record)
        else:
            read.into(record.dest, layout.nbytes)
        read.scratch(len(layout.tail), record.set_tail)
    if whole:
        read.scratch(size - read.position)
    read.done = functools.partial(_first_done, reader, read, records, later, committed, outcome, pipeline)
    return read


def _first_done(
    reader: Any,
    read: FileRead,
    records: list[direct_read.Record],
    later: list[direct_read.Record],
    committed: Any,
    outcome: _Outcome,
    pipeline: Pipeline,
    digest: str | None,
) -> None:
    relative = read.name
    if digest is not None:
        if digest != committed[ALGORITHM]:
            reader._raise_damaged(f"{relative} does not match its checksum (the file was changed or damaged)")
        reader._dcp_plugin_verified.add(relative)
    waiting = {id(record) for record in later}
    second, mismatched = [], []
    for record in records:
        if not record.layout.matches(record.head, record.tail):
            mismatched.append(record)
        elif id(record) in waiting:
            second.append(record)
        else:
            outcome.took(record)
    outcome.left(relative, mismatched)
    if second:  # live tensors: their bytes again, now that the file verified (from the page cache)
        again = FileRead(read.fd, relative)
        for record in second:
            again.skip_to(record.offset + len(record.layout.head))
            again.into(record.dest, record.layout.nbytes)
        again.done = functools.partial(_took_all, outcome, second)
        pipeline.add(again)


def _took_all(outcome: _Outcome, records: list[direct_read.Record], _digest: str | None) -> None:
    for record in records:
        outcome.took(record)


def _disjoint_spans(records: list[direct_read.Record]) -> bool:
    """Records (sorted by offset) that do not overlap; a file whose metadata says otherwise is read by DCP's
    reader, record by record, as before."""
    end = 0
    for record in records:
        if record.offset < end:
            return False
        end = record.offset + record.length
    return True


def _probe(fd: int, record: direct_read.Record) -> bool:
    """Whether the file's first record taken here starts as expected: a file of another layout (another torch
    version's records) is read by DCP's reader instead of twice."""
    layout = record.layout
    head = os.pread(fd, len(layout.head), record.offset)
    return head in (layout.head, layout.head_crc)


def check_held(reader: Any, names: list[str]) -> tuple[list[str], list[str]]:
    """Hash the held files among ``names`` against their checksums: (problems, the names not held)."""
    problems, others = [], []
    for relative in names:
        handle = reader._dcp_plugin_held.held(relative)
        if handle is None:
            others.append(relative)
            continue
        record = reader._dcp_plugin_places.record(relative)
        if record is None:
            problems.append(f"{relative} has no recorded checksum")
        elif hash_descriptor(handle.fileno()) != record.get(ALGORITHM):
            problems.append(f"{relative} does not match its checksum (the file was changed or damaged)")
    return problems, others


__all__ = ["HeldFiles", "check_held", "read_direct"]
