"""The host staging buffers of one engine: DCP's stager (reused from save to save), the bounded pool of
``max_staging_bytes``, and the head start that allocates the buffers before the first save."""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

from dcp_plugin.config import CheckpointConfig
from dcp_plugin.engine.staging.pool import BoundedStager, StagingPool, bounded_stager
from dcp_plugin.engine.staging.prestage import Prestage


@functools.cache
def stager_survives_reuse() -> bool:
    """Whether this torch's ``DefaultStager`` can stage again after a stage.

    Some releases (2.11 among them) tear the stager's internals down at the end of every stage: the cached
    buffers are dropped anyway and the next stage of any dict fails with ``KeyError: <class 'type'>``. There
    a fresh stager is made for each save. Probed once, on a tiny state.
    """
    probe = DefaultStager(StagingOptions(False, False, False, False))
    try:
        for _ in range(2):
            probe.stage({"probe": [torch.zeros(1)]})
        return True
    except Exception:
        return False
    finally:
        probe.close()


class Stagers:
    """Picks the stager for each save and owns the buffers behind it until :meth:`close`."""

    def __init__(self, config: CheckpointConfig) -> None:
        self.config = config
        self._default: DefaultStager | None = None
        self._pool: StagingPool | None = None  # max_staging_bytes: the fixed host pool, kept for the engine's life
        self._prestage = Prestage()

    @property
    def needs_prepare(self) -> bool:
        """Whether :meth:`prepare` would still do something (not yet prepared or saved; buffers are kept)."""
        return (
            not self._prestage.over
            and self.config.is_async
            and self.config.reuse_buffers
            and self.config.max_staging_bytes is None  # a bounded pool is allocated once, at its first use
            and stager_survives_reuse()
        )

    def prepare(self, flat_state: dict[str, Any]) -> None:
        """Stage ``flat_state`` once in the background so that the first save finds its buffers allocated."""
        if self.needs_prepare:
            self._prestage.start(self._stager(None), flat_state)

    def for_save(self, writer: Any) -> DefaultStager | BoundedStager:
        """The stager of the next save (waits for a head start still running: its buffers are used now)."""
        self._prestage.finish()
        return self._stager(writer)

    def _stager(self, writer: Any) -> DefaultStager | BoundedStager:
        cuda = torch.cuda.is_available()
        pinned = cuda if self.config.pinned_memory is None else self.config.pinned_memory
        if self.config.max_staging_bytes is not None:
            if self._pool is None:
                self._pool = StagingPool(self.config.max_staging_bytes, pinned=pinned and cuda)
            return bounded_stager(self._pool, writer)
        if self._default is not None and self.config.reuse_buffers and stager_survives_reuse():
            return self._default
        shared = (
            (self.config.async_mode == "process") if self.config.shared_memory is None else self.config.shared_memory
        )
        options = StagingOptions(
            use_pinned_memory=pinned and cuda,
            use_shared_memory=shared,
            use_async_staging=self.config.stages_in_background,
            use_non_blocking_copy=pinned and cuda,
        )
        if self._default is not None:
            self._default.close()
        self._default = DefaultStager(options)
        return self._default

    def close(self) -> None:
        """Wait for a head start still running and release every buffer."""
        self._prestage.finish()
        if self._default is not None:
            self._default.close()
            self._default = None
        if self._pool is not None:
            self._pool.close()
            self._pool = None


__all__ = ["Stagers", "stager_survives_reuse"]
