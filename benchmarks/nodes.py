"""Several nodes with node-local disks (``local_scope="node"``), two ``torchrun --nnodes 2`` processes on this host:

* restore time per GiB of checkpoint from the nodes' own disks, from a peer (node 1's disk lost: node 0 sends its
  copy over the process group) and from the remote tier (both copies of node 1's part lost: moto's S3 server on
  127.0.0.1), in one run; each restore from cold page caches, timed to the end of the load (and to the end of the
  first training step after it; "lost node": the node whose disk is lost, which reads everything from elsewhere);
* what the copies to peers cost training: the loop with a save every ``--every`` steps, ``peer_replicas=1``
  against ``0``, against the loop without checkpoints (goodput), in one process per node, order rotating.

    python benchmarks/nodes.py                   # 512 MiB restored; goodput: 256 MiB, every 8 steps, 48 steps, 3 reps
    python benchmarks/nodes.py --restore-mib 128 --state-mib 64 --steps 16 --repeats 1   # a quick look

Both "nodes" share this host's disk, cores and loopback: a peer's bytes cost what a fast network would, and every
copy competes with training for the same cores. Outputs ``<out>.json`` and ``<out>.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import diskio  # noqa: E402
from benchmarks.replication import start_s3  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCENARIOS = ("own disk", "peer", "remote tier")


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--restore-mib", type=float, default=512.0, help="checkpoint size of the restore runs")
    parser.add_argument("--restore-repeats", type=int, default=2)
    parser.add_argument("--state-mib", type=float, default=256.0, help="state size of the goodput runs")
    parser.add_argument("--steps", type=int, default=48)
    parser.add_argument("--every", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-restore", action="store_true")
    parser.add_argument("--skip-goodput", action="store_true")
    parser.add_argument("--dir", help="where the node directories go (default: a temporary directory)")
    parser.add_argument("--out", default="benchmarks/results/nodes")
    return parser.parse_args(argv)


def launch(spec: dict[str, Any], dirs: list[str], out: str, timeout: float = 1800) -> list[dict[str, Any]]:
    """One torchrun per directory (a node each), c10d rendezvous on 127.0.0.1; every node's report, by launch."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("DCP_PLUGIN_")}
    env.update(PYTHONPATH=ROOT, OMP_NUM_THREADS="1", NODE_OUT=out)
    procs = []
    for node, directory in enumerate(dirs):
        command = [sys.executable, "-m", "torch.distributed.run", f"--nnodes={len(dirs)}", f"--node_rank={node}"]
        command += ["--nproc_per_node=1", "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}"]
        command += ["-m", "benchmarks.nodes_worker", json.dumps(spec)]
        node_env = {**env, "NODE_DIR": directory, "NODE_LAUNCH": str(node)}
        procs.append(
            subprocess.Popen(command, env=node_env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        )
    outputs = [proc.communicate(timeout=timeout)[0].decode(errors="replace") for proc in procs]
    if any(proc.returncode for proc in procs):
        raise SystemExit("a node failed:\n" + "\n".join(o[-4000:] for o in outputs))
    reports = []
    for node in range(len(dirs)):
        with open(os.path.join(out, f"{spec['phase']}_{node}.json")) as handle:
            reports.append(json.load(handle))
    return reports


def restores(args: argparse.Namespace, base: str) -> dict[str, Any]:
    server, endpoint = start_s3()
    try:
        import boto3

        boto3.client(
            "s3",
            endpoint_url=endpoint,
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
            region_name="us-east-1",
        ).create_bucket(Bucket="nodes")
        options = {
            "key": "testing",
            "secret": "testing",
            "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"},
        }
        spec = {"state_bytes": int(args.restore_mib * 2**20), "remote": "s3://nodes/run", "remote_options": options}
        dirs = [os.path.join(base, f"disk{node}", "ckpts") for node in range(2)]
        out = os.path.join(base, "out")
        os.makedirs(out, exist_ok=True)
        launch({**spec, "phase": "save"}, dirs, out)
        results: dict[str, Any] = {}
        for scenario in SCENARIOS:
            runs = []
            for _ in range(args.restore_repeats):
                aside = _lose(scenario, dirs)
                for directory in dirs:
                    diskio.evict(directory)
                runs.append(launch({**spec, "phase": "restore"}, dirs, out))
                _put_back(aside, dirs)
            results[scenario] = _summarise(runs)
        return results
    finally:
        server.terminate()
        server.wait(10)


def _lose(scenario: str, dirs: list[str]) -> list[tuple[str, str]]:
    """Move aside what the scenario loses (put back afterwards)."""
    lost = [] if scenario == "own disk" else [dirs[1]]
    if scenario == "remote tier":
        lost.append(os.path.join(dirs[0], ".dcp-plugin", "replicas"))
    aside = [(path, f"{path}.aside") for path in lost]
    for path, moved in aside:
        os.rename(path, moved)
    return aside


