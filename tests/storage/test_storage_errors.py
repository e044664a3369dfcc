"""Storage that cannot be used gives one clear error naming the URL and the likely fix, in bounded time."""

from __future__ import annotations

import pytest
import torch

from dcp_plugin import CheckpointManager, StorageAccessError
from tests.conftest import s3_options
from tests.multiproc import free_port

pytestmark = [pytest.mark.s3, pytest.mark.timeout(90)]

OPERATIONS = ["save", "load", "list", "latest"]


def _use(url: str, options: dict, operation: str) -> None:
    with CheckpointManager(url, async_mode="sync", storage_options=options) as manager:
        if operation == "save":
            manager.save(1, {"model": torch.nn.Linear(2, 2)})
        elif operation == "load":
            manager.load({"model": torch.nn.Linear(2, 2)})
        elif operation == "list":
            manager.list()
        else:
            manager.latest()


@pytest.mark.parametrize("operation", OPERATIONS)
def test_missing_bucket_is_named_and_never_created(operation, s3_server):
    import s3fs

    url = "s3://no-such-bucket-dcp/run"
    with pytest.raises(StorageAccessError, match=r"s3://no-such-bucket-dcp/run.*bucket does not exist.*create it"):
        _use(url, s3_options(s3_server), operation)
    fs = s3fs.S3FileSystem(**s3_options(s3_server), skip_instance_cache=True)
    assert not fs.exists("no-such-bucket-dcp")


@pytest.mark.parametrize("operation", OPERATIONS)
def test_wrong_credentials_are_named(operation, s3_server_with_auth):
    with pytest.raises(StorageAccessError, match=r"s3://some-bucket/run.*access was denied.*credentials"):
        _use("s3://some-bucket/run", s3_options(s3_server_with_auth), operation)


@pytest.mark.slow  # with its default retries the client tries a refused connection for several seconds
@pytest.mark.parametrize("operation", OPERATIONS)
def test_unreachable_endpoint_is_named(operation):
    options = s3_options(f"http://127.0.0.1:{free_port()}")  # nothing listens there
    if operation != "list":  # one case with the client's default retries; a single attempt for the others
        options["config_kwargs"] = {"retries": {"max_attempts": 1}}
    with pytest.raises(StorageAccessError, match=r"s3://some-bucket/run.*could not be reached.*endpoint_url"):
        _use("s3://some-bucket/run", options, operation)
