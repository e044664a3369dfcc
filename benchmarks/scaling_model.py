"""The scaling model: fitted to the scaling benchmark's measurements, checked against the ones it was not fitted to.

**Work.** What a rank computes during a save or a restore, in CPU seconds of the busiest rank, is modelled as

    work = fixed + a·plain_per_rank + d·dtensors_per_rank + b·bytes_per_rank + c·chunks

(variables of ``benchmarks/scaling_state.shape``: plain tensors and DTensor shards this rank holds, its bytes, and
the chunks in the checkpoint's metadata, which the coordinator plans and every rank unpickles). The coefficients
are non-negative and fitted by least squares on relative errors, separately for each contender and for first and
repeated saves (a first save plans from scratch; later ones may reuse the plan). The per-chunk coefficient is at
least what ``benchmarks/scaling_probe.py`` measures DCP's own per-chunk steps to cost at up to tens of thousands of
chunks (the fit may add to it, never go below it): on this host a job reaches a thousand chunks at most, too few to
pin that term down alone. The same form is fitted to the CPU time of the part of a thread-mode save that blocks the
loop, and to the mean rank's CPU time. CPU times are the least of the repetitions (contention on a shared host
inflates CPU time, it never deflates it); wall times are medians.

**Messages.** Each collective a save or restore makes is a slot: who called it, which call of theirs it is, and the
tensor collectives it is made of. The size of each of those messages is modelled as a non-negative linear function
of the same variables plus ``tensors`` and ``world``, fitted per slot to the counted bytes (exact sizes, no noise).
``benchmarks/scaling_cluster.py`` prices the slots on a cluster's network.

**On this host** a job's ranks share its cores, so a measured wall time is compared with

    wall = max(work, world · mean_work / cores) + calls · latency(world) [+ bytes / disk bandwidth, for saves]

using this host's measured collective latency and disk bandwidth.

:func:`fit` fits everything to the points outside ``held_out`` and reports the error on the held-out points (the
largest tensor count, state and rank count: extrapolations, as the projections are); :func:`fit_all` fits to every
point, for the projections. Nothing here depends on what was measured beyond the results file: a new run refits.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

import numpy as np

from benchmarks.scaling_contenders import SAVERS

WORK_FEATURES = ("fixed", "plain_per_rank", "dtensors_per_rank", "bytes_per_rank", "chunks")
BLOCKING_FEATURES = ("fixed", "plain_per_rank", "dtensors_per_rank", "bytes_per_rank")
"""The part of a thread-mode save that blocks the loop packs and copies the rank's own tensors and makes no plan:
it has no per-chunk term."""
MESSAGE_FEATURES = ("fixed", "plain_per_rank", "dtensors_per_rank", "tensors", "chunks", "world")
KINDS = ("first", "repeat")
WORK_QUANTITIES = {"cpu": "cpu_max_s", "cpu_mean": None, "blocking_cpu": "blocking_cpu_max_s"}
"""Fitted quantities and the measured field they come from (``cpu_mean``: ``cpu_sum_s / world``)."""


# -- measurements, as the model sees them -------------------------------------------------------------------------


def observations(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One observation per (configuration, contender, kind): the first repetition, or the median of the others."""
    points = {point["key"]: point for point in results["points"]}
    grouped: dict[tuple[str, str, str], list[dict[str, Any]]] = defaultdict(list)
    for row in results["measurements"]:
        kind = "first" if row["rep"] == 0 else "repeat"
        grouped[(row["point"], row["contender"], kind)].append(row)
    out = []
    for (key, contender, kind), rows in grouped.items():
        point = points[key]
        world = point["world"]
        values = {
            "cpu": min(r["cpu_max_s"] for r in rows),
            "cpu_mean": min(r["cpu_sum_s"] / world for r in rows),
            "wall": _median(r["wall_s"] for r in rows),
            "calls": rows[0]["collectives"]["calls"],
        }
        if "blocking_s" in rows[0]:
            values.update(
                blocking_cpu=min(r["blocking_cpu_max_s"] for r in rows),
                blocking_wall=_median(r["blocking_s"] for r in rows),
                blocking_calls=rows[0]["blocking_calls"],
            )
        out.append(
            {
                "point": key,
                "contender": contender,
                "kind": kind,
                "shape": point["shape"],
                "world": world,
                "layout": point["layout"],
                "tensors": point["tensors"],
                "total_bytes": point["total_bytes"],
                "values": values,
            }
        )
    return out


def is_held_out(observation: dict[str, Any], held_out: dict[str, Any]) -> bool:
    """Whether an observation's configuration has the held-out value of any axis (``{"world": 8, ...}``)."""
    return any(observation.get(axis) == value for axis, value in held_out.items())


