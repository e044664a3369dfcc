"""The checkpoint format on its own: state -> one flat DCP dict + skeleton -> state, without DCP I/O."""

from __future__ import annotations

import pytest
import torch
from torch.distributed.checkpoint.metadata import Metadata, TensorProperties, TensorStorageMetadata

from dcp_plugin.format import encoding, packing
from dcp_plugin.format.encoding import EncodingError
from dcp_plugin.format.state import PerRank, wrap_state
from tests.models import assert_same, make_model


def metadata_of(flat: dict) -> Metadata:
    """What DCP's .metadata would record for ``flat`` (sizes and dtypes)."""
    return Metadata(
        state_dict_metadata={
            key: TensorStorageMetadata(properties=TensorProperties(dtype=t.dtype), size=t.size(), chunks=[])
            for key, t in flat.items()
        }
    )


def round_trip(saved_state: dict, live_state: dict, *, rank: int = 0, strict: bool = True) -> tuple[dict, list]:
    """Pack ``saved_state``, then plan, "load" (copy tensors in place, as DCP would) and finish into ``live_state``."""
    packed = packing.pack(wrap_state(saved_state), rank=rank, world_size=1, allow_pickle=False)
    metadata = metadata_of(packed.tensors)
    document = encoding.loads(packed.tensors[packing.skeleton_key(rank)])
    wrapped = wrap_state(live_state)
    plan = packing.plan_load(wrapped, document, metadata, source_rank=rank, strict=strict)
    if plan.problems:
        return {}, plan.problems
    for key, target in plan.flat.items():
        target.copy_(packed.tensors[key])
    return packing.finish_load(plan, wrapped, strict=strict, allow_pickle=False), plan.warnings


def test_models_and_plain_values_round_trip_exactly():
    source = make_model(seed=1)
    values = {"ids": {3: "a", 10: (1, 2)}, "empty": [], "nested": {"t": torch.arange(4)}, "f": float("inf")}
    target = make_model(seed=2)
    plain, problems = round_trip({"model": source, "values": values}, {"model": target, "values": None})
    assert problems == []
    assert_same(target.state_dict(), source.state_dict())
    assert plain["values"]["ids"] == {3: "a", 10: (1, 2)} and plain["values"]["empty"] == []
    assert torch.equal(plain["values"]["nested"]["t"], torch.arange(4)) and plain["values"]["f"] == float("inf")


def test_tensor_keys_are_the_ones_dcp_would_use():
    packed = packing.pack(wrap_state({"model": make_model()}), rank=0, world_size=1, allow_pickle=False)
    assert "model.0.weight" in packed.tensors and packing.skeleton_key(0) in packed.tensors
    assert packed.entries == {"model": {"per_rank": False}}


def test_per_rank_entries_are_stored_under_their_rank():
    packed = packing.pack({"gen": PerRank({"t": torch.zeros(2)})}, rank=3, world_size=4, allow_pickle=False)
    assert "gen/rank3.t" in packed.tensors and packed.entries == {"gen": {"per_rank": True}}
    assert packing.skeleton_source_rank(3, saved_world_size=4) == 3
    assert packing.skeleton_source_rank(5, saved_world_size=4) == 0  # ranks that did not exist take rank 0's


def test_entries_saved_once_take_rank_0s_values_unless_their_tensors_differ():
    def document(rank: int, stage: torch.nn.Module) -> dict:
        state = {"values": {"lr": 0.1 * (rank + 1)}, "stage": stage, "mine": PerRank({"rank": rank})}
        packed = packing.pack(wrap_state(state), rank=rank, world_size=2, allow_pickle=False)
        return encoding.loads(packed.tensors[packing.skeleton_key(rank)])

    first = torch.nn.Linear(2, 2)
    rank0, rank1 = document(0, first), document(1, first)
    merged = packing.take_replicated(rank1, rank0)["entries"]
    assert merged["values"] == rank0["entries"]["values"] != rank1["entries"]["values"]  # a plain value: rank 0's
    assert merged["stage"] == rank0["entries"]["stage"]
    assert merged["mine"] == rank1["entries"]["mine"]  # per rank: its own
    # pipeline stages: each rank holds other tensors under the entry, which stays the rank's own
    other_stage = document(1, torch.nn.Sequential(torch.nn.Linear(2, 2)))
    assert packing.take_replicated(other_stage, rank0)["entries"]["stage"] == other_stage["entries"]["stage"]


