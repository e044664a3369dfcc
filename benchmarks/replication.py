"""Two tiers: the loop stall and goodput with replication to S3 on, against the same saves local-only.

    python benchmarks/replication.py                          # 400 MiB, a save every 8 steps, 48 steps, 3 reps
    python benchmarks/replication.py --state-mib 8 --steps 8 --every 4 --repeats 1   # a quick look

Starts moto's S3 server on 127.0.0.1 (``pip install "moto[server]" s3fs``), creates a bucket, and runs the
goodput benchmark (:mod:`benchmarks.goodput`: each run a fresh process, order rotating between repetitions) for
the loop without checkpoints, ``dcp-plugin thread+staging`` (local only) and ``dcp-plugin thread+staging,
replicated`` (the same saves, each copied to the bucket in the background). Reports goodput's table and the
ratio of the stall per save, replicated / local-only (goal: at most 1.10). The moto server runs on the same
machine, so its CPU use competes with training: an upper bound for a real object store.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import goodput  # noqa: E402
from benchmarks.contenders import REMOTE_OPTIONS_ENV, REMOTE_URL_ENV  # noqa: E402

LOCAL = "dcp-plugin thread+staging"
REPLICATED = "dcp-plugin thread+staging, replicated"
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def start_s3() -> tuple[subprocess.Popen, str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, **CREDENTIALS},
    )
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(endpoint, timeout=1)
            return server, endpoint
        except urllib.error.HTTPError:
            return server, endpoint
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                server.kill()
                raise SystemExit("moto's S3 server did not start (pip install 'moto[server]' s3fs).") from None
            time.sleep(0.2)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/results/replication")
    known, rest = parser.parse_known_args(argv)
    server, endpoint = start_s3()
    try:
        import boto3

        bucket = f"replication-{uuid.uuid4().hex[:8]}"
        client = boto3.client(
            "s3",
            endpoint_url=endpoint,
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
            region_name="us-east-1",
        )
        client.create_bucket(Bucket=bucket)
        options = {"key": "testing", "secret": "testing", "client_kwargs": {"endpoint_url": endpoint}}
        os.environ[REMOTE_URL_ENV] = f"s3://{bucket}/runs"
        os.environ[REMOTE_OPTIONS_ENV] = json.dumps(options)
        status = goodput.main([*rest, "--contender", LOCAL, "--contender", REPLICATED, "--out", known.out])
    finally:
        os.environ.pop(REMOTE_URL_ENV, None)
        os.environ.pop(REMOTE_OPTIONS_ENV, None)
        server.terminate()
        server.wait(10)
    with open(f"{known.out}.json") as handle:
        summary = json.load(handle)["summary"]
    local, replicated = summary[LOCAL], summary[REPLICATED]
    if "error" in local or "error" in replicated:
        return 1
    ratio = replicated["stall_per_save_s"] / local["stall_per_save_s"]
    line = f"stall per save, replicated / local-only: {ratio:.2f} (goal <= 1.10)"
    print(line)
    with open(f"{known.out}.md", "a") as handle:
        handle.write(f"\n{line}\n")
    return status


if __name__ == "__main__":
    sys.exit(main())
