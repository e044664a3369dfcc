"""The figures and tables of docs/scaling.md, from the scaling benchmark's results file and the model fitted to it.

:func:`figures` gives every inline value the page quotes, by key; :func:`tables` every generated block (markdown
tables). Nothing is typed by hand: a new run and refit changes the page through these two functions only.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from benchmarks import scaling_model
from benchmarks.scaling_contenders import BACKGROUND, LABELS, RESTORERS, SAVERS

MIB = 2**20
TERM_LABELS = {
    "fixed": "fixed",
    "plain_per_rank": "per plain tensor",
    "dtensors_per_rank": "per DTensor shard",
    "bytes_per_rank": "per MiB",
    "chunks": "per chunk",
}
TERM_LABELS_PROJECTED = dict(TERM_LABELS, metadata_unpickle="after the coordinator: metadata unpickled")
TERM_UNITS = {"fixed": 1e3, "plain_per_rank": 1e6, "dtensors_per_rank": 1e6, "bytes_per_rank": 1e3 * MIB, "chunks": 1e6}
"""Coefficients are shown in ms (fixed, per MiB) or µs (per tensor, per chunk)."""
TERM_UNIT_NAMES = {
    "fixed": "ms",
    "plain_per_rank": "µs",
    "dtensors_per_rank": "µs",
    "bytes_per_rank": "ms",
    "chunks": "µs",
}


# -- formatting ---------------------------------------------------------------------------------------------------


def seconds(value: float) -> str:
    """``12 ms``, ``1.23 s``, ``4.6 min``, ``1.6 h``."""
    if value < 0.9995:  # rounds to at most 999 ms
        return f"{value * 1000:.0f} ms" if value >= 0.0095 else f"{value * 1000:.1f} ms"
    if value < 120:
        return f"{value:.2f} s" if value < 10 else f"{value:.0f} s"
    if value < 5400:
        return f"{value / 60:.1f} min"
    return f"{value / 3600:.1f} h"


def size(value: float) -> str:
    """``512 B``, ``12.3 KiB``, ``4.5 MiB``, ``1.2 GiB``, ``3.4 TiB`` (three significant digits)."""
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if value >= scale:
            return f"{value / scale:.3g} {unit}"
    return f"{value:.0f} B"


def percent(value: float) -> str:
    return f"{value * 100:+.0f} %"


def count(value: float) -> str:
    return f"{value:,.0f}"


# -- lookups ------------------------------------------------------------------------------------------------------


def by_point(results: dict[str, Any]) -> dict[tuple[str, str, str], dict[str, Any]]:
    """Observations (``benchmarks/scaling_model.observations``) by (point key, contender, kind)."""
    return {(o["point"], o["contender"], o["kind"]): o for o in scaling_model.observations(results)}


def axis_points(results: dict[str, Any], axis: str) -> list[dict[str, Any]]:
    """The configurations of one axis of the grid: ``tensors`` (one rank, 64 MiB, split), ``bytes`` (one rank, 64
    tensors) or ``ranks`` (every rank count, both layouts)."""
    points = results["points"]
    if axis == "tensors":
        base = _most_common(p["total_bytes"] for p in points)
        chosen = [p for p in points if p["world"] == 1 and p["layout"] == "split" and p["total_bytes"] == base]
        return sorted(chosen, key=lambda p: p["tensors"])
    if axis == "bytes":
        fewest = min(p["tensors"] for p in points if p["world"] == 1 and p["layout"] == "split")
        chosen = [p for p in points if p["world"] == 1 and p["layout"] == "split" and p["tensors"] == fewest]
        return sorted(chosen, key=lambda p: p["total_bytes"])
    multi = {(p["layout"], p["tensors"], p["total_bytes"]) for p in points if p["world"] > 1}
    chosen = [p for p in points if (p["layout"], p["tensors"], p["total_bytes"]) in multi]
    return sorted(chosen, key=lambda p: (p["layout"], p["world"]))


def _most_common(values: Any) -> Any:
    tally: dict[Any, int] = defaultdict(int)
    for value in values:
        tally[value] += 1
    return max(tally, key=lambda v: (tally[v], -v))


def projection(model: dict[str, Any], world: int, contender: str, kind: str) -> dict[str, Any] | None:
    for row in model["projections"]["rows"]:
        if (row["world"], row["contender"], row["kind"]) == (world, contender, kind):
            return row
    return None


# -- inline figures -----------------------------------------------------------------------------------------------


def figures(results: dict[str, Any], model: dict[str, Any]) -> dict[str, str]:
    """Every inline value of the page, by key."""
    machine, host = results["machine"], results["host"]
    out = {
        "machine": f"{machine['cpu']}, {machine['nproc']} CPUs, {machine['ram_gib']} GiB RAM, disk {machine['disk']}; "
        f"Python {machine['python']}, torch {machine['torch']}",
        "measured": machine["date"],
        "load": f"{machine['load_average_start'][0]:.1f} at the start and {machine['load_average_end'][0]:.1f} at the "
        "end (1-minute load average)",
        "duration": seconds(machine["wall_s"]),
        "load_jobs": ", ".join(
            f"{load:.1f} before the {world}-rank job"
            for world, load in sorted(host.get("load_average_before_job", {}).items(), key=lambda item: int(item[0]))
        )
        or "not recorded",
        "repeats": str(results["settings"]["repeats"]),
        "host_write": f"{host['write_bytes_per_s'] / 1e9:.2f} GB/s",
        "command": results.get("command") or "python benchmarks/scaling.py",
    }
    summary = model["error_summary"]
    for key, entry in summary.items():
        out[f"error.{key}.median"] = percent(entry["median"]).lstrip("+") if entry["median"] is not None else "n/a"
        out[f"error.{key}.max"] = percent(entry["max"]).lstrip("+") if entry["max"] is not None else "n/a"
        out[f"error.{key}.n"] = str(entry["n"])
    scenario = model["projections"]["scenario"]
    out["scenario.parameters"] = f"{scenario['parameters'] / 1e9:.1f} billion"
    out["scenario.tensors"] = count(scenario["parameter_tensors"])
    out["scenario.state"] = size(scenario["state_bytes"])
    for world, shape in scenario["shapes"].items():
        out[f"scenario.{world}.per_rank"] = count(shape["plain_per_rank"] + shape["dtensors_per_rank"])
        out[f"scenario.{world}.bytes_per_rank"] = size(shape["bytes_per_rank"])
        out[f"scenario.{world}.chunks"] = count(shape["chunks"])
    for row in model["projections"]["rows"]:
        prefix = f"projection.{row['world']}.{row['contender']}.{row['kind']}"
        out[f"{prefix}.total_disk"] = seconds(row["total_disk_s"])
        out[f"{prefix}.total_object"] = seconds(row["total_object_s"])
        out[f"{prefix}.disk"] = seconds(row["disk_s"])
        out[f"{prefix}.object"] = seconds(row["object_s"])
        out[f"{prefix}.network"] = seconds(row["network_s"])
        out[f"{prefix}.work"] = seconds(row["work_s"])
        out[f"{prefix}.coordinator_in"] = size(row["coordinator_pickled_in"])
        out[f"{prefix}.largest"] = size(row["largest_message_bytes"])
        out[f"{prefix}.calls"] = str(row["calls"])
        out[f"{prefix}.ring"] = str(row["ring_all_gathers"])
        if "blocking_s" in row:
            out[f"{prefix}.blocking"] = seconds(row["blocking_s"])
    for contender, kinds in model["model"].items():
        for kind, quantities in kinds.items():
            for term, value in quantities["cpu"].items():
                out[f"model.{contender}.{kind}.{term}"] = f"{value * TERM_UNITS[term]:.3g} {TERM_UNIT_NAMES[term]}"
    cluster = model["projections"]["cluster"]
    out["cluster.latency"] = f"{cluster['latency_s'] * 1e6:.0f} µs"
    out["cluster.ranks_per_node"] = str(cluster["ranks_per_node"])
    probe = model.get("probe") or {}
    for step, value in probe.get("per_chunk_s", {}).items():
        out[f"probe.{step}"] = f"{value * 1e6:.1f} µs"
    if probe:
        largest = probe["largest"]
        out["probe.chunks"] = count(largest["chunks"])
        out["probe.metadata_per_chunk"] = f"{largest['metadata_bytes'] / largest['chunks']:.0f} bytes"
        out["probe.local_plan_per_tensor"] = f"{largest['local_plan_bytes'] / largest['tensors']:.0f} bytes"
        for contender, check in probe["metadata_check"].items():
            out[f"probe.metadata_check.{contender}.predicted"] = size(check["predicted"])
            out[f"probe.metadata_check.{contender}.probe"] = size(check["probe"])
            out[f"probe.metadata_check.{contender}.error"] = percent(
                scaling_model.relative_error(check["predicted"], check["probe"])
            )
    for key, floor in model.get("chunk_floors", {}).items():
        out[f"floor.{key.replace('|', '.')}"] = f"{floor * 1e6:.0f} µs"
    for row in model["projections"]["rows"]:
        prefix = f"projection.{row['world']}.{row['contender']}.{row['kind']}"
        if "work_probe_s" in row:
            out[f"{prefix}.work_probe"] = seconds(row["work_probe_s"])
            out[f"{prefix}.total_disk_probe"] = seconds(row["total_disk_probe_s"])
        out[f"{prefix}.chunk_work"] = seconds(row["work_terms_s"].get("chunks", 0.0))
        for slot in row["slots"]:
            name = slot["slot"].replace(" ", "_").replace("#", "")
            out[f"{prefix}.slot.{name}"] = seconds(slot["network_s"])
    largest = largest_point(results)
    for row in results["measurements"]:
        if row["point"] != largest["key"]:
            continue
        kind = "first" if row["rep"] == 0 else "repeat"
        c = row["collectives"]
        out.setdefault(f"measured.{row['contender']}.{kind}.calls", str(c["calls"]))
        out.setdefault(f"measured.{row['contender']}.{kind}.payload", size(c["pickled_out"] + c["pickled_in"]))
    points = results.get("probe") or []
    if len(points) > 1:
        small, large = min(points, key=lambda p: p["chunks"]), max(points, key=lambda p: p["chunks"])
        growth = max(
            (large["seconds"][step] / large["chunks"]) / (small["seconds"][step] / small["chunks"])
            for step in large["seconds"]
            if small["seconds"][step] > 0
        )
        out["probe.growth"] = f"{growth:.1f}×"
        out["probe.span"] = f"{large['chunks'] / small['chunks']:.0f}×"
        out["probe.smallest"] = count(small["chunks"])
    measured_chunks = max(p["shape"]["chunks"] for p in results["points"])
    if probe:
        out["probe.times_measured"] = f"{probe['largest']['chunks'] / measured_chunks:.0f}"
    out["measured.chunks"] = count(measured_chunks)
    out["measured.multi_chunks"] = count(
        max((p["shape"]["chunks"] for p in results["points"] if p["world"] > 1), default=0)
    )
    out["fewer_repeats_from"] = count(results["settings"].get("fewer_repeats_from", 0))
    out["restore_repeats"] = str(results["settings"].get("restore_repeats", results["settings"]["repeats"]))
    out["measured.largest"] = (
        f"{largest['world']} ranks, {largest['layout']} layout, {count(largest['tensors'])} tensors"
    )
    return out


# -- tables -------------------------------------------------------------------------------------------------------


def tables(results: dict[str, Any], model: dict[str, Any]) -> dict[str, str]:
    """Every generated block of the page, by key."""
    obs = by_point(results)
    return {
        "table:tensors": _axis_table(results, obs, "tensors"),
        "table:bytes": _axis_table(results, obs, "bytes"),
        "table:ranks": _ranks_table(results, obs),
        "table:blocking": _blocking_table(results, obs),
        "table:collectives": _collectives_table(results),
        "table:calls": _calls_table(results),
        "table:coefficients": _coefficients_table(model),
        "table:errors": _errors_table(model),
        "table:assumptions": _assumptions_table(model),
        "table:projection-saves": _projection_table(model, "save"),
        "table:projection-restores": _projection_table(model, "restore"),
        "table:projection-terms": _terms_table(model),
        "table:projection-payload": _payload_table(model),
        "table:projection-slots": _slots_table(model),
        "table:probe": _probe_table(results),
    }


def _axis_table(results: dict[str, Any], obs: dict[tuple[str, str, str], Any], axis: str) -> str:
    points = axis_points(results, axis)
    head = "tensors" if axis == "tensors" else "state"
    contenders = [*SAVERS, *RESTORERS]
    lines = [f"| {head} | " + " | ".join(LABELS[c] for c in contenders) + " |", "|---:|" + "---:|" * len(contenders)]
    for point in points:
        label = count(point["tensors"]) if axis == "tensors" else size(point["total_bytes"])
        cells = []
        for contender in contenders:
            o = obs.get((point["key"], contender, "repeat"))
            cells.append(f"{seconds(o['values']['cpu'])} / {seconds(o['values']['wall'])}" if o else "")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _ranks_table(results: dict[str, Any], obs: dict[tuple[str, str, str], Any]) -> str:
    contenders = ["plugin_sync", "dcp_save", "plugin_load", "dcp_load"]
    lines = [
        "| layout | ranks | tensors per rank | chunks | " + " | ".join(LABELS[c] for c in contenders) + " |",
        "|---|---:|---:|---:|" + "---:|" * len(contenders),
    ]
    for point in axis_points(results, "ranks"):
        shape = point["shape"]
        cells = []
        for contender in contenders:
            o = obs.get((point["key"], contender, "repeat"))
            cells.append(f"{seconds(o['values']['cpu'])} / {seconds(o['values']['wall'])}" if o else "")
        per_rank = shape["plain_per_rank"] + shape["dtensors_per_rank"]
        lines.append(
            f"| {point['layout']} | {point['world']} | {count(per_rank)} | {count(shape['chunks'])} | "
            + " | ".join(cells)
            + " |"
        )
    return "\n".join(lines)


def _blocking_table(results: dict[str, Any], obs: dict[tuple[str, str, str], Any]) -> str:
    points = axis_points(results, "tensors")
    lines = [
        "| tensors | " + " | ".join(f"{LABELS[c]}: blocking / whole save" for c in BACKGROUND) + " |",
        "|---:|" + "---:|" * len(BACKGROUND),
    ]
    for point in points:
        cells = []
        for contender in BACKGROUND:
            o = obs.get((point["key"], contender, "repeat"))
            cells.append(f"{seconds(o['values']['blocking_wall'])} / {seconds(o['values']['wall'])}" if o else "")
        lines.append(f"| {count(point['tensors'])} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _collectives_table(results: dict[str, Any]) -> str:
    """Per rank configuration: for each contender's first and repeated save, and its restore, the calls and the
    coordinator's pickled bytes (sent + received)."""
    contenders = [
        ("plugin_sync", "first"),
        ("plugin_sync", "repeat"),
        ("dcp_save", "repeat"),
        ("plugin_load", "first"),
        ("dcp_load", "first"),
    ]
    rows = defaultdict(dict)
    for row in results["measurements"]:
        kind = "first" if row["rep"] == 0 else "repeat"
        if (row["contender"], kind) in contenders and (row["contender"], kind) not in rows[row["point"]]:
            c = row["collectives"]
            rows[row["point"]][(row["contender"], kind)] = f"{c['calls']} / {size(c['pickled_out'] + c['pickled_in'])}"
    header = " | ".join(f"{LABELS[c]} ({k})" for c, k in contenders)
    lines = [f"| layout | ranks | tensors | chunks | {header} |", "|---|---:|---:|---:|" + "---:|" * len(contenders)]
    for point in axis_points(results, "ranks"):
        cells = [rows[point["key"]].get(key, "") for key in contenders]
        lines.append(
            f"| {point['layout']} | {point['world']} | {count(point['tensors'])} | {count(point['shape']['chunks'])} | "
            + " | ".join(cells)
            + " |"
        )
    return "\n".join(lines)


