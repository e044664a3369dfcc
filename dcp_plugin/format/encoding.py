"""Safe encoding of arbitrary checkpoint state into DCP tensors plus a JSON skeleton.

DCP flattens nested state: integer dict keys come back as strings, empty containers disappear, and
non-tensor leaves are pickled (and unpickled on load). We avoid all three by splitting each entry into

* ``tensors``: a flat ``{dcp_key: tensor}`` mapping (plain tensors, DTensors, ShardedTensors), written
  and resharded by DCP itself;
* a ``skeleton``: JSON describing everything else exactly (types, keys, order, empty containers), in
  which each tensor is a reference to its ``dcp_key``.

The skeleton is stored as a ``uint8`` tensor, so a checkpoint contains no pickled objects unless the
user opted into ``allow_pickle``.
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import enum
import importlib
import inspect
import json
import logging
import math
import pathlib
import pickle
import sys
from collections.abc import Callable, Mapping
from typing import Any

import torch

log = logging.getLogger(__name__)

TAG = "__t"


class EncodingError(TypeError):
    """A value cannot be stored safely; the message names where it is and what to do."""


def _tensor_types() -> tuple[type, ...]:
    types: list[type] = [torch.Tensor]
    try:
        from torch.distributed._shard.sharded_tensor import ShardedTensor

        types.append(ShardedTensor)
    except ImportError:  # pragma: no cover - depends on the torch build
        pass
    return tuple(types)


TENSOR_TYPES = _tensor_types()


def is_tensor(value: Any) -> bool:
    return isinstance(value, TENSOR_TYPES)


# Dict subclasses that round-trip with their type: name -> (module, qualified name). Imported only when met,
# so the core never imports Lightning itself.
_DICT_CLASSES: dict[str, tuple[str, str]] = {
    "OrderedDict": ("collections", "OrderedDict"),
    "AttributeDict": ("lightning.fabric.utilities.data", "AttributeDict"),
}
_DICT_CLASS_NAMES = {f"{module}.{qualname}": name for name, (module, qualname) in _DICT_CLASSES.items()}
_DICT_CLASS_NAMES["pytorch_lightning.utilities.parsing.AttributeDict"] = "AttributeDict"
_DICT_CLASS_NAMES["lightning.pytorch.utilities.parsing.AttributeDict"] = "AttributeDict"


def _dict_class_name(value: Any) -> str | None:
    cls = type(value)
    return _DICT_CLASS_NAMES.get(f"{cls.__module__}.{cls.__qualname__}")


def _dict_class(name: str) -> type:
    if name not in _DICT_CLASSES:
        return dict
    module, qualname = _DICT_CLASSES[name]
    return getattr(importlib.import_module(module), qualname)


class Encoder:
    """Turns one state entry into (skeleton, tensors). Tensor keys are ``prefix.sub.path``."""

    def __init__(self, prefix: str, allow_pickle: bool = False) -> None:
        self.prefix = prefix
        self.allow_pickle = allow_pickle
        self.tensors: dict[str, Any] = {}
        self.paths: dict[str, tuple[str, ...]] = {}
        """Each tensor key's path in the nested state (``("optimizer", "state", "w", "exp_avg")``)."""

    def encode(self, value: Any) -> Any:
        return self._encode(value, (self.prefix,))

    def _encode(self, value: Any, path: tuple[str, ...]) -> Any:
        cls = type(value)
        if cls is str or cls is int or cls is bool or value is None:  # the common leaves first (exact types)
            return value
        if cls is float and math.isfinite(value):  # a learning rate, a beta: before the numpy and rich checks
            return value
        if cls is torch.Tensor or cls is torch.nn.Parameter or is_tensor(value):
            key = ".".join(path)
            if key in self.tensors:
                raise EncodingError(
                    f"Two tensors map to the checkpoint key {key!r}; rename one of the keys (keys are joined with '.')."
                )
            self.tensors[key] = value
            self.paths[key] = path
            return {TAG: "tensor", "k": key}
        if isinstance(value, enum.Enum):
            return {
                TAG: "enum",
                "cls": _class_path(type(value)),
                "name": value.name,
                "v": self._encode(value.value, path),
            }
        if value is None or isinstance(value, (bool, str)):
            return value
        numpy_value = _encode_numpy(value)
        if numpy_value is not None:
            return numpy_value
        if isinstance(value, int):
            return value if type(value) is int else {TAG: "int", "v": int(value)}
        if isinstance(value, float):
            if math.isfinite(value) and type(value) is float:
                return value
            return {TAG: "float", "v": repr(float(value))}
        if cls is dict or (isinstance(value, Mapping) and _dict_class_name(value) is not None):
            return self._encode_dict(value, path)
        rich = self._encode_rich(value, path)
        if rich is not None:
            return rich
        if type(value) in (list, tuple):
            items = [self._encode(v, (*path, str(i))) for i, v in enumerate(value)]
            return items if type(value) is list else {TAG: "tuple", "v": items}
        if type(value) in (set, frozenset):
            items = [self._encode(v, (*path, str(i))) for i, v in enumerate(sorted(value, key=repr))]
            return {TAG: type(value).__name__, "v": items}
        if isinstance(value, bytes):
            return {TAG: "bytes", "v": base64.b64encode(value).decode("ascii")}
        if isinstance(value, complex):
            return {TAG: "complex", "v": [repr(value.real), repr(value.imag)]}
        if isinstance(value, torch.dtype):
            return {TAG: "dtype", "v": str(value).removeprefix("torch.")}
        if isinstance(value, torch.device):
            return {TAG: "device", "v": str(value)}
        if self.allow_pickle:
            return {TAG: "pickle", "v": base64.b64encode(pickle.dumps(value)).decode("ascii")}
        what = value if isinstance(value, type) else type(value)
        raise EncodingError(
            f"Cannot store {'the class' if what is value else 'a value of type'} {what.__module__}.{what.__qualname__} "
            f"at {'.'.join(path)!r} without pickle. Convert it to tensors or JSON-like data (dict, list, str, "
            "numbers), give its owner state_dict()/load_state_dict(), or set allow_pickle=True if every reader of "
            "this checkpoint trusts it."
        )

    def _encode_rich(self, value: Any, path: tuple[str, ...]) -> dict | None:
        """What Lightning commonly stores in a checkpoint's hyper-parameters, tagged so it comes back as the
        same type: OmegaConf containers, ``argparse.Namespace``, ``pathlib`` paths, dataclass instances, and the
        OmegaConf container classes themselves (Lightning's ``hparams_type``)."""
        omegaconf_kind = _omegaconf_kind(value)
        if omegaconf_kind is not None:
            container = sys.modules["omegaconf"].OmegaConf.to_container(value, resolve=False)
            return {TAG: "omegaconf", "kind": omegaconf_kind, "v": self._encode(container, path)}
        if isinstance(value, argparse.Namespace) and type(value) is argparse.Namespace:
            return {TAG: "namespace", "v": self._encode(dict(vars(value)), path)}
        if isinstance(value, pathlib.PurePath):
            return {TAG: "path", "kind": _path_kind(value), "v": str(value)}
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            fields = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
            return {TAG: "dataclass", "cls": _class_path(type(value)), "v": self._encode(fields, path)}
        if isinstance(value, type) and _class_path(value) in _CLASS_REFERENCES:
            return {TAG: "class", "v": _class_path(value)}
        return None

    def _encode_dict(self, value: Mapping, path: tuple[str, ...]) -> Any:
        cls_name = None if type(value) is dict else _dict_class_name(value)
        str_keys = all(type(k) is str for k in value)
        if str_keys and cls_name is None and TAG not in value:
            return {k: self._encode(v, (*path, k)) for k, v in value.items()}
        if str_keys:  # a plain string key encodes as itself
            items = [[k, self._encode(v, (*path, k))] for k, v in value.items()]
        else:
            items = [[self._encode(k, (*path, "<key>")), self._encode(v, (*path, str(k)))] for k, v in value.items()]
        encoded: dict[str, Any] = {TAG: "dict", "v": items}
        if cls_name is not None:
            encoded["cls"] = cls_name
        return encoded