def _median(values: Iterable[float]) -> float:
    return float(statistics.median(list(values)))


# -- fitting ------------------------------------------------------------------------------------------------------


def nnls(matrix: np.ndarray, target: np.ndarray, iterations: int = 500) -> np.ndarray:
    """Non-negative least squares (Lawson and Hanson's active-set method): ``argmin |Ax - b|, x >= 0``."""
    rows, cols = matrix.shape
    x = np.zeros(cols)
    passive = np.zeros(cols, dtype=bool)
    for _ in range(iterations):
        gradient = matrix.T @ (target - matrix @ x)
        candidates = ~passive & (gradient > 1e-12 * max(1.0, float(np.abs(gradient).max(initial=0.0))))
        if not candidates.any():
            break
        passive[int(np.argmax(np.where(candidates, gradient, -np.inf)))] = True
        while True:
            trial = np.zeros(cols)
            trial[passive] = np.linalg.lstsq(matrix[:, passive], target, rcond=None)[0]
            if (trial[passive] > 0).all():
                x = trial
                break
            blocked = passive & (trial <= 0)
            steps = x[blocked] / (x[blocked] - trial[blocked])
            x = x + float(steps.min(initial=1.0)) * (trial - x)
            passive &= x > 1e-15
            x[~passive] = 0.0
    return x


def fit_linear(
    shapes: list[dict[str, float]],
    targets: list[float],
    features: tuple[str, ...],
    relative: bool,
    floors: dict[str, float] | None = None,
) -> dict[str, float]:
    """Non-negative coefficients of ``features`` (``fixed`` is the constant) for ``targets``; with ``relative``,
    each row is weighted by ``1 / target`` (fits relative errors); ``floors`` gives lower bounds of coefficients."""
    floors = floors or {}
    matrix = np.array([[1.0 if f == "fixed" else float(shape[f]) for f in features] for shape in shapes])
    base = np.array([floors.get(f, 0.0) for f in features])
    target = np.array(targets, dtype=float) - matrix @ base
    scale = np.abs(matrix).max(axis=0)
    scale[scale == 0] = 1.0
    measured = np.array(targets, dtype=float)
    weights = 1.0 / np.maximum(np.abs(measured), 1e-12) if relative else np.ones_like(measured)
    coefficients = nnls(matrix / scale * weights[:, None], target * weights) / scale + base
    return {feature: float(value) for feature, value in zip(features, coefficients)}


def per_chunk(points: list[dict[str, Any]]) -> dict[str, float]:
    """CPU seconds per chunk of each step: the slope through the probe's points (least squares, non-negative)."""
    shapes = [{"chunks": float(p["chunks"])} for p in points]
    steps = points[0]["seconds"] if points else {}
    return {
        step: fit_linear(shapes, [p["seconds"][step] for p in points], ("fixed", "chunks"), relative=False)["chunks"]
        for step in steps
    }


def predict(coefficients: dict[str, float], shape: dict[str, float]) -> float:
    """The linear model ``coefficients`` evaluated at ``shape``."""
    return sum(value * (1.0 if name == "fixed" else float(shape[name])) for name, value in coefficients.items())


def chunk_floors(results: dict[str, Any]) -> dict[tuple[str, str], float]:
    """The least per-chunk CPU cost of each contender and kind on its busiest rank, from the probe: a save's
    coordinator plans (unless a cached plan is reused: dcp-plugin's repeated saves), indexes the write results and
    pickles the metadata; a restoring rank unpickles the metadata and matches its shards against it."""
    from benchmarks.scaling_probe import STEPS

    if not results.get("probe"):
        return {}
    costs = per_chunk(results["probe"])
    floors = {}
    for contender in ("plugin_sync", "plugin_thread", "dcp_save", "dcp_async", "plugin_load", "dcp_load"):
        for kind in KINDS:
            if contender.endswith("load"):
                steps = STEPS["restore"]
            elif contender.startswith("plugin") and kind == "repeat":
                steps = STEPS["save_cached"]
            else:
                steps = STEPS["save"]
            floors[(contender, kind)] = sum(costs[step] for step in steps)
    return floors