def largest_point(results: dict[str, Any]) -> dict[str, Any]:
    """The rank configuration with the most chunks: where the calls are listed one by one."""
    return max(axis_points(results, "ranks"), key=lambda p: (p["shape"]["chunks"], p["world"]))


def _calls_table(results: dict[str, Any]) -> str:
    point = largest_point(results)
    head = (
        "| contender | save | collective | called by | coordinator sends / receives (pickled) | messages on the wire |"
    )
    lines = [head, "|---|---|---|---|---:|---|"]
    for contender in ("plugin_sync", "dcp_save", "plugin_load", "dcp_load"):
        for kind in ("first", "repeat") if contender in SAVERS else ("first",):
            calls = results["calls"].get(f"{point['key']}|{contender}|{kind}|coordinator") or []
            for op, origin, out, received, wire in calls:
                messages = ", ".join(f"{name} {size(nbytes)}" for name, nbytes in wire)
                pickled = f"{size(out)} / {size(received)}"
                lines.append(f"| {LABELS[contender]} | {kind} | `{op}` | `{origin}` | {pickled} | {messages} |")
    return "\n".join(lines)


def _coefficients_table(model: dict[str, Any]) -> str:
    terms = list(TERM_LABELS)
    lines = [
        "| contender | save | " + " | ".join(f"{TERM_LABELS[t]} ({TERM_UNIT_NAMES[t]})" for t in terms) + " |",
        "|---|---|" + "---:|" * len(terms),
    ]
    for contender in [*SAVERS, *RESTORERS]:
        for kind in ("first", "repeat"):
            work = model["model"].get(contender, {}).get(kind)
            if not work:
                continue
            cells = [f"{work['cpu'].get(t, 0.0) * TERM_UNITS[t]:.3g}" for t in terms]
            lines.append(f"| {LABELS[contender]} | {kind} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _errors_table(model: dict[str, Any]) -> str:
    head = "| configuration | contender | save | CPU measured | CPU predicted | error | wall measured | wall predicted"
    lines = [head + " | error |", "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for row in model["errors"]:
        if not row["held_out"]:
            continue
        cpu_error = scaling_model.relative_error(row["cpu_predicted"], row["cpu"])
        wall_error = scaling_model.relative_error(row["wall_predicted"], row["wall"])
        lines.append(
            f"| `{row['point']}` | {LABELS[row['contender']]} | {row['kind']} | {seconds(row['cpu'])} | "
            f"{seconds(row['cpu_predicted'])} | {percent(cpu_error)} | {seconds(row['wall'])} | "
            f"{seconds(row['wall_predicted'])} | {percent(wall_error)} |"
        )
    return "\n".join(lines)


def _assumptions_table(model: dict[str, Any]) -> str:
    cluster, sources = model["projections"]["cluster"], model["projections"]["sources"]
    shown = {
        "ranks_per_node": lambda v: str(v),
        "latency_s": lambda v: f"{v * 1e6:.0f} µs",
        "flow_bytes_per_s": lambda v: f"{v * 8 / 1e9:.0f} Gbit/s",
        "node_network_bytes_per_s": lambda v: f"{v * 8 / 1e9:.0f} Gbit/s",
        "disk_write_bytes_per_s": lambda v: f"{v / 1e9:.0f} GB/s",
        "disk_read_bytes_per_s": lambda v: f"{v / 1e9:.0f} GB/s",
        "object_bytes_per_s": lambda v: f"{v / 1e9:.0f} GB/s",
        "object_puts_per_s": lambda v: f"{v:,.0f} /s",
        "object_gets_per_s": lambda v: f"{v:,.0f} /s",
        "object_part_bytes": lambda v: size(v),
    }
    names = {
        "ranks_per_node": "ranks per node",
        "latency_s": "network latency (one way)",
        "flow_bytes_per_s": "bandwidth of one TCP flow",
        "node_network_bytes_per_s": "network bandwidth of a node",
        "disk_write_bytes_per_s": "local disk write, per node",
        "disk_read_bytes_per_s": "local disk read, per node",
        "object_bytes_per_s": "object store throughput, per node",
        "object_puts_per_s": "object store PUT rate (one prefix)",
        "object_gets_per_s": "object store GET rate (one prefix)",
        "object_part_bytes": "object store part size",
    }
    lines = ["| assumption | value | where it comes from |", "|---|---:|---|"]
    for key, render in shown.items():
        lines.append(f"| {names[key]} | {render(cluster[key])} | {sources[key]} |")
    return "\n".join(lines)


def _projection_table(model: dict[str, Any], operation: str) -> str:
    """Projected seconds per save (or restore) at each rank count: its parts and totals."""
    rows = [r for r in model["projections"]["rows"] if r["operation"] == operation]
    saving = operation == "save"
    head = [
        "ranks",
        "contender",
        "save" if saving else "restore",
        "CPU work",
        "CPU work, probe's chunk cost",
        "collectives",
        "local disk",
        "object store",
        "total, local disk",
    ]
    if saving:
        head.append("loop blocked (thread mode)")
    lines = ["| " + " | ".join(head) + " |", "|---:|---|---|" + "---:|" * (len(head) - 3)]
    for row in rows:
        cells = [
            count(row["world"]),
            LABELS[row["contender"]],
            row["kind"],
            seconds(row["work_s"]),
            seconds(row["work_probe_s"]) if "work_probe_s" in row else "",
            seconds(row["network_s"]),
            seconds(row["disk_s"]),
            seconds(row["object_s"]),
            seconds(row["total_disk_s"]),
        ]
        if saving:
            cells.append(seconds(row["blocking_s"]) if row["contender"] in BACKGROUND and "blocking_s" in row else "")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _payload_table(model: dict[str, Any]) -> str:
    """Projected collectives per save and restore: how many, the largest message, what the coordinator receives."""
    head = [
        "ranks",
        "contender",
        "kind",
        "collectives",
        "ring all-gathers",
        "largest message",
        "coordinator receives (pickled)",
        "object store requests",
    ]
    lines = ["| " + " | ".join(head) + " |", "|---:|---|---|" + "---:|" * (len(head) - 3)]
    for row in model["projections"]["rows"]:
        if row["contender"] in BACKGROUND:
            continue  # the same collectives as the synchronous saves of the same library
        cells = [
            count(row["world"]),
            LABELS[row["contender"]],
            row["kind"],
            str(row["calls"]),
            str(row["ring_all_gathers"]),
            size(row["largest_message_bytes"]),
            size(row["coordinator_pickled_in"]),
            count(row["object_requests"]),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _slots_table(model: dict[str, Any]) -> str:
    """Each collective of a repeated save and of a restore at the largest projected rank count: its messages and
    its time on the network."""
    world = max(row["world"] for row in model["projections"]["rows"])
    lines = [
        "| contender | collective (who, which) | messages (one rank's) | time on the network |",
        "|---|---|---|---:|",
    ]
    for contender, kind in (
        ("plugin_sync", "repeat"),
        ("dcp_save", "repeat"),
        ("plugin_load", "first"),
        ("dcp_load", "first"),
    ):
        row = projection(model, world, contender, kind)
        if row is None:
            continue
        for slot in row["slots"]:
            messages = ", ".join(f"{op} {size(nbytes)}" for op, nbytes in slot["messages"])
            lines.append(
                f"| {LABELS[contender]} ({kind}) | `{slot['slot']}` | {messages} | {seconds(slot['network_s'])} |"
            )
    return "\n".join(lines)


def _probe_table(results: dict[str, Any]) -> str:
    """The probe's CPU time per chunk of each step, at each of its configurations."""
    points = results.get("probe") or []
    steps = [step for step in PROBE_STEPS if points and step in points[0]["seconds"]]
    lines = [
        "| tensors | ranks | chunks | "
        + " | ".join(f"{PROBE_STEPS[s]} (µs per chunk)" for s in steps)
        + " | metadata pickled |",
        "|---:|---:|---:|" + "---:|" * (len(steps) + 1),
    ]
    for point in points:
        cells = [f"{point['seconds'][s] / point['chunks'] * 1e6:.1f}" for s in steps]
        lines.append(
            f"| {point['tensors']} | {count(point['world'])} | {count(point['chunks'])} | "
            + " | ".join(cells)
            + f" | {size(point['metadata_bytes'])} |"
        )
    return "\n".join(lines)


PROBE_STEPS = {
    "global_plan": "coordinator plans",
    "results": "coordinator indexes write results",
    "pickle": "coordinator pickles metadata",
    "unpickle": "a rank unpickles metadata",
    "load_plan": "a rank plans its restore",
}


def _terms_table(model: dict[str, Any]) -> str:
    """Where the projected work of each repeated save and each restore goes, by term of the model."""
    terms = list(TERM_LABELS_PROJECTED)
    lines = [
        "| ranks | contender | save | " + " | ".join(TERM_LABELS_PROJECTED[t] for t in terms) + " |",
        "|---:|---|---|" + "---:|" * len(terms),
    ]
    for row in model["projections"]["rows"]:
        if row["kind"] != ("repeat" if row["operation"] == "save" else "first"):
            continue
        if row["contender"] not in ("plugin_sync", "dcp_save", "plugin_load", "dcp_load"):
            continue
        cells = [seconds(row["work_terms_s"].get(t, 0.0)) for t in terms]
        lines.append(
            f"| {count(row['world'])} | {LABELS[row['contender']]} | {row['kind']} | " + " | ".join(cells) + " |"
        )
    return "\n".join(lines)


__all__ = ["axis_points", "by_point", "figures", "largest_point", "projection", "seconds", "size", "tables"]
