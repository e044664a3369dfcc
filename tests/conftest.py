"""Shared fixtures: a real S3-compatible server on 127.0.0.1 and per-test cleanup of DCP daemons."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
import uuid

import pytest

from tests.multiproc import free_port


@pytest.fixture(autouse=True)
def _release_process_state():
    from dcp_plugin.format import write_watch

    watched = write_watch.available()
    yield
    import torch.distributed as dist

    from dcp_plugin.engine import daemon

    daemon.shutdown()
    if dist.is_initialized():
        dist.destroy_process_group()
    # Long-term pinned memory (an io_uring fixed buffer) makes the process distrust the write-watch for good, and
    # every later test in it would fingerprint what it means to trust to the watch: pin in a child process.
    assert write_watch.available() == watched, "this test pinned memory in the test process; pin in a child process"


@contextlib.contextmanager
def moto_server(port: int | None = None, **extra_env: str):
    """moto's S3 server on a loopback port (default: a free one); stopped by its own pid."""
    import urllib.error
    import urllib.request

    pytest.importorskip("s3fs")
    pytest.importorskip("moto.server")
    port = port or free_port()
    env = dict(os.environ, AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
    env.update(extra_env)
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(endpoint, timeout=1)
            break
        except urllib.error.HTTPError:
            break  # it answers (an authenticating server refuses anonymous requests)
        except Exception:
            if server.poll() is not None or time.monotonic() > deadline:
                server.kill()
                raise RuntimeError("moto server did not start") from None
            time.sleep(0.2)
    try:
        yield endpoint
    finally:
        server.terminate()
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-compatible server (moto) on 127.0.0.1 for the whole session."""
    with moto_server() as endpoint:
        yield endpoint


@pytest.fixture(scope="session")
def s3_server_with_auth():
    """An S3 server that checks credentials (and knows none): every request is refused as unauthorised."""
    with moto_server(INITIAL_NO_AUTH_ACTION_COUNT="0") as endpoint:
        yield endpoint


def s3_options(endpoint: str) -> dict:
    """fsspec options for the local S3 server at ``endpoint`` (moto accepts any credentials)."""
    return {
        "key": "testing",
        "secret": "testing",
        "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"},
        "use_listings_cache": False,
    }


@pytest.fixture()
def s3_url(s3_server):
    """A fresh bucket on the local S3 server; returns (url, storage_options)."""
    import boto3

    options = s3_options(s3_server)
    bucket = f"test-{uuid.uuid4().hex[:10]}"
    boto3.client(
        "s3",
        endpoint_url=s3_server,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        region_name="us-east-1",
    ).create_bucket(Bucket=bucket)
    return f"s3://{bucket}/run", options


@pytest.fixture()
def memory_url():
    import fsspec

    path = f"memory://test-{uuid.uuid4().hex[:10]}/run"
    yield path
    fs = fsspec.filesystem("memory")
    root = path.removeprefix("memory://").split("/")[0]
    if fs.exists(f"/{root}"):
        fs.rm(f"/{root}", recursive=True)


@pytest.fixture()
def ckpt_dir(tmp_path):
    path = tmp_path / "ckpts"
    yield str(path)
    shutil.rmtree(path, ignore_errors=True)