def fit_work(
    observations: list[dict[str, Any]], floors: dict[tuple[str, str], float] | None = None
) -> dict[str, dict[str, dict[str, dict[str, float]]]]:
    """``{contender: {kind: {quantity: coefficients}}}`` for every quantity the observations have; ``floors`` are
    the least per-chunk coefficients (:func:`chunk_floors`; applied to the busiest rank's CPU time)."""
    floors = floors or {}
    out: dict[str, dict[str, dict[str, dict[str, float]]]] = defaultdict(lambda: defaultdict(dict))
    groups: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for observation in observations:
        groups[(observation["contender"], observation["kind"])].append(observation)
    for (contender, kind), group in sorted(groups.items()):
        for quantity in WORK_QUANTITIES:
            usable = [o for o in group if quantity in o["values"]]
            floor = {"chunks": floors.get((contender, kind), 0.0)} if quantity == "cpu" else None
            features = BLOCKING_FEATURES if quantity == "blocking_cpu" else WORK_FEATURES
            if usable:
                out[contender][kind][quantity] = fit_linear(
                    [o["shape"] for o in usable], [o["values"][quantity] for o in usable], features, True, floor
                )
    return {contender: dict(kinds) for contender, kinds in out.items()}


def slots(calls: list[list[Any]]) -> list[tuple[str, list[list[Any]]]]:
    """A save's or restore's calls as ``(slot, wire)`` pairs; a slot is ``origin op #n`` (the n-th call of that op
    from that origin), so the same call lines up across configurations."""
    seen: dict[tuple[str, str], int] = defaultdict(int)
    out = []
    for op, origin, _out, _in, wire in calls:
        seen[(origin, op)] += 1
        out.append((f"{origin} {op} #{seen[(origin, op)]}", wire))
    return out


def fit_messages(results: dict[str, Any]) -> dict[str, Any]:
    """Per contender and kind, the coordinator's slots in order, each with its wire ops and a fitted size per op,
    and the coordinator's pickled bytes out and in per slot: ``{contender: {kind: [slot, ...]}}``."""
    shapes = {point["key"]: point["shape"] for point in results["points"]}
    samples: dict[tuple[str, str], dict[str, list[tuple[dict[str, float], list[Any]]]]] = defaultdict(
        lambda: defaultdict(list)
    )
    order: dict[tuple[str, str], tuple[int, list[str]]] = {}
    for key, calls in results["calls"].items():
        point, contender, kind, role = key.split("|")
        if role != "coordinator":
            continue
        listed = slots(calls)
        for (slot, wire), call in zip(listed, calls):
            samples[(contender, kind)][slot].append((shapes[point], [wire, call[2], call[3]]))
        world = int(shapes[point]["world"])
        if world >= order.get((contender, kind), (0, []))[0]:
            order[(contender, kind)] = (world, [slot for slot, _ in listed])
    out: dict[str, dict[str, list[dict[str, Any]]]] = defaultdict(dict)
    for (contender, kind), by_slot in samples.items():
        fitted = []
        for slot in order[(contender, kind)][1]:
            rows = by_slot[slot]
            wire_ops = [op for op, _ in rows[-1][1][0]]
            sizes = []
            for index in range(len(wire_ops)):
                usable = [(shape, wire[0][index][1]) for shape, wire in rows if len(wire[0]) > index]
                sizes.append(_fit_exact([s for s, _ in usable], [v for _, v in usable]))
            fitted.append(
                {
                    "slot": slot,
                    "wire": [[op, size] for op, size in zip(wire_ops, sizes)],
                    "pickled_out": _fit_exact([s for s, _ in rows], [w[1] for _, w in rows]),
                    "pickled_in": _fit_exact([s for s, _ in rows], [w[2] for _, w in rows]),
                }
            )
        out[contender][kind] = fitted
    return dict(out)


def _fit_exact(shapes: list[dict[str, float]], sizes: list[float]) -> dict[str, float]:
    if all(size == sizes[0] for size in sizes):
        return {"fixed": float(sizes[0])}
    return fit_linear(shapes, sizes, MESSAGE_FEATURES, relative=False)


# -- this host ----------------------------------------------------------------------------------------------------


def host_wall(
    work: dict[str, dict[str, float]], observation: dict[str, Any], host: dict[str, Any], blocking: bool = False
) -> float:
    """The model's wall time on this host for an observation's configuration (see the module docstring)."""
    shape, world = observation["shape"], observation["world"]
    busiest = predict(work["blocking_cpu" if blocking else "cpu"], shape)
    mean = predict(work["cpu_mean"], shape) if "cpu_mean" in work else busiest
    cores = max(1, int(host.get("cores") or 1))
    calls = observation["values"]["blocking_calls" if blocking else "calls"]
    latency = float(host["collective_latency_s"].get(str(world), 0.0))
    wall = max(busiest, world * mean / cores) + calls * latency
    if observation["contender"] in SAVERS and not blocking:
        wall += observation["total_bytes"] / host["write_bytes_per_s"]
    return wall


