"""The dcp-plugin command on real checkpoints: human and JSON output, exit codes, bad input, pipes, start-up."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys

import pytest
import torch

from dcp_plugin import CheckpointConfig, CheckpointManager, ConfigError, EveryNSteps, __version__
from dcp_plugin.cli import main
from tests.models import assert_same, make_model
from tests.paths import REPO

ISO = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d\d:\d\d")


def make_checkpoints(directory: str) -> torch.nn.Module:
    model = make_model()
    with CheckpointManager(directory, async_mode="sync") as manager:
        manager.save(1, {"model": model, "epoch": 0}, metadata={"loss": 0.5})
        manager.save(2, {"model": model, "epoch": 1}, metadata={"loss": 0.25})
    return model


def run_json(capsys, *argv: str) -> object:
    assert main(list(argv)) == 0
    return json.loads(capsys.readouterr().out)


def test_ls_shows_a_table_with_a_header_and_json(ckpt_dir, capsys):
    make_checkpoints(ckpt_dir)
    assert main(["ls", ckpt_dir]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["NAME", "STEP", "RANKS", "SIZE", "CREATED", "METRICS"]
    assert lines[1].split()[:3] == ["step_000000001", "1", "1"] and lines[2].startswith("step_000000002")
    assert "KiB" in lines[1] and ISO.search(lines[1]) and lines[2].endswith("loss=0.25")
    listed = run_json(capsys, "ls", ckpt_dir, "--json")
    assert [c["step"] for c in listed["checkpoints"]] == [1, 2]
    assert listed["checkpoints"][1]["metadata"] == {"loss": 0.25} and ISO.fullmatch(listed["checkpoints"][0]["created"])
    assert listed["broken"] == [] and listed["incomplete"] == []


def test_ls_says_when_the_directory_is_missing_or_is_a_checkpoint(ckpt_dir, tmp_path, capsys):
    assert main(["ls", str(tmp_path / "nope")]) == 1
    assert "no such directory" in capsys.readouterr().err
    make_checkpoints(ckpt_dir)
    one = os.path.join(ckpt_dir, "step_000000002")
    assert main(["ls", one]) == 0
    captured = capsys.readouterr()
    assert "is a checkpoint, not a directory of checkpoints" in captured.err
    assert captured.out.splitlines()[1].startswith("step_000000002")
    os.makedirs(tmp_path / "empty")
    assert main(["ls", str(tmp_path / "empty")]) == 0
    assert "no committed checkpoints" in capsys.readouterr().out


def test_latest_and_best_print_a_path_for_scripts(ckpt_dir, tmp_path, capsys):
    make_checkpoints(ckpt_dir)
    assert main(["latest", ckpt_dir]) == 0
    assert capsys.readouterr().out.strip() == os.path.join(ckpt_dir, "step_000000002")
    assert main(["best", ckpt_dir, "--metric", "loss"]) == 0
    assert capsys.readouterr().out.strip() == os.path.join(ckpt_dir, "step_000000002")
    assert main(["best", ckpt_dir, "--metric", "loss", "--mode", "max"]) == 0
    assert capsys.readouterr().out.strip() == os.path.join(ckpt_dir, "step_000000001")
    best = run_json(capsys, "best", ckpt_dir, "--metric", "loss", "--json")
    assert best["name"] == "step_000000002" and best["value"] == 0.25
    assert main(["best", ckpt_dir, "--metric", "accuracy"]) == 1
    assert "records the metric 'accuracy'; recorded: ['loss']" in capsys.readouterr().err
    os.makedirs(tmp_path / "empty")
    assert main(["latest", str(tmp_path / "empty")]) == 1
    assert "No committed checkpoints" in capsys.readouterr().err


def test_inspect_shows_times_and_tensors(ckpt_dir, capsys):
    make_checkpoints(ckpt_dir)
    path = os.path.join(ckpt_dir, "step_000000002")
    assert main(["inspect", path]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^created\s+" + ISO.pattern, out, re.M) and "1796" not in out  # no Unix stamps
    assert re.search(r"^TENSOR\s+SHAPE\s+DTYPE\s+SIZE$", out, re.M)
    assert re.search(r"^model\.0\.weight\s+\(32, 16\)\s+float32\s+2\.0 KiB$", out, re.M)
    shown = run_json(capsys, "inspect", path, "--json")
    assert shown["step"] == 2 and shown["manifest"]["metadata"] == {"loss": 0.25}
    assert {"key": "model.0.weight", "shape": [32, 16], "dtype": "torch.float32", "bytes": 2048} in shown["tensors"]


def test_verify_human_json_and_damage(ckpt_dir, capsys):
    make_checkpoints(ckpt_dir)
    path = os.path.join(ckpt_dir, "step_000000002")
    assert main(["verify", "--load", path]) == 0
    assert "OK" in capsys.readouterr().out and "checksums match"
    report = run_json(capsys, "verify", path, "--json")
    assert report["ok"] and report["checksums"] and report["problems"] == []
    with open(os.path.join(path, "__0_0.distcp"), "r+b") as handle:
        handle.truncate(10)
    assert main(["verify", path]) == 1
    out = capsys.readouterr().out
    assert "BROKEN" in out and "truncated" in out and "step_000000001" in out  # the fallback
    assert main(["verify", path, "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert not report["ok"] and report["fallback"].endswith("step_000000001")


def test_verify_and_inspect_on_a_run_directory_point_to_ls_and_latest(ckpt_dir, tmp_path, capsys):
    make_checkpoints(ckpt_dir)
    for command in ("verify", "inspect"):
        assert main([command, ckpt_dir]) == 1
        err = capsys.readouterr().err
        assert f"{ckpt_dir} is a run directory holding 2 checkpoints" in err, err
        assert os.path.join(ckpt_dir, "step_000000002") in err  # the newest, to copy
        assert f"dcp-plugin ls {ckpt_dir}" in err and f"dcp-plugin latest {ckpt_dir}" in err
        assert "interrupted" not in err
    os.makedirs(tmp_path / "empty")
    for command in ("verify", "inspect"):
        assert main([command, str(tmp_path / "empty")]) == 1
        err = capsys.readouterr().err
        assert "is an empty directory: no checkpoint has been written there yet" in err and "interrupted" not in err


def test_ls_shows_the_users_metrics_and_inspect_the_rest(ckpt_dir, capsys):
    model = make_model()
    with CheckpointManager(ckpt_dir, async_mode="sync", save_policy=EveryNSteps(1)) as manager:
        manager.maybe_save(1, {"model": model}, metrics={"val_loss": 0.5})
        manager.save(2, {"model": model}, metadata={"loss": 0.25, "lightning": {"layout": 1}, "reasons": ["x"]})
    assert main(["ls", ckpt_dir]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].endswith(" val_loss=0.5") and lines[2].endswith(" loss=0.25")
    assert "reasons" not in lines[1] + lines[2] and "lightning" not in lines[2]
    assert main(["inspect", os.path.join(ckpt_dir, "step_000000002")]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^metrics\s+loss=0\.25$", out, re.M)
    assert re.search(r'^metadata\s+\{"lightning": \{"layout": 1\}, "reasons": \["x"\]\}$', out, re.M)
    assert run_json(capsys, "best", ckpt_dir, "--metric", "val_loss", "--json")["value"] == 0.5


def test_ls_inspect_and_verify_agree_on_the_size_and_say_what_they_count(ckpt_dir, capsys):
    make_checkpoints(ckpt_dir)
    path = os.path.join(ckpt_dir, "step_000000002")
    on_disk = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path) if f != "dcp_plugin.json")
    listed = run_json(capsys, "ls", ckpt_dir, "--json")["checkpoints"][1]
    assert listed["stored_bytes"] == on_disk == run_json(capsys, "verify", path, "--json")["bytes"]
    assert main(["ls", ckpt_dir]) == 0
    size = capsys.readouterr().out.splitlines()[2].split()[3:5]
    assert main(["verify", path]) == 0
    assert " ".join(size) in capsys.readouterr().out
    assert main(["inspect", path]) == 0
    out = capsys.readouterr().out
    assert re.search(rf"^size\s+{re.escape(' '.join(size))} on storage \(files, \.metadata and shared blobs", out, re.M)
    assert re.search(r"^data\s+.* of tensor and value records", out, re.M)
    assert re.search(r"^format\s+2 \(dcp-plugin's checkpoint layout: manifest and every file checksummed", out, re.M)


def test_verify_load_says_the_tensors_were_read(ckpt_dir, capsys):
    make_checkpoints(ckpt_dir)
    path = os.path.join(ckpt_dir, "step_000000002")
    assert main(["verify", "--load", path]) == 0
    assert "checksums match; every tensor and value was read back" in capsys.readouterr().out
    assert run_json(capsys, "verify", "--load", path, "--json")["loaded"] is True
    assert main(["verify", path]) == 0
    assert "read back" not in capsys.readouterr().out


def test_export_to_ckpt_of_a_plain_loop_checkpoint_suggests_format_torch(ckpt_dir, tmp_path, capsys):
    model = make_checkpoints(ckpt_dir)
    path = os.path.join(ckpt_dir, "step_000000002")
    out = str(tmp_path / "x.ckpt")
    assert main(["export", path, out]) == 2
    err = capsys.readouterr().err
    assert "not written by the Lightning plugin" in err and f"dcp-plugin export {path} {out} --format torch" in err
    assert main(["export", path, out, "--format", "torch"]) == 0
    assert_same(torch.load(out, weights_only=True), model.state_dict())


def test_purge_human_and_json(ckpt_dir, capsys):
    make_checkpoints(ckpt_dir)
    leftover = os.path.join(ckpt_dir, ".tmp-step_000000003-0123456789ab")  # as v0.1 named them
    os.makedirs(leftover)
    assert main(["purge", ckpt_dir, "--dry-run"]) == 0
    assert "would remove" in capsys.readouterr().out and os.path.exists(leftover)
    assert run_json(capsys, "purge", ckpt_dir, "--json")["removed"] == [leftover]
    assert not os.path.exists(leftover)
    assert run_json(capsys, "purge", ckpt_dir, "--json")["removed"] == []


def test_export_writes_torch_and_safetensors(ckpt_dir, tmp_path, capsys):
    from safetensors.torch import load_file

    model = make_checkpoints(ckpt_dir)
    path = os.path.join(ckpt_dir, "step_000000002")
    expected = {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}
    assert main(["export", path, str(tmp_path / "model.pt"), "--dtype", "bfloat16"]) == 0
    assert "wrote 'model'" in capsys.readouterr().out
    assert_same(torch.load(tmp_path / "model.pt", weights_only=True), expected)
    result = run_json(capsys, "export", path, str(tmp_path / "model.safetensors"), "--dtype", "bfloat16", "--json")
    assert result["format"] == "safetensors" and result["tensors"] == len(expected)
    assert_same(load_file(tmp_path / "model.safetensors"), expected)


def test_a_torch_save_file_is_named_as_such(tmp_path, capsys):
    old = tmp_path / "old.ckpt"
    torch.save({"state_dict": make_model().state_dict()}, old)
    for argv in (["inspect", str(old)], ["verify", str(old)], ["export", str(old), str(tmp_path / "out.pt")]):
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert "is a file, not a dcp-plugin checkpoint directory" in err and "written by torch.save" in err, err
        assert "torch.load(" in err and "safetensors" not in err and "Errno" not in err
    assert main(["ls", str(old)]) == 1
    assert "is a file, not a directory of checkpoints" in capsys.readouterr().err
    assert not (tmp_path / "out.pt").exists()


def test_missing_checkpoint_exits_1(ckpt_dir, capsys):
    make_checkpoints(ckpt_dir)
    assert main(["inspect", os.path.join(ckpt_dir, "step_000000009")]) == 1
    assert "No checkpoint at" in capsys.readouterr().err


def test_global_options_before_or_after_the_command(ckpt_dir, capsys):
    make_checkpoints(ckpt_dir)
    for argv in (
        ["--json", "--storage-options", "{}", "ls", ckpt_dir],
        ["ls", ckpt_dir, "--json", "--storage-options", "{}"],
        ["-v", "ls", "--json", ckpt_dir],
    ):
        assert [c["step"] for c in run_json(capsys, *argv)["checkpoints"]] == [1, 2]


def test_usage_errors_exit_2_before_anything_is_read(ckpt_dir, tmp_path, capsys):
    make_checkpoints(ckpt_dir)
    path = os.path.join(ckpt_dir, "step_000000002")
    assert main(["export", path, str(tmp_path / "m.pt"), "--dtype", "bfloat"]) == 2
    assert "invalid choice: 'bfloat'" in capsys.readouterr().err and not (tmp_path / "m.pt").exists()
    assert main(["ls", ckpt_dir, "--storage-options", "[1]"]) == 2
    assert "--storage-options must be a JSON object" in capsys.readouterr().err
    assert main(["frobnicate"]) == 2
    assert main(["best", ckpt_dir]) == 2  # --metric is required
    assert "--metric" in capsys.readouterr().err


def test_version_and_help(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"dcp-plugin {__version__}"
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "exit codes: 0 ok; 1 missing, broken" in out and "``" not in out
    assert main(["export", "--help"]) == 0
    assert "the file to write: a path or fsspec URL" in capsys.readouterr().out


def test_verbosity_and_log_level_variable(ckpt_dir, capsys, monkeypatch):
    make_checkpoints(ckpt_dir)
    logger = logging.getLogger("dcp_plugin")
    try:
        assert main(["-vv", "ls", ckpt_dir]) == 0
        assert logger.level == logging.DEBUG
        monkeypatch.setenv("DCP_PLUGIN_LOG_LEVEL", "info")
        assert main(["ls", ckpt_dir]) == 0
        assert logger.level == logging.INFO
        assert len(logger.handlers) == 1  # the command's one handler, replaced on each run
        assert CheckpointConfig.from_env().async_mode  # a known variable for the misspelling check
        with pytest.raises(ConfigError, match="Did you mean DCP_PLUGIN_LOG_LEVEL") as raised:
            CheckpointConfig.from_env({"DCP_PLUGIN_LOG_LEVLE": "info"})
        assert "DCP_PLUGIN_ASYNC_MODE" in str(raised.value) and "CRASH" not in str(raised.value)
        assert CheckpointConfig.from_env({"DCP_PLUGIN_CRASH_AT": "nowhere"})  # accepted, just not suggested
        monkeypatch.setenv("DCP_PLUGIN_LOG_LEVEL", "loud")
        assert main(["ls", ckpt_dir]) == 2
        assert "DCP_PLUGIN_LOG_LEVEL='loud' is not a log level" in capsys.readouterr().err
    finally:
        logger.setLevel(logging.NOTSET)
        for handler in list(logger.handlers):
            logger.removeHandler(handler)


def _python(code: str, **env: str) -> subprocess.CompletedProcess:
    environ = {**os.environ, "PYTHONPATH": REPO, **env}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=environ, timeout=300)


@pytest.mark.parametrize("command", ["inspect", "--help"])
def test_output_into_a_closed_pipe_is_quiet(ckpt_dir, command):
    make_checkpoints(ckpt_dir)
    argv = ["inspect", os.path.join(ckpt_dir, "step_000000002")] if command == "inspect" else ["--help"]
    read_end, write_end = os.pipe()
    os.close(read_end)  # like `| head` that already exited
    try:
        done = subprocess.run(
            [sys.executable, "-m", "dcp_plugin.cli", *argv],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONPATH": REPO},
            timeout=300,
        )
    finally:
        os.close(write_end)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr and "BrokenPipe" not in done.stderr


def test_listing_does_not_import_torch_and_the_library_installs_no_handlers(ckpt_dir):
    make_checkpoints(ckpt_dir)
    code = (
        "import sys\nfrom dcp_plugin.cli import main\n"
        f"assert main(['ls', {ckpt_dir!r}]) == 0\n"
        "assert main(['--help']) == 0\n"
        "print('TORCH', 'torch' in sys.modules)\n"
    )
    done = _python(code)
    assert done.returncode == 0, done.stderr
    assert "TORCH False" in done.stdout
    code = (
        "import logging, torch\nfrom dcp_plugin import CheckpointManager\n"
        f"CheckpointManager({ckpt_dir!r}, async_mode='sync').latest()\n"
        "print('HANDLERS', logging.getLogger().handlers, logging.getLogger('dcp_plugin').handlers)\n"
        "print('LEVEL', logging.getLogger('dcp_plugin').level)\n"
    )
    done = _python(code, DCP_PLUGIN_LOG_LEVEL="debug")
    assert done.returncode == 0, done.stderr
    assert "HANDLERS [] []" in done.stdout and f"LEVEL {logging.DEBUG}" in done.stdout


@pytest.mark.parametrize("argv", [["ls"], ["inspect"], ["verify"], ["export", "x"], ["latest"], ["purge"]])
def test_every_command_needs_its_path(argv, capsys):
    assert main(argv) == 2
    assert "required" in capsys.readouterr().err
