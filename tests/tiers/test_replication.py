"""Replication to a second tier: background copies that commit remotely, survive a remote outage, catch up."""

from __future__ import annotations

import shutil
import uuid

import pytest

from dcp_plugin import CheckpointManager, KeepLast
from dcp_plugin.storage import CheckpointStorage
from dcp_plugin.tiers.replication import ReplicationError, Replicator
from tests.conftest import moto_server, s3_options
from tests.models import assert_same, make_training, snapshot, train_step
from tests.multiproc import free_port

pytestmark = pytest.mark.s3


def create_bucket(endpoint: str, bucket: str | None = None) -> str:
    import boto3

    bucket = bucket or f"tier-{uuid.uuid4().hex[:10]}"
    credentials = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing", "region_name": "us-east-1"}
    boto3.client("s3", endpoint_url=endpoint, **credentials).create_bucket(Bucket=bucket)
    return bucket


def train_and_save(manager: CheckpointManager, replicator: Replicator, steps: int):
    model, optimizer, _ = make_training(seed=1)
    state = {"model": model, "optim": optimizer, "step": 0}
    for step in range(1, steps + 1):
        train_step(model, optimizer)
        state["step"] = step
        manager.save(step, state)
        manager.wait()  # committed locally; replication goes on in the background
        replicator.submit(manager.latest().name)
    return snapshot(model, optimizer)


def test_four_saves_replicated_then_resumed_from_the_remote_tier_alone(tmp_path, s3_url):
    url, options = s3_url
    local = str(tmp_path / "local")
    with CheckpointManager(local, async_mode="thread") as manager:
        remote = CheckpointStorage(url, options)
        replicator = Replicator(manager.storage, remote, retention=KeepLast(2), run_id=manager.run_id)
        expected = train_and_save(manager, replicator, steps=4)
        replicator.close()
    assert [r.name for r in replicator.done] == [f"step_{s:09d}" for s in (1, 2, 3, 4)]
    assert [i.step for i in remote.list()] == [3, 4]  # the remote tier's own retention
    shutil.rmtree(local)  # the node's disk is gone

    model, optimizer, _ = make_training(seed=7)
    state = {"model": model, "optim": optimizer, "step": 0}
    with CheckpointManager(url, async_mode="sync", storage_options=options) as from_remote:
        info = from_remote.load(state)
        assert all(not from_remote.storage.verify(i) for i in from_remote.list())
    assert info.step == 4 and state["step"] == 4
    assert_same(snapshot(model, optimizer), expected)


@pytest.mark.slow
def test_a_remote_outage_is_surfaced_and_replication_catches_up_when_it_is_back(tmp_path):
    port = free_port()
    local = str(tmp_path / "local")
    with moto_server(port=port) as endpoint:
        bucket = create_bucket(endpoint)
        remote = CheckpointStorage(f"s3://{bucket}/run", s3_options(endpoint))
        with CheckpointManager(local, async_mode="sync") as manager:
            replicator = Replicator(manager.storage, remote)
            train_and_save(manager, replicator, steps=1)
            replicator.wait()
    # the endpoint is down: training and local saves go on, the replication error reaches the loop
    with CheckpointManager(local, async_mode="sync") as manager:
        model, optimizer, _ = make_training(seed=2)
        manager.save(2, {"model": model, "optim": optimizer, "step": 2})
        replicator.submit("step_000000002")
        with pytest.raises(ReplicationError, match=r"step_000000002.*s3://"):
            replicator.wait()
        assert "step_000000002" in replicator.busy()  # local retention must keep it until it is replicated
        assert [i.step for i in manager.list()] == [1, 2]
    # the endpoint is back (a fresh server: its bucket is recreated empty): everything missing is copied
    with moto_server(port=port) as endpoint:
        create_bucket(endpoint, bucket)
        assert replicator.catch_up() == ["step_000000001", "step_000000002"]
        replicator.close()
        assert [i.step for i in remote.list()] == [1, 2]
        assert replicator.busy() == set()
