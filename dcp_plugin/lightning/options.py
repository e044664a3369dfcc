"""Constructor values of the Lightning classes given the way a LightningCLI YAML file can write them.

jsonargparse can only represent plain values: signals are accepted as names (``"SIGTERM"``, ``"USR1"``) or
numbers as well as ``signal.Signals``, dtypes as names (``"bfloat16"``) as well as ``torch.dtype``.
"""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterable
from typing import Any

import torch

from dcp_plugin.policies import SaveOptions


def as_signal(value: Any) -> signal.Signals:
    """``signal.Signals`` for a name (``"SIGTERM"``, ``"term"``), a number or a ``signal.Signals``."""
    if isinstance(value, str):
        text = value.strip().upper()
        if text.isdigit():
            return signal.Signals(int(text))
        name = text if text.startswith("SIG") else f"SIG{text}"
        try:
            return signal.Signals[name]
        except KeyError:
            raise ValueError(f"Unknown signal {value!r}; use a name such as 'SIGTERM' or a number.") from None
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"A signal must be a name, a number or a signal.Signals value, got {value!r}.")
    return signal.Signals(value)


def as_signals(values: Iterable[Any]) -> tuple[signal.Signals, ...]:
    if isinstance(values, (str, int)):
        values = [values]
    return tuple(as_signal(v) for v in values)


def as_dtype(value: Any) -> torch.dtype | None:
    """``torch.dtype`` for a name (``"bfloat16"``, ``"torch.float16"``) or a ``torch.dtype`` (``None`` stays)."""
    if value is None or isinstance(value, torch.dtype):
        return value
    if isinstance(value, str):
        dtype = getattr(torch, value.strip().removeprefix("torch."), None)
        if isinstance(dtype, torch.dtype):
            return dtype
    raise ValueError(f"export_dtype must be a floating-point torch.dtype or its name (e.g. 'bfloat16'): {value!r}.")


def save_options(
    every_n_train_steps: int | None,
    every_n_seconds: float | None,
    every_n_epochs: int | None,
    save_on_signal: bool,
    signals: Iterable[Any],
    save_on_exception: bool,
    clock: Callable[[], float],
) -> SaveOptions:
    """``DCPCheckpoint``'s save triggers (every epoch when none is given)."""
    no_trigger = every_n_train_steps is None and every_n_seconds is None and every_n_epochs is None
    return SaveOptions(
        every_n_train_steps,
        every_n_seconds,
        1 if no_trigger else every_n_epochs,
        check_bool("save_on_signal", save_on_signal),
        as_signals(signals),
        check_bool("save_on_exception", save_on_exception),
        clock,
    )


def checked_export_dtype(export_final: bool, export_dtype: Any) -> torch.dtype | None:
    dtype = as_dtype(export_dtype)
    if dtype is not None and not dtype.is_floating_point:
        raise ValueError(f"export_dtype must be a floating-point torch.dtype (e.g. torch.bfloat16): {export_dtype!r}.")
    if dtype is not None and not export_final:
        raise ValueError("export_dtype only applies to the final export; pass export_final=True too.")
    return dtype


def check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}.")
    return value


__all__ = ["as_dtype", "as_signal", "as_signals", "check_bool", "checked_export_dtype", "save_options"]
