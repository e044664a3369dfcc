"""Every Accelerate test starts from fresh Accelerate singletons."""

from __future__ import annotations

import pytest
from accelerate.state import AcceleratorState, GradientState, PartialState


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    # GradientState too: it keeps references to the data loaders of earlier tests (which do not pickle)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(True)
    PartialState._reset_state()
    GradientState._reset_state()