def test_every_mismatch_is_listed_before_anything_is_loaded():
    wrong = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    _, problems = round_trip({"model": make_model()}, {"model": wrong, "absent": 1})
    text = "\n".join(problems)
    assert "shape mismatch for 'model.2.weight'" in text and "entry 'absent' is not in the checkpoint" in text
    error = packing.mismatch_error("/x/step_1", [problems, ["other rank problem"]])
    assert "rank 1: other rank problem" in str(error) and "strict=False" in str(error)


def test_non_strict_takes_what_matches_and_warns():
    bigger = torch.nn.Sequential(*make_model(seed=4), torch.nn.Linear(8, 2))
    extra = bigger[3].weight.detach().clone()
    _, warnings = round_trip({"model": make_model(seed=1)}, {"model": bigger}, strict=False)
    assert any("missing keys" in w for w in warnings)
    assert torch.equal(bigger[3].weight, extra)
    assert_same(bigger[:3].state_dict(), make_model(seed=1).state_dict())


def test_values_that_need_pickle_are_refused_and_entries_may_not_collide():
    class Opaque:
        pass

    with pytest.raises(EncodingError, match="allow_pickle"):
        packing.pack({"x": Opaque()}, rank=0, world_size=1, allow_pickle=False)
    with pytest.raises(EncodingError, match="collide"):
        packing.pack({"a": {"b": torch.zeros(1)}, "a.b": torch.zeros(1)}, rank=0, world_size=1, allow_pickle=False)


class _TiedLM(torch.nn.Module):
    """GPT-2's layout: the output layer shares the token embedding's weight."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.wte = torch.nn.Embedding(512, 256)  # 512 KiB
        self.block = torch.nn.Linear(256, 256)
        self.lm_head = torch.nn.Linear(256, 512, bias=False)
        self.lm_head.weight = self.wte.weight


@pytest.mark.parametrize("incremental", [True, False])
def test_tied_weights_are_stored_once_and_come_back_tied(tmp_path, incremental):
    import os

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    from dcp_plugin import CheckpointManager, ModelState, OptimizerState

    model = _TiedLM()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    loss = model.lm_head(model.block(model.wte(torch.tensor([1, 2, 3])))).pow(2).mean()
    loss.backward()
    optimizer.step()
    with CheckpointManager(tmp_path / "run", async_mode="sync", incremental=incremental) as manager:
        manager.save(1, {"model": ModelState(model), "optim": OptimizerState(model, optimizer)})
        directory = os.path.join(manager.storage.root_url, "step_000000001")
        stored = sum(
            os.path.getsize(os.path.join(directory, n)) for n in os.listdir(directory) if n.endswith(".distcp")
        )
        unique = sum(p.nbytes for p in model.parameters())  # each shared parameter counted once
        assert stored < 3 * unique + model.wte.weight.nbytes // 4, stored  # weights + Adam's moments, each once
        read = manager.read(1)["model"]
        assert read["lm_head.weight"] is read["wte.weight"]
        assert torch.equal(read["wte.weight"], model.wte.weight)
        fresh = _TiedLM(seed=3)
        manager.load({"model": ModelState(fresh)}, step=1)
        assert fresh.lm_head.weight is fresh.wte.weight and torch.equal(fresh.wte.weight, model.wte.weight)
    # PyTorch's own loader finds every name it asks for, both pointing at the one stored copy
    other = _TiedLM(seed=4)
    target = {"model": get_model_state_dict(other)}
    dcp.load(target, checkpoint_id=directory)
    set_model_state_dict(other, target["model"])
    assert torch.equal(other.lm_head.weight, model.wte.weight)
