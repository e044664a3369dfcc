"""The scaling benchmark: its model's pieces, its collective counter, its page against its results file, and a run
end to end at a tiny size (no timing checks)."""

from __future__ import annotations

import json
import pickle
import re

import numpy as np
import pytest

from benchmarks import scaling, scaling_cluster, scaling_model, scaling_page
from tests.multiproc import run_ranks


def test_nnls_recovers_non_negative_coefficients_and_never_goes_below_zero():
    rng = np.random.default_rng(0)
    matrix = rng.uniform(0.1, 2.0, size=(30, 4))
    truth = np.array([0.5, 0.0, 2.0, 0.25])
    assert np.allclose(scaling_model.nnls(matrix, matrix @ truth), truth, atol=1e-9)
    assert (scaling_model.nnls(matrix, -matrix @ truth) >= 0).all()


def test_a_fitted_coefficient_is_held_to_its_floor():
    shapes = [{"chunks": float(c), "plain_per_rank": float(c)} for c in (1, 2, 4, 8)]
    targets = [2.0 * c for c in (1, 2, 4, 8)]
    free = scaling_model.fit_linear(shapes, targets, ("chunks", "plain_per_rank"), relative=True)
    assert free["chunks"] + free["plain_per_rank"] == pytest.approx(2.0)
    held = scaling_model.fit_linear(shapes, targets, ("chunks", "plain_per_rank"), True, floors={"chunks": 1.5})
    assert held["chunks"] >= 1.5 and held["chunks"] + held["plain_per_rank"] == pytest.approx(2.0)


def test_the_network_prices_gloo_algorithms():
    cluster = scaling_cluster.Cluster()
    assert scaling_cluster.wire_time("all_gather", 1, 1e6, cluster) == 0.0
    ring = [scaling_cluster.wire_time("all_gather", world, 8, cluster) for world in (2, 1001)]
    assert ring[1] == pytest.approx(1000 * ring[0])  # a ring: one step per other rank
    tree = [scaling_cluster.wire_time("broadcast", world, 8, cluster) for world in (2, 1024)]
    assert tree[1] == pytest.approx(10 * tree[0])  # a binomial tree: log2(ranks) steps


def test_the_projected_state_is_a_llama2_70b_shape_under_fsdp():
    scenario = scaling_cluster.Scenario()
    assert scenario.parameter_tensors == 80 * 9 + 3
    assert 68e9 < scenario.parameters < 70e9
    shape = scenario.shape(1000)
    assert shape["dtensors_per_rank"] == 3 * scenario.parameter_tensors  # parameters and AdamW's two moments
    assert shape["chunks"] == 3 * scenario.parameter_tensors * 1000 + scenario.parameter_tensors


def _gather_and_broadcast(rank: int, world_size: int) -> list[dict]:
    from benchmarks import scaling_collectives

    scaling_collectives.install()
    import torch.distributed as dist

    position = scaling_collectives.mark()
    out: list = [None] * world_size
    dist.all_gather_object(out, {"rank": rank, "payload": "x" * (100 * (rank + 1))})
    box = [list(range(50))] if rank == 0 else [None]
    dist.broadcast_object_list(box, src=0)
    dist.barrier()
    return scaling_collectives.since(position)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_the_collective_counter_records_calls_callers_and_pickled_bytes():
    calls = run_ranks(_gather_and_broadcast, world_size=2)
    for rank, recorded in enumerate(calls):
        assert [c["op"] for c in recorded] == ["all_gather_object", "broadcast_object_list", "barrier"]
        assert all(c["origin"] == "tests.test_scaling._gather_and_broadcast" for c in recorded)
        gathered, broadcast, _ = recorded
        mine = len(pickle.dumps({"rank": rank, "payload": "x" * (100 * (rank + 1))}))
        assert gathered["pickled_out"] == mine
        biggest = len(pickle.dumps({"rank": 1, "payload": "x" * 200}))
        assert gathered["wire"] == [["all_gather", 8], ["all_gather", biggest]]  # sizes, then padded objects
        assert broadcast["pickled_out" if rank == 0 else "pickled_in"] == len(pickle.dumps(list(range(50))))


def test_the_model_file_charts_and_page_agree_with_the_results_file():
    problems = scaling.check(scaling_page.load(scaling_page.RESULTS), scaling_page.load(scaling_page.MODEL))
    assert not problems, problems


def test_a_value_the_files_do_not_give_is_an_error():
    results, model = scaling_page.load(scaling_page.RESULTS), scaling_page.load(scaling_page.MODEL)
    with pytest.raises(scaling_page.UnknownValue, match="no value 'nobody.knows'"):
        scaling_page.render("<!-- sc nobody.knows -->1 s<!-- /sc -->", results, model)


FIGURE = re.compile(r"\d[\d.,]*\s?(?:ms|µs|%|×|GiB|MiB|KiB|min)\b|\d+\.\d+\s?s\b")


def test_the_page_quotes_no_measured_figure_outside_the_markers():
    text = scaling_page.PAGE.read_text(encoding="utf-8")
    text = scaling_page.BLOCK.sub("", scaling_page.INLINE.sub("", text))
    text = re.sub(r"```.*?```", "", text, flags=re.S)
    prose = re.sub(r"\]\([^)]*\)", "]", re.sub(r"^    .*$", "", text, flags=re.M))
    allowed = {"64 MiB", "16 MiB", "1 GiB"}  # the grid's own sizes, which the grid in benchmarks/scaling_runs.py sets
    found = [figure for figure in FIGURE.findall(prose) if figure not in allowed]
    assert not found, f"docs/scaling.md quotes {found} outside <!-- sc ... --> markers"


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_the_quick_run_measures_fits_and_projects_without_touching_the_documentation(tmp_path):
    page_before = scaling_page.PAGE.read_text(encoding="utf-8")
    out = tmp_path / "scaling.json"
    assert scaling.main(["--quick", "--out", str(out), "--dir", str(tmp_path / "ckpt")]) == 0

    results = json.loads(out.read_text())
    model = json.loads((tmp_path / "scaling-model.json").read_text())
    keys = {point["key"] for point in results["points"]}
    from benchmarks.scaling_contenders import RESTORERS, SAVERS

    measured = {(row["point"], row["contender"]) for row in results["measurements"]}
    assert measured == {(key, name) for key in keys for name in (*SAVERS, *RESTORERS)}
    assert all(row["verified"] for row in results["measurements"] if row["contender"] in RESTORERS)
    assert all(row["collectives"]["calls"] > 0 for row in results["measurements"])
    assert results["probe"] and all(point["metadata_bytes"] > 0 for point in results["probe"])
    assert any(error["held_out"] for error in model["errors"]) and model["error_summary"]["held_out.cpu"]["n"] > 0
    worlds = {row["world"] for row in model["projections"]["rows"]}
    assert worlds == set(scaling_cluster.PROJECTED_WORLDS)
    assert all(row["total_disk_s"] > 0 and row["calls"] > 0 for row in model["projections"]["rows"])
    assert scaling_page.PAGE.read_text(encoding="utf-8") == page_before
    assert not any((tmp_path / "ckpt").iterdir()), "checkpoints left behind"
