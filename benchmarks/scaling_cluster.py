"""Projecting the fitted scaling model (``benchmarks/scaling_model.py``) to a cluster: the assumptions, where each
number comes from, and the price of work, storage and collectives at 1,000 and 10,000 ranks.

A save's or restore's time on the cluster is taken as the sum of three parts (no overlap assumed, so an upper
bound of what the model says):

- **work**: the fitted CPU seconds of the busiest rank at the projected tensors, bytes and chunks per rank (each rank
  has cores of its own on a cluster, unlike on the 2-core host the model was fitted on); for a save, plus the
  other ranks' unpickling of the metadata the coordinator broadcasts last (the probe's cost per chunk), which comes
  after the coordinator's work on the critical path;
- **storage**: a node's bytes at its disks' or the object store's bandwidth (all ranks of a node share them), or the
  object store's request rate for the whole checkpoint, whichever is slower;
- **collectives**: every collective the save makes (the fitted message sizes at the projected shape) priced on the
  network with the classic latency-bandwidth model, using the algorithms gloo implements (the checkpoint group is a
  gloo group over TCP): ring all-gather, binomial-tree broadcast, dissemination barrier, gather and scatter through
  the root's link.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from benchmarks import scaling_model

GB = 1e9


@dataclass(frozen=True)
class Cluster:
    """The cluster the model is projected to. Every number carries its source in :data:`SOURCES`."""

    ranks_per_node: int = 8
    latency_s: float = 250e-6
    flow_bytes_per_s: float = 10e9 / 8
    node_network_bytes_per_s: float = 100e9 / 8
    disk_write_bytes_per_s: float = 10 * GB
    disk_read_bytes_per_s: float = 20 * GB
    object_bytes_per_s: float = 8 * GB
    object_puts_per_s: float = 3500.0
    object_gets_per_s: float = 5500.0
    object_part_bytes: int = 50 * 2**20


SOURCES = {
    "ranks_per_node": "One rank per GPU on 8-GPU nodes (NVIDIA HGX/DGX H100, AWS p5.48xlarge).",
    "latency_s": "One-way time of a small TCP message: half the 500 µs round trip within a data center of Jeff "
    "Dean's 'Numbers everyone should know', which Evan Jones found to be about the 80th percentile of TCP round "
    "trips within one cloud zone in 2021 (https://www.evanjones.ca/network-latencies-2021.html). gloo sends over "
    "TCP sockets; the latency part of every projection scales with this number.",
    "flow_bytes_per_s": "10 Gbit/s: AWS's limit for a single TCP flow between instances in a cluster placement group "
    "(5 Gbit/s outside one), https://docs.aws.amazon.com/AWSEC2/latest/UserGuide/ec2-instance-network-bandwidth.html. "
    "gloo's ring and tree steps each use one flow.",
    "node_network_bytes_per_s": "100 Gbit/s of TCP into or out of one node (a 100 GbE front-end link): what a gather "
    "to or scatter from the coordinator's node can use. The GPU fabric (InfiniBand, EFA) is faster but gloo's TCP "
    "transport does not use it.",
    "disk_write_bytes_per_s": "Node-local NVMe, 8 drives per node (AWS p5.48xlarge has 8 x 3.84 TB): vendor sheets "
    "of PCIe Gen4 data-center drives list 2-4 GB/s of sequential write per drive; assumed 10 GB/s per node after "
    "the filesystem, with fsync.",
    "disk_read_bytes_per_s": "The same drives' sequential read, 6-7 GB/s each on the vendor sheets; assumed 20 GB/s "
    "per node.",
    "object_bytes_per_s": "8 GB/s per node to and from S3: the highest S3 download throughput of any instance in "
    "Daniel Vassallo's s3-benchmark (8,003 MB/s on a 100 Gbit/s c5n.18xlarge, "
    "https://github.com/dvassallo/s3-benchmark); uploads assumed alike.",
    "object_puts_per_s": "3,500 PUT requests per second per partitioned prefix (AWS S3 performance guidelines, "
    "https://docs.aws.amazon.com/AmazonS3/latest/userguide/optimizing-performance.html); a checkpoint's files share "
    "one prefix. A fresh prefix starts at this rate; S3 partitions further only after sustained load.",
    "object_gets_per_s": "5,500 GET requests per second per partitioned prefix (same source).",
    "object_part_bytes": "50 MiB: the block size s3fs (fsspec's S3 filesystem) uploads and reads in by default; every "
    "part is one request.",
}


@dataclass(frozen=True)
class Scenario:
    """The training state projected: a dense transformer with AdamW under FSDP2 (every parameter and both moments
    sharded over all ranks as DTensors; AdamW's ``step`` a plain scalar per parameter, the same on every rank)."""

    name: str = "Llama-2-70B-shaped model, AdamW, FSDP2 over all ranks"
    layers: int = 80
    hidden: int = 8192
    intermediate: int = 28672
    kv_dim: int = 1024
    vocab: int = 32000
    bytes_per_param_state: int = 12
    """fp32 parameters (FSDP2 keeps the sharded parameters in fp32 under mixed precision) and AdamW's two fp32
    moments."""

    @property
    def parameter_tensors(self) -> int:
        """Per layer q, k, v, o, gate, up, down and two norms; plus embedding, final norm and output."""
        return self.layers * 9 + 3

    @property
    def parameters(self) -> int:
        h, i, kv = self.hidden, self.intermediate, self.kv_dim
        per_layer = 2 * h * h + 2 * h * kv + 3 * h * i + 2 * h
        return self.layers * per_layer + 2 * self.vocab * h + h

    @property
    def state_bytes(self) -> int:
        return self.parameters * self.bytes_per_param_state + self.parameter_tensors * 4

    def shape(self, world: int) -> dict[str, float]:
        """The model's variables at ``world`` ranks (``benchmarks/scaling_state.shape``)."""
        sharded = 3 * self.parameter_tensors  # parameters, exp_avg, exp_avg_sq
        return {
            "plain_per_rank": float(self.parameter_tensors),  # AdamW's step, replicated
            "dtensors_per_rank": float(sharded),
            "bytes_per_rank": self.parameters * self.bytes_per_param_state / world,
            "tensors": float(sharded + self.parameter_tensors),
            "chunks": float(sharded * world + self.parameter_tensors),
            "world": float(world),
        }


# -- prices ---------------------------------------------------------------------------------------------------------


def wire_time(op: str, world: int, size: float, cluster: Cluster) -> float:
    """Seconds for one tensor collective of ``size``-byte messages over ``world`` ranks (gloo's algorithms)."""
    if world <= 1:
        return 0.0
    alpha, flow, node = cluster.latency_s, cluster.flow_bytes_per_s, cluster.node_network_bytes_per_s
    steps = math.ceil(math.log2(world))
    if op in ("all_gather", "all_gather_into_tensor"):
        return (world - 1) * (alpha + size / flow)
    if op in ("gather", "scatter"):
        return alpha + (world - 1) * size / node
    if op == "broadcast":
        return steps * (alpha + size / flow)
    if op in ("barrier", "monitored_barrier"):
        return steps * alpha
    if op in ("all_reduce", "reduce", "reduce_scatter", "reduce_scatter_tensor"):
        return 2 * steps * (alpha + size / flow)
    if op == "new_group":
        return (world - 1) * 2 * alpha  # gloo connects this rank to every other one: a round trip each
    return steps * (alpha + size / flow)


def collectives(slots: list[dict[str, Any]], shape: dict[str, float], cluster: Cluster) -> dict[str, Any]:
    """The collectives of one save or restore at ``shape``: count, time on the network, the largest message, and
    the coordinator's pickled bytes out and in."""
    world = int(shape["world"])
    time_s, largest, ring = 0.0, 0.0, 0
    each = []
    for slot in slots:
        slot_time, messages = 0.0, []
        for op, size_model in slot["wire"]:
            size = max(0.0, scaling_model.predict(size_model, shape))
            slot_time += wire_time(op, world, size, cluster)
            largest = max(largest, size)
            ring += op in ("all_gather", "all_gather_into_tensor")
            messages.append([op, size])
        time_s += slot_time
        each.append({"slot": slot["slot"], "messages": messages, "network_s": slot_time})
    return {
        "slots": each,
        "calls": len(slots),
        "ring_all_gathers": ring,
        "network_s": time_s,
        "largest_message_bytes": largest,
        "coordinator_pickled_out": sum(max(0.0, scaling_model.predict(s["pickled_out"], shape)) for s in slots),
        "coordinator_pickled_in": sum(max(0.0, scaling_model.predict(s["pickled_in"], shape)) for s in slots),
    }


def storage(shape: dict[str, float], files_per_rank: int, writing: bool, cluster: Cluster) -> dict[str, float]:
    """Seconds to move one node's bytes to or from its disks, and to or from the object store (bandwidth or the
    prefix's request rate, whichever is slower)."""
    world = int(shape["world"])
    per_rank = shape["bytes_per_rank"]
    node_bytes = per_rank * min(world, cluster.ranks_per_node)
    disk = node_bytes / (cluster.disk_write_bytes_per_s if writing else cluster.disk_read_bytes_per_s)
    file_bytes = per_rank / max(1, files_per_rank)
    requests = world * files_per_rank * max(1, math.ceil(file_bytes / cluster.object_part_bytes))
    rate = cluster.object_puts_per_s if writing else cluster.object_gets_per_s
    bandwidth = node_bytes / cluster.object_bytes_per_s
    return {"disk_s": disk, "object_s": max(bandwidth, requests / rate), "object_requests": float(requests)}


def files_per_rank(contender: str) -> int:
    """Data files each rank writes: one per writer thread (dcp-plugin's default ``thread_count``, DCP's 1)."""
    if contender.startswith("plugin"):
        from dcp_plugin.config import CheckpointConfig

        return int(CheckpointConfig.__dataclass_fields__["thread_count"].default)
    return 1


# -- projections ----------------------------------------------------------------------------------------------------

PROJECTED_WORLDS = (1000, 10000)
PROJECTED = {
    "plugin_sync": ("save", ("first", "repeat")),
    "dcp_save": ("save", ("first", "repeat")),
    "plugin_thread": ("save", ("first", "repeat")),
    "dcp_async": ("save", ("first", "repeat")),
    "plugin_load": ("restore", ("first",)),
    "dcp_load": ("restore", ("first",)),
}
"""What is projected: each contender's saves (first and repeated) and restores (a restarted job's first)."""


def project(
    fitted: dict[str, Any],
    worlds: tuple[int, ...] = PROJECTED_WORLDS,
    cluster: Cluster = Cluster(),
    scenario: Scenario = Scenario(),
) -> dict[str, Any]:
    """Save and restore time and collective payloads of ``scenario`` at each of ``worlds`` ranks on ``cluster``,
    for every contender the model has (``fitted``: :func:`benchmarks.scaling_model.fit`)."""
    rows = []
    for world in worlds:
        shape = scenario.shape(world)
        for contender, (operation, kinds) in PROJECTED.items():
            for kind in kinds:
                work = fitted["model"].get(contender, {}).get(kind)
                slots = fitted["messages"].get(contender, {}).get(kind)
                if not work or slots is None:
                    continue
                after = (
                    fitted.get("probe", {}).get("per_chunk_s", {}).get("unpickle", 0.0) if operation == "save" else 0.0
                )
                row = _project_one(contender, kind, operation, work, slots, shape, cluster, after)
                floor = fitted.get("chunk_floors", {}).get(f"{contender}|{kind}")
                if floor is not None:  # the same with the per-chunk cost the probe measures instead of the fitted one
                    row["work_probe_s"] = row["work_s"] - (work["cpu"]["chunks"] - floor) * shape["chunks"]
                    row["total_disk_probe_s"] = row["work_probe_s"] + row["network_s"] + row["disk_s"]
                rows.append(dict(row, world=world))
    return {
        "scenario": dict(
            asdict(scenario),
            parameters=scenario.parameters,
            parameter_tensors=scenario.parameter_tensors,
            state_bytes=scenario.state_bytes,
            shapes={str(world): scenario.shape(world) for world in worlds},
        ),
        "cluster": asdict(cluster),
        "sources": SOURCES,
        "rows": rows,
    }


def _project_one(
    contender: str,
    kind: str,
    operation: str,
    work: dict[str, dict[str, float]],
    slots: list[dict[str, Any]],
    shape: dict[str, float],
    cluster: Cluster,
    after_per_chunk: float = 0.0,
) -> dict[str, Any]:
    terms = {name: scaling_model.predict({name: value}, shape) for name, value in work["cpu"].items()}
    terms["metadata_unpickle"] = after_per_chunk * shape["chunks"]
    compute = sum(terms.values())
    calls = collectives(slots, shape, cluster)
    moved = storage(shape, files_per_rank(contender), operation == "save", cluster)
    row = {
        "contender": contender,
        "kind": kind,
        "operation": operation,
        "work_s": compute,
        "work_terms_s": terms,
        **calls,
        **moved,
        "total_disk_s": compute + calls["network_s"] + moved["disk_s"],
        "total_object_s": compute + calls["network_s"] + moved["object_s"],
    }
    if "blocking_cpu" in work:
        blocking_calls = _blocking_slots(slots)
        row["blocking_s"] = (
            scaling_model.predict(work["blocking_cpu"], shape)
            + collectives(blocking_calls, shape, cluster)["network_s"]
        )
    return row


def _blocking_slots(slots: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The collectives a thread-mode save makes before it returns: all but DCP's steps, which run in the
    background thread."""
    return [slot for slot in slots if not slot["slot"].startswith("dcp:")]


__all__ = ["PROJECTED", "PROJECTED_WORLDS", "SOURCES", "Cluster", "Scenario", "collectives", "project", "storage"]