def _encode_numpy(value: Any) -> dict | None:
    try:
        import numpy as np
    except ImportError:  # pragma: no cover
        return None
    if isinstance(value, np.ndarray):
        if value.dtype.kind == "O":
            return None
        data = np.ascontiguousarray(value)
        return {
            TAG: "ndarray",
            "dtype": data.dtype.str,
            "shape": list(data.shape),
            "v": base64.b64encode(data.tobytes()).decode("ascii"),
        }
    if isinstance(value, np.generic):
        return {TAG: "npscalar", "dtype": value.dtype.str, "v": base64.b64encode(value.tobytes()).decode("ascii")}
    return None


def decode(skeleton: Any, resolve_tensor: Callable[[str], Any], allow_pickle: bool = False) -> Any:
    """Rebuild the value from its skeleton; ``resolve_tensor(key)`` returns the loaded tensor."""
    if isinstance(skeleton, list):
        return [decode(v, resolve_tensor, allow_pickle) for v in skeleton]
    if not isinstance(skeleton, dict):
        return skeleton
    tag = skeleton.get(TAG)
    if tag is None:
        return {k: decode(v, resolve_tensor, allow_pickle) for k, v in skeleton.items()}
    value = skeleton.get("v")
    if tag == "tensor":
        return resolve_tensor(skeleton["k"])
    if tag == "dict":
        cls = _dict_class(skeleton.get("cls", ""))
        return cls((decode(k, resolve_tensor, allow_pickle), decode(v, resolve_tensor, allow_pickle)) for k, v in value)
    if tag == "tuple":
        return tuple(decode(v, resolve_tensor, allow_pickle) for v in value)
    if tag == "set":
        return {decode(v, resolve_tensor, allow_pickle) for v in value}
    if tag == "frozenset":
        return frozenset(decode(v, resolve_tensor, allow_pickle) for v in value)
    if tag == "int":
        return int(value)
    if tag == "float":
        return float(value)
    if tag == "complex":
        return complex(float(value[0]), float(value[1]))
    if tag == "bytes":
        return base64.b64decode(value)
    if tag == "dtype":
        dtype = getattr(torch, value, None)
        if not isinstance(dtype, torch.dtype):
            raise EncodingError(f"Unknown dtype {value!r} in checkpoint.")
        return dtype
    if tag == "device":
        return torch.device(value)
    if tag in ("ndarray", "npscalar"):
        import numpy as np

        dtype = np.dtype(skeleton["dtype"])
        if dtype.kind == "O":
            raise EncodingError("Object arrays are not loaded from checkpoints.")
        raw = base64.b64decode(value)
        if tag == "npscalar":
            return np.frombuffer(raw, dtype=dtype)[0]
        return np.frombuffer(raw, dtype=dtype).reshape(skeleton["shape"]).copy()
    if tag in _RICH_DECODERS:
        return _RICH_DECODERS[tag](skeleton, decode(value, resolve_tensor, allow_pickle))
    if tag == "pickle":
        if not allow_pickle:
            raise EncodingError(
                "This checkpoint contains pickled Python objects; loading them runs code from the file. "
                "If you trust it, load with allow_pickle=True (Lightning: weights_only=False)."
            )
        return pickle.loads(base64.b64decode(value))
    raise EncodingError(f"Unknown value tag {tag!r} in checkpoint skeleton; was it written by a newer dcp-plugin?")


