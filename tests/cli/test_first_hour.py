"""What a new user runs the command on in the first hour, and what it must say: files of other formats, one
checkpoint where a directory belongs, a run directory where one checkpoint belongs, listings after ``adopt``."""

from __future__ import annotations

import io
import os

import pytest
import torch
import torch.distributed.checkpoint as dcp

from dcp_plugin import CheckpointManager
from dcp_plugin.cli import main
from dcp_plugin.cli.progress import ProgressBar
from dcp_plugin.storage.integrity import check_files, hash_file
from tests.models import make_model


def _saved(directory: str, steps: tuple[int, ...] = (1, 2)) -> None:
    model = make_model()
    with CheckpointManager(directory, async_mode="sync") as manager:
        for step in steps:
            manager.save(step, {"model": model})


def test_inspect_on_a_safetensors_file_names_safetensors_not_torch_load(tmp_path, capsys):
    from safetensors.torch import save_file

    path = tmp_path / "model.safetensors"
    save_file({"w": torch.ones(4)}, str(path))
    for argv in (["inspect", str(path)], ["verify", str(path)]):
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert "is a safetensors file" in err and "safetensors.torch.load_file" in err, err
        assert "torch.load(" not in err


def test_a_file_of_unknown_kind_gets_no_loader_suggestion(tmp_path, capsys):
    path = tmp_path / "notes.txt"
    path.write_text("hello")
    assert main(["inspect", str(path)]) == 1
    err = capsys.readouterr().err
    assert "is a file" in err and "torch.load(" not in err and "safetensors" not in err


def test_a_fifo_in_place_of_a_checkpoint_is_not_opened(tmp_path, capsys):
    fifo = tmp_path / "step_000000001"
    os.mkfifo(fifo)  # opening it for reading would wait for a writer forever
    assert main(["inspect", str(fifo)]) == 1
    assert "is a file" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["purge", "latest"])
def test_directory_commands_on_one_checkpoint_are_usage_errors_naming_the_directory(ckpt_dir, capsys, command):
    _saved(ckpt_dir)
    one = os.path.join(ckpt_dir, "step_000000002")
    assert main([command, one]) == 2
    err = capsys.readouterr().err
    assert "is one checkpoint, not a directory of checkpoints" in err
    assert f"dcp-plugin {command} {ckpt_dir}" in err
    assert main([command, ckpt_dir]) == 0


def test_best_on_one_checkpoint_is_a_usage_error(ckpt_dir, capsys):
    _saved(ckpt_dir)
    assert main(["best", os.path.join(ckpt_dir, "step_000000001"), "--metric", "loss"]) == 2
    assert f"dcp-plugin best {ckpt_dir}" in capsys.readouterr().err


def test_convert_lightning_on_a_run_directory_says_it_is_a_run_directory(ckpt_dir, tmp_path, capsys):
    pytest.importorskip("lightning")
    _saved(ckpt_dir)
    assert main(["convert-lightning", ckpt_dir, str(tmp_path / "model.ckpt")]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"dcp-plugin convert-lightning: {ckpt_dir} is a run directory holding 2 checkpoints"), err
    assert "Checkpoint file not found" not in err and not (tmp_path / "model.ckpt").exists()


def _plain(directory, step: int) -> str:
    path = os.path.join(directory, f"step-{step}")
    dcp.save({"model": make_model().state_dict()}, checkpoint_id=path, no_dist=True)
    return path


def test_adopt_on_a_run_directory_lists_the_plain_dcp_directories_to_adopt(tmp_path, capsys):
    run = tmp_path / "outputs"
    for step in (10, 20, 30):
        _plain(run, step)
    assert main(["adopt", os.path.join(run, "step-20")]) == 0
    capsys.readouterr()
    assert main(["adopt", str(run)]) == 2
    err = capsys.readouterr().err
    assert "holding 2 plain DCP directories" in err
    assert f"dcp-plugin adopt {run}/step-10" in err and f"dcp-plugin adopt {run}/step-30" in err
    assert "step-20" not in err  # already adopted: never suggested again


def test_adopt_on_a_directory_of_committed_checkpoints_says_there_is_nothing_to_adopt(ckpt_dir, capsys):
    _saved(ckpt_dir)
    assert main(["adopt", ckpt_dir]) == 2
    err = capsys.readouterr().err
    assert "nothing to adopt" in err and "step_000000002" not in err


def test_ls_stays_oldest_first_after_adopt(tmp_path, capsys):
    run = tmp_path / "outputs"
    for step in (10, 20, 30):
        _plain(run, step)
    assert main(["adopt", os.path.join(run, "step-20")]) == 0
    capsys.readouterr()
    assert main(["ls", str(run)]) == 0
    names = [line.split()[0] for line in capsys.readouterr().out.splitlines()[1:]]
    assert names == ["step-10", "step-20", "step-30"]


def test_verify_reports_progress_chunk_by_chunk_and_adds_up_to_the_total(tmp_path, monkeypatch):
    from dcp_plugin.storage import read_io

    monkeypatch.setattr(read_io, "CHUNK", 1024)  # 1 KiB chunks of a small file stand for 16 MiB ones of a big one
    path = os.path.join(tmp_path, "big")
    with open(path, "wb") as handle:
        handle.write(os.urandom(10_000))
    counts: list[int] = []
    size, digest = hash_file(None, path, is_local=True, progress=counts.append)
    assert size == 10_000 and counts == [1024] * 9 + [784]
    damaged: list[int] = []
    problems = check_files(
        None, str(tmp_path), {"big": {"size": 10_001, "xxh3_128": digest}}, is_local=True, progress=damaged.append
    )
    assert problems and sum(damaged) == 10_001  # a file that is not hashed still counts its recorded size


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_progress_shows_no_time_left_until_it_means_something():
    clock, stream = _Clock(), io.StringIO()
    bar = ProgressBar(10 * 2**30, "verifying", stream=stream, clock=clock)
    clock.now += 0.5
    bar.update(4096)  # a tiny first file after a slow start: a rate from it would promise hours
    assert "left" not in bar.line() and "/s" not in bar.line()
    clock.now += 1.0
    bar.update(2**30)
    line = bar.line()
    assert "10%" in line and "1.0 GiB / 10.0 GiB" in line and "left" in line
    left = line.rsplit("  ", 1)[-1]
    assert left == "00:13 left", line  # 9 GiB at the average rate so far (1 GiB in 1.5 s)
    bar.update(9 * 2**30)
    assert "100%" in bar.line() and "left" not in bar.line()
    bar.close()
    assert stream.getvalue().endswith("\r\x1b[K")


def test_progress_is_silent_when_not_shown():
    stream = io.StringIO()
    with ProgressBar(100, "x", stream=stream, show=False) as bar:
        bar.update(50)
    assert stream.getvalue() == "" and bar.n == 50
