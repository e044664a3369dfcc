"""Validated settings of a benchmark run."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


class SettingsError(ValueError):
    """A benchmark setting cannot work; the message says which one and what to use."""


@dataclass
class BenchSettings:
    """What to measure and how often."""

    state_mib: float = 1024.0
    """Size of the checkpointed state in MiB: fp32 parameters plus AdamW's two moments (3x the parameters)."""

    repeats: int = 3
    """Runs of every contender, interleaved (each repetition runs all contenders once, in rotated order)."""

    saves: int = 3
    """Timed saves per run, after one untimed warm-up save (daemon start, buffer allocation)."""

    leak_saves: int = 20
    """In the first repetition, saves per run for the memory-growth check (at least ``saves``)."""

    train_steps: int = 5
    """Training steps timed without checkpointing, the baseline for throughput during a background write."""

    overlap_saves: int = 2
    """Saves during which training continues (async contenders), to measure throughput while writing."""

    contenders: list[str] = field(default_factory=list)
    """Contender names to run; empty: every available one."""

    directory: str | None = None
    """Where checkpoints are written (a fresh subdirectory is used and removed). Default: the temp dir."""

    out: str = "benchmarks/results/latest"
    """Output prefix: ``<out>.json``, ``<out>.md`` and ``<out>.png`` are written."""

    worker_timeout_s: float = 1800.0
    """A contender run taking longer than this is killed and reported as failed."""

    sample_interval_s: float = 0.02
    """Interval of the host-memory sampler."""

    def __post_init__(self) -> None:
        if not isinstance(self.state_mib, (int, float)) or self.state_mib <= 0:
            raise SettingsError(f"state_mib={self.state_mib!r} must be a positive number of MiB.")
        for name, low in (
            ("repeats", 1),
            ("saves", 1),
            ("leak_saves", 1),
            ("train_steps", 1),
            ("overlap_saves", 1),
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise SettingsError(f"{name}={value!r} must be an integer >= {low}.")
        if self.leak_saves < self.saves:
            raise SettingsError(f"leak_saves={self.leak_saves} must be at least saves={self.saves}.")
        if self.worker_timeout_s <= 0 or self.sample_interval_s <= 0:
            raise SettingsError("worker_timeout_s and sample_interval_s must be positive.")
        self.contenders = list(self.contenders)

    @property
    def state_bytes(self) -> int:
        return int(self.state_mib * 2**20)

    def replace(self, **changes: object) -> BenchSettings:
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]


QUICK = {"state_mib": 64.0, "repeats": 1, "saves": 2, "leak_saves": 2, "train_steps": 2, "overlap_saves": 1}
"""The ``--quick`` preset: every contender once on a 64 MiB state. Most of its time is twelve fresh
processes importing torch: about two minutes on an idle 2-CPU machine, several on a busy one."""