# -- fit and check ------------------------------------------------------------------------------------------------


def fit(results: dict[str, Any]) -> dict[str, Any]:
    """The model fitted without the held-out points, its errors on them (and in-sample), and the model fitted to
    every point (``benchmarks/scaling_cluster.py`` projects with it)."""
    observations_ = observations(results)
    held = results["held_out"]
    training = [o for o in observations_ if not is_held_out(o, held)]
    floors = chunk_floors(results)
    checked = fit_work(training, floors)
    errors = [_errors(o, checked, results["host"], held=is_held_out(o, held)) for o in observations_]
    full = fit_all(results)
    return {
        "about": "The scaling model fitted to benchmarks/results/scaling.json by benchmarks/scaling_model.py: "
        "work coefficients (CPU seconds per unit), message sizes per collective, and the prediction errors.",
        "features": list(WORK_FEATURES),
        "held_out": held,
        "checked_model": checked,
        "errors": [e for e in errors if e is not None],
        "error_summary": summarize([e for e in errors if e is not None]),
        "model": full["work"],
        "chunk_floors": {f"{c}|{k}": value for (c, k), value in floors.items()},
        "messages": full["messages"],
        "probe": probe_summary(results, full["messages"]),
    }


def fit_all(results: dict[str, Any]) -> dict[str, Any]:
    """Work and message models fitted to every configuration."""
    return {"work": fit_work(observations(results), chunk_floors(results)), "messages": fit_messages(results)}


def probe_summary(results: dict[str, Any], messages: dict[str, Any]) -> dict[str, Any]:
    """The probe's per-chunk costs, and the message model checked against the probe's largest configuration: the
    metadata DCP broadcasts at the end of a save, predicted by the fitted size of that broadcast against the
    size the probe pickled (a configuration far beyond the measured ones)."""
    points = results.get("probe") or []
    if not points:
        return {}
    largest = max(points, key=lambda p: p["chunks"])
    tensors = float(largest["tensors"])
    shape = {
        "plain_per_rank": 0.0,
        "dtensors_per_rank": tensors,
        "tensors": tensors,
        "chunks": float(largest["chunks"]),
        "world": float(largest["world"]),
    }
    check = {}
    for contender in ("dcp_save", "plugin_sync"):
        for slot in messages.get(contender, {}).get("repeat", []):
            if slot["slot"] == "dcp:write broadcast_object_list #1":
                predicted = max(predict(size, shape) for _, size in slot["wire"])
                check[contender] = {"predicted": predicted, "probe": largest["metadata_bytes"]}
    return {"per_chunk_s": per_chunk(points), "largest": largest, "metadata_check": check}


def _errors(
    observation: dict[str, Any], model: dict[str, Any], host: dict[str, Any], held: bool
) -> dict[str, Any] | None:
    work = model.get(observation["contender"], {}).get(observation["kind"])
    if not work:
        return None
    values = observation["values"]
    row = {
        "point": observation["point"],
        "contender": observation["contender"],
        "kind": observation["kind"],
        "held_out": held,
        "cpu": values["cpu"],
        "cpu_predicted": predict(work["cpu"], observation["shape"]),
        "wall": values["wall"],
        "wall_predicted": host_wall(work, observation, host),
    }
    if "blocking_cpu" in values and "blocking_cpu" in work:
        row["blocking_wall"] = values["blocking_wall"]
        row["blocking_wall_predicted"] = host_wall(work, observation, host, blocking=True)
    return row


def relative_error(predicted: float, measured: float) -> float:
    """``predicted / measured - 1``."""
    return predicted / measured - 1.0 if measured > 0 else 0.0


def summarize(errors: list[dict[str, Any]]) -> dict[str, Any]:
    """Median and worst absolute relative error of CPU and wall time, held-out and in-sample."""
    out: dict[str, Any] = {}
    for held, label in ((True, "held_out"), (False, "in_sample")):
        rows = [e for e in errors if e["held_out"] is held]
        for quantity in ("cpu", "wall"):
            values = [abs(relative_error(e[f"{quantity}_predicted"], e[quantity])) for e in rows]
            out[f"{label}.{quantity}"] = {
                "n": len(values),
                "median": float(statistics.median(values)) if values else None,
                "max": max(values) if values else None,
            }
    return out


__all__ = [
    "KINDS",
    "MESSAGE_FEATURES",
    "WORK_FEATURES",
    "fit",
    "fit_all",
    "fit_linear",
    "fit_messages",
    "fit_work",
    "host_wall",
    "per_chunk",
    "is_held_out",
    "nnls",
    "observations",
    "predict",
    "relative_error",
    "slots",
    "summarize",
]