# -- rich values: what comes back as what -------------------------------------------------------------
# Classes are looked up only among modules already imported (``sys.modules``): a checkpoint never makes us
# import a module, and nothing it names is called. Enum members are looked up by name; dataclass instances are
# rebuilt field by field without running ``__init__`` / ``__post_init__``. When the class is not found (or is
# not what the checkpoint says), the plain value comes back instead: an enum's value, a dataclass's fields as a
# dict, an OmegaConf container as a dict or list.

_PATH_CLASSES = ("PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath")


# Classes stored as a reference: Lightning stores ``type(hparams)`` (``hparams_type``) when the hyper-parameters
# are an OmegaConf container, and calls it on load (``hparams_type(hparams)``). A reader may call a class named
# in a checkpoint, so only these are stored (anything else needs allow_pickle) and only these come back.
_CLASS_REFERENCES = frozenset({"omegaconf.dictconfig:DictConfig", "omegaconf.listconfig:ListConfig"})


def _class_path(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def _omegaconf_kind(value: Any) -> str | None:
    module = sys.modules.get("omegaconf")
    if module is None or not type(value).__module__.startswith("omegaconf"):
        return None
    if isinstance(value, module.DictConfig):
        return "dict"
    if isinstance(value, module.ListConfig):
        return "list"
    return None


def _path_kind(value: pathlib.PurePath) -> str:
    for name in _PATH_CLASSES:
        if isinstance(value, getattr(pathlib, name)):
            return name
    return "PurePosixPath"


def _imported_class(path: Any) -> type | None:
    """The class ``module:qualname`` if its module is already imported; never imports, never calls."""
    if not isinstance(path, str) or ":" not in path:
        return None
    module_name, _, qualname = path.partition(":")
    obj: Any = sys.modules.get(module_name)
    for part in qualname.split("."):
        if obj is None or part == "<locals>":
            return None
        obj = inspect.getattr_static(obj, part, None)
    return obj if isinstance(obj, type) else None


def _decode_enum(skeleton: dict, value: Any) -> Any:
    cls = _imported_class(skeleton.get("cls"))
    name = skeleton.get("name")
    if cls is not None and issubclass(cls, enum.Enum) and isinstance(name, str):
        member = vars(cls).get("_member_map_", {}).get(name)
        if isinstance(member, cls):
            return member
    log.warning("Enum %s is not imported; its member %s loads as its value.", skeleton.get("cls"), skeleton.get("name"))
    return value


def _decode_dataclass(skeleton: dict, fields: Any) -> Any:
    cls = _imported_class(skeleton.get("cls"))
    same_fields = (
        cls is not None
        and dataclasses.is_dataclass(cls)
        and isinstance(fields, dict)
        and {f.name for f in dataclasses.fields(cls)} == set(fields)
    )
    if same_fields:
        try:
            obj = object.__new__(cls)
            for name, field_value in fields.items():
                object.__setattr__(obj, name, field_value)
        except (TypeError, AttributeError):  # e.g. a dataclass over a builtin type
            pass
        else:
            return obj
    log.warning("Dataclass %s is not imported (or has other fields); it loads as a dict.", skeleton.get("cls"))
    return fields


def _decode_omegaconf(skeleton: dict, container: Any) -> Any:
    try:
        from omegaconf import OmegaConf
    except ImportError:
        return container  # a plain dict or list
    return OmegaConf.create(container)


def _decode_class(skeleton: dict, path: Any) -> Any:
    """An allowed class, imported; otherwise (not allowed, or its library is not installed) its name, which
    Lightning reads as an older checkpoint's ``hparams_type`` (it then uses its ``AttributeDict``)."""
    if path in _CLASS_REFERENCES:
        module_name, _, name = path.partition(":")
        try:
            return getattr(importlib.import_module(module_name), name)
        except (ImportError, AttributeError):
            pass
    log.warning("The class %s named in the checkpoint is not loaded; it comes back as its name.", path)
    return path


def _decode_namespace(skeleton: dict, attributes: Any) -> Any:
    if not isinstance(attributes, dict) or not all(isinstance(k, str) for k in attributes):
        raise EncodingError("Malformed argparse.Namespace in checkpoint skeleton.")
    return argparse.Namespace(**attributes)


def _decode_path(skeleton: dict, text: Any) -> Any:
    kind = skeleton.get("kind")
    if kind not in _PATH_CLASSES or not isinstance(text, str):
        raise EncodingError("Malformed path in checkpoint skeleton.")
    try:
        return getattr(pathlib, kind)(text)
    except NotImplementedError:  # a WindowsPath on POSIX, or the other way round
        return getattr(pathlib, "Pure" + kind if not kind.startswith("Pure") else kind)(text)


_RICH_DECODERS: dict[str, Callable[[dict, Any], Any]] = {
    "enum": _decode_enum,
    "dataclass": _decode_dataclass,
    "omegaconf": _decode_omegaconf,
    "namespace": _decode_namespace,
    "path": _decode_path,
    "class": _decode_class,
}


def tensor_keys(skeleton: Any) -> list[str]:
    """All tensor keys referenced by a skeleton, in order."""
    keys: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, list):
            for item in node:
                walk(item)
        elif isinstance(node, dict):
            if node.get(TAG) == "tensor":
                keys.append(node["k"])
            else:
                for item in node.values():
                    walk(item)

    walk(skeleton)
    return keys


def dumps(document: Any, granule: int = 1) -> torch.Tensor:
    """JSON document -> uint8 tensor (how a skeleton travels through DCP), padded with spaces to a multiple of
    ``granule`` bytes (JSON allows trailing whitespace)."""
    raw = json.dumps(document, separators=(",", ":"), allow_nan=False).encode("utf-8")
    raw += b" " * (-len(raw) % granule)
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8) if raw else torch.empty(0, dtype=torch.uint8)


def loads(tensor: torch.Tensor) -> Any:
    return json.loads(bytes(tensor.numpy().tobytes()).decode("utf-8"))