def _put_back(aside: list[tuple[str, str]], dirs: list[str]) -> None:
    for path, moved in aside:
        shutil.rmtree(path, ignore_errors=True)
        os.rename(moved, path)
    for directory in dirs:  # what a restore left behind (none expected)
        shutil.rmtree(os.path.join(directory, ".dcp-plugin", "restore"), ignore_errors=True)


def _summarise(runs: list[list[dict[str, Any]]]) -> dict[str, Any]:
    gib = runs[0][0]["bytes"] / 2**30
    job = statistics.median(max(node["seconds"] for node in run) for run in runs)
    lost_node = statistics.median(run[1]["seconds"] for run in runs)
    return {
        "gib": gib,
        "to_step_s": statistics.median(max(node["to_step_s"] for node in run) for run in runs),
        "job_s": job,
        "job_s_per_gib": job / gib,
        "node1_s": lost_node,
        "node1_s_per_gib": lost_node / gib,
        "bytes_from": runs[-1][0]["from"],
    }


def goodputs(args: argparse.Namespace, base: str) -> dict[str, Any]:
    dirs = [os.path.join(base, f"goodput{node}") for node in range(2)]
    out = os.path.join(base, "out")
    os.makedirs(out, exist_ok=True)
    order = ["none", "0", "1"]
    times: dict[str, list[float]] = {name: [] for name in order}
    drains: dict[str, list[float]] = {name: [] for name in order}
    for repeat in range(args.repeats):
        rotated = order[repeat % 3 :] + order[: repeat % 3]
        spec = {"phase": "goodput", "state_bytes": int(args.state_mib * 2**20), "steps": args.steps}
        reports = launch({**spec, "every": args.every, "order": rotated}, dirs, out)
        for name in order:
            times[name].append(max(report[name]["train_s"] for report in reports))
            drains[name].append(max(report[name]["drain_s"] for report in reports))
    base_s = statistics.median(times["none"])
    summary = {
        name: {"train_s": statistics.median(times[name]), "drain_s": statistics.median(drains[name])} for name in order
    }
    for name in order:
        summary[name]["overhead_pct"] = 100 * (summary[name]["train_s"] / base_s - 1)
    summary["replication_pp"] = summary["1"]["overhead_pct"] - summary["0"]["overhead_pct"]
    summary["runs"] = times
    return summary


def report(args: argparse.Namespace, results: dict[str, Any]) -> str:
    lines = ["# Several nodes with node-local disks", ""]
    if "restore" in results:
        lines += [
            "| restore from | GiB | load s (job) | s/GiB (job) | s/GiB (lost node) | to 1st step s "
            "| bytes: local / peer / remote |",
            "|---|---|---|---|---|---|---|",
        ]
        for scenario, row in results["restore"].items():
            source = row["bytes_from"]
            lines.append(
                f"| {scenario} | {row['gib']:.2f} | {row['job_s']:.2f} | {row['job_s_per_gib']:.2f} | "
                f"{row['node1_s_per_gib']:.2f} | {row['to_step_s']:.2f} | "
                f"{source['local']:,} / {source['peer']:,} / {source['remote']:,} |"
            )
        own, peer = results["restore"]["own disk"], results["restore"]["peer"]
        lines += [
            "",
            f"Restore from a peer / own disk: job {peer['job_s'] / own['job_s']:.2f}x, the lost node "
            f"{peer['node1_s'] / own['node1_s']:.2f}x (target: at most 1.5x).",
            "",
        ]
    if "goodput" in results:
        good = results["goodput"]
        lines += [
            f"Goodput: {args.state_mib:.0f} MiB of state, a save every {args.every} steps, {args.steps} steps, "
            f"median of {args.repeats}:",
            "",
            "| run | loop s | extra training time | drain s |",
            "|---|---|---|---|",
        ]
        for name, label in (("none", "no checkpoints"), ("0", "peer_replicas=0"), ("1", "peer_replicas=1")):
            row = good[name]
            lines.append(f"| {label} | {row['train_s']:.2f} | {row['overhead_pct']:+.1f} % | {row['drain_s']:.2f} |")
        lines += ["", f"Copies to a peer add {good['replication_pp']:+.1f} percentage points (target: at most 2).", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    base = args.dir or tempfile.mkdtemp(prefix="dcp-plugin-nodes-")
    results: dict[str, Any] = {"args": vars(args), "started": time.time()}
    try:
        if not args.skip_restore:
            results["restore"] = restores(args, base)
        if not args.skip_goodput:
            results["goodput"] = goodputs(args, base)
    finally:
        if not args.dir:
            shutil.rmtree(base, ignore_errors=True)
    text = report(args, results)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(f"{args.out}.json", "w") as handle:
        json.dump(results, handle, indent=1)
    with open(f"{args.out}.md", "w") as handle:
        handle.write(text)
    print(text)


if __name__ == "__main__":
    main()
