"""Non-tensor state survives a checkpoint exactly, without pickle."""

from __future__ import annotations

import argparse
import collections
import dataclasses
import enum
import math
import pathlib
import random

import numpy as np
import pytest
import torch

from dcp_plugin.format import encoding
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


# -- what Lightning puts in hyper-parameters, without pickle -----------------------------------------
class Colour(enum.Enum):
    RED = "red"
    BLUE = 2


class Level(enum.IntEnum):
    LOW = 1


@dataclasses.dataclass(frozen=True)
class Optim:
    lr: float = 0.1
    betas: tuple = (0.9, 0.99)
    name: str = "adam"

    def __post_init__(self):  # never run on load
        raise AssertionError("called")  # pragma: no cover - only when constructed normally


def _optim() -> Optim:
    obj = object.__new__(Optim)
    for name, value in (("lr", 0.1), ("betas", (0.9, 0.99)), ("name", "adam")):
        object.__setattr__(obj, name, value)
    return obj


def test_hyper_parameters_lightning_stores_come_back_as_the_same_types():
    from lightning.fabric.utilities.data import AttributeDict

    value = {
        "namespace": argparse.Namespace(lr=0.1, layers=[1, 2], nested=argparse.Namespace(a=1)),
        "posix": pathlib.Path("/data/x"),
        "pure": pathlib.PurePosixPath("a/b"),
        "windows": pathlib.PureWindowsPath("C:/x"),
        "colour": Colour.BLUE,
        "level": Level.LOW,
        "optim": _optim(),
        "attrs": AttributeDict(a=1, b=Colour.RED),
    }
    out, _ = roundtrip(value)
    assert type(out["namespace"]) is argparse.Namespace and out["namespace"] == value["namespace"]
    assert type(out["namespace"].nested) is argparse.Namespace
    for key in ("posix", "pure", "windows"):
        assert type(out[key]) is type(value[key]) and out[key] == value[key]
    assert out["colour"] is Colour.BLUE and out["level"] is Level.LOW
    assert type(out["optim"]) is Optim and out["optim"] == value["optim"]
    assert type(out["attrs"]) is AttributeDict and out["attrs"]["b"] is Colour.RED


def test_classes_are_never_imported_or_called_from_a_checkpoint(monkeypatch):
    import sys

    skeleton = encoding.Encoder("e").encode({"colour": Colour.RED, "optim": _optim()})
    # a checkpoint naming a module that is not imported, or something that is not an Enum / dataclass
    skeleton["colour"]["cls"] = "not_imported_module_xyz:Colour"
    skeleton["optim"]["cls"] = "os:system"
    before = set(sys.modules)
    decoded = encoding.decode(encoding.loads(encoding.dumps(skeleton)), {}.__getitem__)
    assert "not_imported_module_xyz" not in sys.modules and set(sys.modules) == before
    assert decoded["colour"] == "red"  # the enum's value
    assert decoded["optim"] == {"lr": 0.1, "betas": (0.9, 0.99), "name": "adam"}  # the fields as a dict
    # a module that is imported but a class that is not an Enum: the plain value, nothing called
    skeleton["colour"]["cls"] = "collections:OrderedDict"
    assert encoding.decode(encoding.loads(encoding.dumps(skeleton)), {}.__getitem__)["colour"] == "red"


def test_omegaconf_containers_are_stored_without_pickle():
    omegaconf = pytest.importorskip("omegaconf")
    cfg = omegaconf.OmegaConf.create(
        {"model": {"lr": 0.1, "layers": [1, 2], "ref": "${model.lr}"}, "tags": ["a"], "colour": Colour.RED}
    )
    listed = omegaconf.OmegaConf.create([1, {"a": None}])
    out, _ = roundtrip({"cfg": cfg, "list": listed})
    assert isinstance(out["cfg"], omegaconf.DictConfig) and isinstance(out["list"], omegaconf.ListConfig)
    assert omegaconf.OmegaConf.to_container(out["cfg"]) == omegaconf.OmegaConf.to_container(cfg)
    assert out["cfg"].model.ref == 0.1  # interpolations are kept, not resolved at save time
    assert out["cfg"].colour is Colour.RED
    assert list(out["list"]) == list(listed)


def test_omegaconf_containers_load_as_plain_containers_without_omegaconf(monkeypatch):
    omegaconf = pytest.importorskip("omegaconf")
    skeleton = encoding.Encoder("e").encode({"cfg": omegaconf.OmegaConf.create({"a": [1]})})
    import builtins

    real_import = builtins.__import__

    def no_omegaconf(name, *args, **kwargs):
        if name.startswith("omegaconf"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_omegaconf)
    assert encoding.decode(encoding.loads(encoding.dumps(skeleton)), {}.__getitem__) == {"cfg": {"a": [1]}}


def test_lightning_hyper_parameters_with_a_dictconfig_save_and_load_without_pickle(tmp_path):
    omegaconf = pytest.importorskip("omegaconf")
    from dcp_plugin.lightning import DCPCheckpointIO

    hparams = {"cfg": omegaconf.OmegaConf.create({"lr": 0.1, "data": {"root": "/x"}}), "path": pathlib.Path("/y")}
    checkpoint = {
        "epoch": 0,
        "global_step": 1,
        "pytorch-lightning_version": "2.6.6",
        "state_dict": {"w": torch.ones(2)},
        "hyper_parameters": hparams,
    }
    plugin = DCPCheckpointIO(async_mode="sync", allow_pickle=False)
    plugin.save_checkpoint(checkpoint, tmp_path / "a.ckpt")
    loaded = plugin.load_checkpoint(tmp_path / "a.ckpt")
    plugin.teardown()
    assert isinstance(loaded["hyper_parameters"]["cfg"], omegaconf.DictConfig)
    assert loaded["hyper_parameters"]["cfg"] == hparams["cfg"] and loaded["hyper_parameters"]["path"] == hparams["path"]


def test_omegaconf_container_classes_are_stored_by_name_and_other_classes_are_refused():
    """Lightning stores ``type(hparams)`` (``hparams_type``) for OmegaConf hyper-parameters and calls it on load:
    those classes come back as themselves; any other class stays an error without pickle."""
    omegaconf = pytest.importorskip("omegaconf")
    out, _ = roundtrip({"hparams_type": omegaconf.DictConfig, "list_type": omegaconf.ListConfig})
    assert out["hparams_type"] is omegaconf.DictConfig and out["list_type"] is omegaconf.ListConfig
    with pytest.raises(encoding.EncodingError, match="subprocess.Popen.*'entry.cls'.*allow_pickle"):
        encoding.Encoder("entry").encode({"cls": __import__("subprocess").Popen})


def test_a_class_named_in_a_checkpoint_is_never_called_or_imported_unless_allowed(caplog):
    pytest.importorskip("omegaconf")
    skeleton = encoding.Encoder("e").encode({"hparams_type": __import__("omegaconf").DictConfig})
    skeleton["hparams_type"]["v"] = "subprocess:Popen"  # a tampered checkpoint
    decoded = encoding.decode(encoding.loads(encoding.dumps(skeleton)), {}.__getitem__)
    assert decoded == {"hparams_type": "subprocess:Popen"}  # a name; Lightning then uses its AttributeDict
    assert "subprocess:Popen" in caplog.text
