"""With dcp-plugin enabled on an Accelerator, the staging buffers are prepared after the first optimizer step,
and a checkpoint saved later still holds the state at save time."""

from __future__ import annotations

from accelerate import Accelerator

import dcp_plugin.accelerate as dpa
from tests.models import assert_same, make_training, snapshot, train_step


def test_the_first_step_prepares_staging_buffers_and_save_state_holds_the_state_at_save_time(tmp_path):
    accelerator = Accelerator(cpu=True)
    model, optimizer, _ = make_training()
    model, optimizer = accelerator.prepare(model, optimizer)
    checkpointer = dpa.enable(accelerator, async_mode="thread")
    assert checkpointer.engine.needs_prepare
    train_step(model, optimizer)
    assert not checkpointer.engine.needs_prepare
    train_step(model, optimizer)
    assert_save_state_holds_the_state_at_save_time(accelerator, model, optimizer, tmp_path)


def test_the_first_step_starts_the_writer_process_in_process_mode(tmp_path):
    """Accelerate has no setup hook of its own: the first optimizer step starts the writer process, so the first
    save_state does not wait seconds for a fresh interpreter."""
    from torch.distributed.checkpoint import _async_process_executor as executor

    from dcp_plugin.engine import daemon

    daemon.shutdown()  # a daemon left by an earlier test would hide whether this one starts it
    accelerator = Accelerator(cpu=True)
    model, optimizer, _ = make_training()
    model, optimizer = accelerator.prepare(model, optimizer)
    dpa.enable(accelerator, async_mode="process")
    assert executor._CHECKPOINT_PROCESS is None and daemon._starting is None
    train_step(model, optimizer)
    assert executor._CHECKPOINT_PROCESS is not None or daemon._starting is not None
    assert_save_state_holds_the_state_at_save_time(accelerator, model, optimizer, tmp_path)


def assert_save_state_holds_the_state_at_save_time(accelerator, model, optimizer, tmp_path) -> None:
    expected = snapshot(model, optimizer)
    accelerator.save_state(str(tmp_path / "ckpt"))
    train_step(model, optimizer)  # changes the parameters while the write may still run
    accelerator.wait_for_everyone()
    accelerator.load_state(str(tmp_path / "ckpt"))
    assert_same(snapshot(model, optimizer), expected)
    dpa.disable(accelerator)
