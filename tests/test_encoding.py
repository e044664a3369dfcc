"""Non-tensor state survives a checkpoint exactly, without pickle."""

from __future__ import annotations

import collections
import math
import random

import numpy as np
import pytest
import torch

from dcp_plugin import encoding
from tests.models import assert_same


def roundtrip(value, allow_pickle=False):
    encoder = encoding.Encoder("entry", allow_pickle=allow_pickle)
    skeleton = encoder.encode(value)
    document = encoding.loads(encoding.dumps(skeleton))
    return encoding.decode(document, encoder.tensors.__getitem__, allow_pickle=allow_pickle), encoder.tensors


def test_json_like_values_come_back_with_their_types():
    value = {
        1: "int key",
        (2, "x"): [],
        "empty": {},
        "tuple": (1, 2.5, None, True),
        "floats": [float("inf"), -0.0, 1e-310],
        "set": {3, 1, 2},
        "bytes": b"\x00\xff",
        "complex": 1 + 2j,
        "dtype": torch.bfloat16,
        "device": torch.device("cpu"),
        "ordered": collections.OrderedDict([("b", 1), ("a", 2)]),
        "__t": "a key that looks like our tag",
    }
    out, tensors = roundtrip(value)
    assert tensors == {}
    assert out == value
    assert list(out["ordered"]) == ["b", "a"] and type(out["ordered"]) is collections.OrderedDict
    assert math.copysign(1, out["floats"][1]) == -1
    assert math.isnan(roundtrip(float("nan"))[0])


def test_tensors_are_split_out_under_dotted_keys():
    t1, t2 = torch.arange(4), torch.ones(2, 2)
    out, tensors = roundtrip({"a": {"b": t1}, 7: [t2]})
    assert set(tensors) == {"entry.a.b", "entry.7.0"}
    assert out["a"]["b"] is t1 and out[7][0] is t2


def test_rng_states_roundtrip_exactly():
    value = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    out, _ = roundtrip(value)
    assert out["python"] == value["python"]
    assert_same(out["torch"], value["torch"])
    assert out["numpy"][0] == "MT19937" and np.array_equal(out["numpy"][1], value["numpy"][1])
    assert out["numpy"][2:] == value["numpy"][2:]
    np_scalar, _ = roundtrip(np.float32(1.5))
    assert type(np_scalar) is np.float32 and np_scalar == np.float32(1.5)


def test_arbitrary_objects_are_refused_without_pickle_and_explained():
    class Custom:
        pass

    with pytest.raises(encoding.EncodingError, match=r"Custom.*'entry\.x'.*allow_pickle"):
        roundtrip({"x": Custom()})


def test_pickle_is_opt_in_on_both_sides():
    value = {"x": collections.Counter("aab")}
    encoder = encoding.Encoder("entry", allow_pickle=True)
    document = encoding.loads(encoding.dumps(encoder.encode(value)))
    with pytest.raises(encoding.EncodingError, match="pickled Python objects"):
        encoding.decode(document, encoder.tensors.__getitem__, allow_pickle=False)
    assert encoding.decode(document, encoder.tensors.__getitem__, allow_pickle=True) == value


def test_colliding_keys_are_reported():
    with pytest.raises(encoding.EncodingError, match="entry.a.b"):
        roundtrip({"a.b": torch.zeros(1), "a": {"b": torch.zeros(1)}})
