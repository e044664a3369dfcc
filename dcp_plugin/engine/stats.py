"""``SaveStats``: the timings of one save, as the training loop experienced them."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class SaveStats:
    """Timings of one save. Returned by every ``save``; the engine fills in the rest when the write ends."""

    name: str
    """The checkpoint's name in its directory (``step_000000100``...)."""
    url: str
    """Where the checkpoint was written (a local path or an fsspec URL)."""
    step: int | None
    """The training step saved, or ``None`` when the save named none."""
    mode: str
    """The ``async_mode`` the save ran in: ``sync``, ``thread`` or ``process``."""
    blocking_s: float
    """How long ``save`` kept the caller from continuing (measured by the checkpointer)."""
    staging_s: float | None = None
    """Time to copy the snapshot off the live tensors (measured from the start of ``save``)."""
    durable_s: float | None = None
    """Time from the start of ``save`` until the checkpoint was committed (files written and synced)."""
    bytes_written: int | None = None
    """Bytes this save wrote (all ranks together)."""
    staging_wait_s: float = 0.0
    """With async staging: time the loop later spent in ``wait_for_staging`` for this save."""
    direct_io: bool | None = None
    """Whether the tensor files bypassed the page cache (``O_DIRECT``): False where the filesystem refused it and
    they were written through the page cache (logged once per filesystem), None where it does not apply (remote
    storage, or the save failed)."""
    error: str | None = None
    """Why the background write failed; ``None`` while it runs or once it succeeded."""

    @property
    def training_wait_s(self) -> float:
        """Everything the training loop waited for this save: ``save`` itself plus any staging wait."""
        return self.blocking_s + self.staging_wait_s

    @property
    def throughput_bytes_per_s(self) -> float | None:
        """Bytes written per second until the checkpoint was durable; ``None`` until then."""
        if not self.bytes_written or not self.durable_s:
            return None
        return self.bytes_written / self.durable_s

    def metrics(self, prefix: str = "checkpoint/") -> dict[str, float]:
        """The numbers a metrics logger records for this save (names under ``prefix``); the durable time, size and
        throughput only once the write committed."""
        values = {"blocking_s": self.blocking_s, "training_wait_s": self.training_wait_s}
        if self.staging_s is not None:
            values["staging_s"] = self.staging_s
        if self.durable_s is not None:
            values["durable_s"] = self.durable_s
        if self.bytes_written is not None:
            values["bytes"] = float(self.bytes_written)
        if self.throughput_bytes_per_s is not None:
            values["throughput_mib_s"] = self.throughput_bytes_per_s / 2**20
        return {f"{prefix}{name}": value for name, value in values.items()}

    def summary(self) -> str:
        """One log line: the wait, staging and durable times, size, throughput and any failure."""
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
