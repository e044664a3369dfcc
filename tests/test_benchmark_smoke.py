"""The benchmark harness runs end to end at a tiny size and writes well-formed outputs (no timing checks)."""

from __future__ import annotations

import json

import pytest

from benchmarks import run as bench_run
from benchmarks.contenders import CONTENDERS
from benchmarks.settings import BenchSettings, SettingsError

SMOKE_CONTENDERS = ["torch.save", "Lightning AsyncCheckpointIO", "dcp-plugin thread+staging"]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_quick_variant_at_tiny_size_writes_json_markdown_and_chart(tmp_path):
    out = tmp_path / "results" / "smoke"
    argv = [
        "--quick",
        "--state-mib",
        "2",
        "--saves",
        "1",
        "--leak-saves",
        "3",
        "--train-steps",
        "1",
        "--dir",
        str(tmp_path / "ckpt"),
        "--out",
        str(out),
    ]
    for name in SMOKE_CONTENDERS:
        argv += ["--contender", name]
    assert bench_run.main(argv) == 0

    data = json.loads(out.with_suffix(".json").read_text())
    summary = data["summary"]
    assert set(summary["contenders"]) == set(SMOKE_CONTENDERS)
    assert all(run["ok"] for run in data["runs"]), [r.get("error") for r in data["runs"]]
    assert {run["contender"] for run in data["runs"]} == {"raw disk", *SMOKE_CONTENDERS}
    assert summary["raw_disk"]["write_s"]["n"] == 1
    for name, entry in summary["contenders"].items():
        assert entry["load_verified"] is True, name
        assert entry["blocked_s"]["n"] == 3  # leak_saves timed saves in the single (first) repetition
        assert entry["durable_s"]["median"] >= entry["blocked_s"]["median"] > 0
        assert entry["bytes"]["median"] >= entry["state_bytes"] > 0
        assert entry["peak_extra_bytes"] is not None
        assert entry["growth_saves"] == 3
        assert entry["ratios"]["durable_vs_raw_write"] > 0
        if entry["background"]:
            assert entry["stall_s"]["n"] == 1 and entry["train_throughput"]["median"] > 0
        else:
            assert entry["stall_s"] is None
    assert summary["contenders"]["torch.save"]["ratios"]["blocked_vs_torch_save"] == pytest.approx(1.0)
    assert {row["contender"] for row in summary["targets"]} == {"dcp-plugin thread+staging"}
    assert data["machine"]["nproc"] >= 1 and data["machine"]["torch"]

    text = out.with_suffix(".md").read_text()
    for name in SMOKE_CONTENDERS:
        assert text.count(f"| {name} |") >= 2, name
    assert "### Targets (dcp-plugin)" in text
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list((tmp_path / "ckpt").iterdir()), "checkpoints left behind"


def test_bad_settings_and_unknown_contenders_are_refused():
    with pytest.raises(SettingsError, match="leak_saves"):
        BenchSettings(saves=5, leak_saves=2)
    with pytest.raises(SettingsError, match="state_mib"):
        BenchSettings(state_mib=0)
    with pytest.raises(SystemExit):
        bench_run.parse(["--contender", "no such thing"])
    from benchmarks.runner import select

    with pytest.raises(SettingsError, match="Unknown contender"):
        select(BenchSettings(contenders=["no such thing"]))


