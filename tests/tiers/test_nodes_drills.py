"""Failure drills with real multi-node launches on this host: two ``torchrun --nnodes 2 --node_rank 0|1
--rdzv_backend c10d --rdzv_endpoint 127.0.0.1:PORT`` processes, each with its own directory standing for its local
disk, FSDP2 on gloo, ``CheckpointManager(dir, local_scope="node", peer_replicas=1)`` (tests/scripts/nodes_drill.py).

The rendezvous numbers the nodes in the order they arrive, so "node 1" below is the second launch and its
directory, whatever rank it gets; checkpoint parts are found wherever they are.
"""

from __future__ import annotations

import json
import re
import shutil
import uuid

import pytest

from dcp_plugin import CheckpointConfig, CheckpointCorruptError, Checkpointer
from tests.conftest import moto_server, s3_options
from tests.models import assert_same
from tests.nodes import launch_nodes, results, succeeded

pytestmark = pytest.mark.slow


def disks(tmp_path, count: int = 2):
    dirs = []
    for node in range(count):
        (tmp_path / f"disk{node}").mkdir()
        dirs.append(tmp_path / f"disk{node}" / "ckpts")
    out = tmp_path / "out"
    out.mkdir()
    return dirs, out


def full_of(reports: list[dict]):
    return next(report["full"] for report in reports if report.get("full") is not None)


def snapshot(dirs, tmp_path):
    saved = tmp_path / "snapshot"
    for node, directory in enumerate(dirs):
        shutil.copytree(directory, saved / str(node), symlinks=True)
    return saved


def put_back(dirs, saved):
    for node, directory in enumerate(dirs):
        shutil.rmtree(directory, ignore_errors=True)
        shutil.copytree(saved / str(node), directory, symlinks=True)


def test_a_lost_node_restores_from_its_peer_or_the_remote_tier_or_says_what_is_missing(tmp_path):
    dirs, out = disks(tmp_path)
    with moto_server() as endpoint:
        import boto3

        bucket = f"nodes-{uuid.uuid4().hex[:8]}"
        boto3.client(
            "s3",
            endpoint_url=endpoint,
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
            region_name="us-east-1",
        ).create_bucket(Bucket=bucket)
        options = {**s3_options(endpoint), "config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 2}}
        remote = {"DRILL_REMOTE": f"s3://{bucket}/run", "DRILL_REMOTE_OPTIONS": json.dumps(options)}
        succeeded(launch_nodes(["train", str(out), "2,4"], dirs, env=remote))
        trained = results(out, "train", 2)
        assert all(report["list"] == ["step_000000002", "step_000000004"] for report in trained)
        expected = full_of(trained)
        saved = snapshot(dirs, tmp_path)
        # one node's directory read as if it held the whole checkpoint: the error says where the rest is
        with pytest.raises(CheckpointCorruptError, match=r"is on node \d's disk: this directory holds node \d's part"):
            Checkpointer(CheckpointConfig(async_mode="sync")).read(str(dirs[0] / "step_000000004"))

        # both copies of node 1's part gone (its disk, and node 0's copy of it): the remote tier has it
        shutil.rmtree(dirs[1])
        shutil.rmtree(dirs[0] / ".dcp-plugin" / "replicas")
        succeeded(launch_nodes(["restore", str(out)], dirs, env=remote))
        restored = results(out, "restore", 2)
        assert all(report["step"] == 4 for report in restored)
        assert restored[0]["from"]["remote"] > 0 and restored[0]["from"] == restored[1]["from"]
        assert_same(full_of(restored), expected)

    # the remote tier's server is stopped: a lost node restores from its peer's copy alone, bit-exact
    put_back(dirs, saved)
    shutil.rmtree(dirs[1])
    succeeded(launch_nodes(["restore", str(out)], dirs, env={**remote, "DRILL_LOSE_COPIES": "1"}))
    restored = results(out, "restore", 2)
    assert all(report["step"] == 4 and report["list"] == ["step_000000002", "step_000000004"] for report in restored)
    counts = restored[0]["from"]
    assert counts["remote"] == 0 and counts["peer"] > 0 and counts["local"] > 0
    assert_same(full_of(restored), expected)
    assert restored[1]["listed"] == {"own": [], "copies": {}}  # the lost disk got nothing but what it read
    # then node 0 drops its copy too and no remote tier is configured: a clear error on every node
    for report in restored:
        for error in (report["error"], report["load_error"]):
            assert re.search(r"step_000000004 lacks part \d \(written on node \d: __\d_0\.distcp\)", error), error
            assert "nothing was loaded" in error and "remote" in error

    # 2 nodes -> 1 node: node 0's disk holds its part and the copy of the other one; it reshards to one rank
    put_back(dirs, saved)
    shutil.rmtree(out)
    out.mkdir()
    succeeded(launch_nodes(["restore", str(out)], dirs[:1]))
    (alone,) = results(out, "restore", 1)
    assert alone["step"] == 4 and alone["from"]["peer"] == alone["from"]["remote"] == 0
    assert_same(alone["full"], expected)


# (steps saved by the launch, crash point of its last save, launches with DRILL_CRASH_AT, newest complete after)
CHAIN = [
    ("1,2", "nodes.prepared", {1}, 1),  # node 1 dies with its part sealed, before the vote: step 2 is nowhere
    ("3", "nodes.decided", {0, 1}, 3),  # the coordinator dies right after its commit: the other node completes it
    ("4", "nodes.committed", {0, 1}, 4),  # a node dies after its own commit, before the last exchange
    ("5", "replica.written", {1}, 5),  # node 1 dies with node 0's copy received but not committed
    ("6", "replica.committed", {1}, 6),  # node 1 dies with the copy committed, the outcome not exchanged
]


def test_kill_9_of_one_node_in_a_save_between_the_commit_phases_and_in_replication(tmp_path):
    dirs, out = disks(tmp_path)
    previous = 0
    orphan = set()
    for steps, point, crashing, newest in [*CHAIN, ("6", None, set(), None)]:
        if point is None:  # then node 1's part of step 6 is lost with its copy: step 5 is the newest complete one
            shutil.rmtree(dirs[1] / "step_000000006")
            for copy in (dirs[0] / ".dcp-plugin" / "replicas").glob("node*/step_000000006"):
                shutil.rmtree(copy)
            previous, orphan = 5, {"step_000000006"}
        runs = launch_nodes(
            ["chain", str(out), steps], dirs, node_env={node: {"DRILL_CRASH_AT": point} for node in crashing}
        )
        reports = results(out, "chain", 2)
        # what every node sees at the start of this launch: the newest checkpoint complete everywhere, loaded exactly
        for report in reports:
            assert report["step"] == previous
            names = report["list"]
            assert set(report["listed"]["own"]) - orphan == set(names), "a node lists a part of an incomplete save"
            assert all(set(copies) - orphan == set(names) for copies in report["listed"]["copies"].values())
        if previous:
            assert_same(full_of(reports), __import__("torch").load(out / f"reference_{previous}.pt"))
        if point is None:
            succeeded(runs)  # step 6 saved again: the lost save's remaining part was replaced, not an error
            break
        killed = [run for run in runs if "Signal 9 (SIGKILL)" in run.output]
        assert len(killed) == 1, "\n".join(f"--- node {r.node}: {r.returncode}\n{r.output[-3000:]}" for r in runs)
        assert all(run.returncode != 0 for run in runs)
        previous = newest
