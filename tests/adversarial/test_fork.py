"""A saver, then ``fork()``. A manager made in the child starts a writer of its own and saves; the parent's
writer daemon is neither used nor stopped by the child; a manager inherited from the parent (its process group,
staging threads and daemon stayed in the parent) refuses with a clear error instead of hanging. Real fork, real
daemons, process and thread mode."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

SCRIPT = r"""
import os, sys, traceback
import torch
import torch.distributed as dist
from dcp_plugin import CheckpointManager
from dcp_plugin.errors import ConfigError

def child(root, parent_manager):
    try:
        try:  # either a clear error, or a save with a writer of the child's own; never a hang
            parent_manager.save(5, {"w": torch.ones(4)})
            parent_manager.wait()
        except ConfigError as err:
            assert "forked" in str(err) and "new CheckpointManager" in str(err), err
        else:
            state = {"w": torch.zeros(4)}
            CheckpointManager(os.path.join(root, "parent"), async_mode="sync").load(state, step=5)
            assert torch.equal(state["w"], torch.ones(4))
        own = CheckpointManager(os.path.join(root, "child"), async_mode="process")
        own.save(1, {"w": torch.full((4,), 7.0)})
        own.close()
        state = {"w": torch.zeros(4)}
        CheckpointManager(os.path.join(root, "child"), async_mode="sync").load(state)
        assert torch.equal(state["w"], torch.full((4,), 7.0))
        print("child saved", flush=True)
        return 0
    except BaseException:
        traceback.print_exc()
        return 1

def main(root, with_group, mode):
    torch.set_num_threads(1)
    if with_group:  # the user's own one-rank group: the manager's checkpoint group is made from it
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    manager = CheckpointManager(os.path.join(root, "parent"), async_mode=mode)
    manager.save(1, {"w": torch.ones(4)})
    manager.wait()
    pid = os.fork()
    if pid == 0:
        os._exit(child(root, manager))
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, status
    manager.save(2, {"w": torch.full((4,), 2.0)})  # the parent's daemon still serves the parent
    manager.close()
    assert 1 in manager.steps and 2 in manager.steps
    print("parent saved", flush=True)

if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] == "group", sys.argv[3])
"""


@pytest.mark.slow
@pytest.mark.parametrize(("group", "mode"), [("group", "process"), ("no-group", "process"), ("no-group", "thread")])
def test_a_forked_child_saves_with_its_own_writer_and_the_parent_keeps_its_own(tmp_path, group, mode):
    script = tmp_path / "fork_saver.py"
    script.write_text(SCRIPT)
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    command = [sys.executable, str(script), str(tmp_path), group, mode]
    # its own session, so that a hang kills the child and every writer daemon with it
    run = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True
    )
    try:
        out, err = run.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(run.pid, signal.SIGKILL)
        out, err = run.communicate()
        pytest.fail(f"a forked saver hung:\n{out}{err}")
    assert run.returncode == 0, out + err
    assert "child saved" in out and "parent saved" in out, out + err