def test_every_registered_contender_is_described():
    assert "torch.save" in CONTENDERS and "dcp-plugin process+staging" in CONTENDERS
    for info in CONTENDERS.values():
        assert info.description and isinstance(info.background, bool) and isinstance(info.fsyncs, bool)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_goodput_benchmark_at_tiny_size_reports_every_contender_against_the_baseline(tmp_path):
    from benchmarks import goodput

    out = tmp_path / "goodput"
    contenders = ["torch.save", "dcp-plugin thread+staging"]
    argv = ["--state-mib", "2", "--steps", "4", "--every", "2", "--repeats", "1", "--omp-wait-policy", "PASSIVE"]
    argv += ["--dir", str(tmp_path / "ckpt")]
    for name in contenders:
        argv += ["--contender", name]
    assert goodput.main([*argv, "--out", str(out)]) == 0

    summary = json.loads(out.with_suffix(".json").read_text())["summary"]
    assert list(summary) == [goodput.BASELINE, *contenders]
    assert summary[goodput.BASELINE]["extra"] == 0.0
    for name in contenders:
        assert summary[name]["saves"] == 2 and summary[name]["train_s"] > 0
    table = out.with_suffix(".md").read_text()
    assert all(f"| {name} |" in table for name in contenders)


@pytest.mark.slow
@pytest.mark.s3
@pytest.mark.timeout(900)
def test_replication_benchmark_at_tiny_size_compares_the_stall_with_and_without_replication(tmp_path):
    pytest.importorskip("moto.server")
    from benchmarks import replication

    out = str(tmp_path / "replication")
    argv = ["--state-mib", "2", "--steps", "4", "--every", "2", "--repeats", "1", "--out", out]
    assert replication.main(argv) == 0
    with open(f"{out}.json") as handle:
        summary = json.load(handle)["summary"]
    assert summary[replication.REPLICATED]["saves"] == summary[replication.LOCAL]["saves"] == 2
    with open(f"{out}.md") as handle:
        assert "stall per save, replicated / local-only:" in handle.read()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_write_cpu_benchmark_at_tiny_size_reports_every_writer_against_the_raw_write(tmp_path):
    from benchmarks import write_cpu

    out = tmp_path / "write_cpu"
    argv = ["--mib", "2", "--tensors", "2", "--repeats", "1", "--dir", str(tmp_path / "w"), "--out", str(out)]
    assert write_cpu.main(argv) == 0
    data = json.loads(out.with_suffix(".json").read_text())
    rows = data["rows"]
    assert set(rows) == set(write_cpu.CONTENDERS)
    assert rows[write_cpu.RAW]["ratio_to_raw"] == pytest.approx(1.0)
    assert rows[write_cpu.RAW]["durable_ratio_to_raw"] == pytest.approx(1.0)
    for name, row in rows.items():
        assert row["median_s_per_gib"] >= row["min_s_per_gib"] > 0 and row["min_ratio_to_raw"] > 0, name
        assert row["durable_s"] > 0 and row["durable_ratio_to_raw"] > 0, name
        assert len(data["samples_s"][name]) == 1 and len(data["durable_s"][name]) == 1
    assert data["bytes"] == 2 * 2**20 and data["machine"]["torch"]
    assert not list((tmp_path / "w").iterdir()), "files left behind"


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_restore_benchmark_runs_every_contender_at_tiny_size_and_checks_each_bit_for_bit(tmp_path):
    from benchmarks import restore

    out = tmp_path / "results" / "restore"
    # one workload and one mode: every contender still runs in its own process (the suite's time is the limit)
    argv = ["--workloads", "small", "--modes", "cold", "--experts", "16", "--repeats", "1"]
    argv += ["--slope-mib", "1", "--slope-counts", "8", "64"]
    argv += ["--slope-repeats", "1", "--torch-threads", "1", "--dir", str(tmp_path / "ckpt"), "--out", str(out)]
    assert restore.main(argv) == 0

    data = json.loads(out.with_suffix(".json").read_text())
    assert all(run["ok"] for run in data["runs"]), [r.get("error") for r in data["runs"]]
    entries = data["summary"]["small"]["cold"]
    assert set(entries) == set(restore.ALL)
    assert all(entry["exact"] for entry in entries.values()), entries
    assert entries["dcp-plugin"]["vs"]["baseline"] == "torch.load"
    assert all(row[name]["exact"] for row in data["per_tensor"]["rows"].values() for name in row)
    assert "Per tensor" in out.with_suffix(".md").read_text()
