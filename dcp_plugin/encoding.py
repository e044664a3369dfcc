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

import base64
import importlib
import json
import math
import pickle
from collections.abc import Callable, Mapping
from typing import Any

import torch

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

    def encode(self, value: Any) -> Any:
        return self._encode(value, self.prefix)

    def _encode(self, value: Any, path: str) -> Any:
        if is_tensor(value):
            if path in self.tensors:
                raise EncodingError(
                    f"Two tensors map to the checkpoint key {path!r}; rename one of the keys "
                    "(keys are joined with '.')."
                )
            self.tensors[path] = value
            return {TAG: "tensor", "k": path}
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
        if isinstance(value, Mapping) and (type(value) is dict or _dict_class_name(value) is not None):
            return self._encode_dict(value, path)
        if type(value) in (list, tuple):
            items = [self._encode(v, f"{path}.{i}") for i, v in enumerate(value)]
            return items if type(value) is list else {TAG: "tuple", "v": items}
        if type(value) in (set, frozenset):
            items = [self._encode(v, f"{path}.{i}") for i, v in enumerate(sorted(value, key=repr))]
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
        raise EncodingError(
            f"Cannot store a value of type {type(value).__module__}.{type(value).__qualname__} at "
            f"{path!r} without pickle. Convert it to tensors or JSON-like data (dict, list, str, numbers), "
            "give its owner state_dict()/load_state_dict(), or set allow_pickle=True if every reader of "
            "this checkpoint trusts it."
        )

    def _encode_dict(self, value: Mapping, path: str) -> Any:
        cls_name = _dict_class_name(value)
        plain_keys = all(isinstance(k, str) for k in value) and TAG not in value
        if plain_keys and cls_name is None:
            return {k: self._encode(v, f"{path}.{k}") for k, v in value.items()}
        items = [[self._encode(k, f"{path}.<key>"), self._encode(v, f"{path}.{k}")] for k, v in value.items()]
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
    if tag == "pickle":
        if not allow_pickle:
            raise EncodingError(
                "This checkpoint contains pickled Python objects; loading them runs code from the file. "
                "If you trust it, load with allow_pickle=True (Lightning: weights_only=False)."
            )
        return pickle.loads(base64.b64decode(value))
    raise EncodingError(f"Unknown value tag {tag!r} in checkpoint skeleton; was it written by a newer dcp-plugin?")


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


def dumps(document: Any) -> torch.Tensor:
    """JSON document -> uint8 tensor (how a skeleton travels through DCP)."""
    raw = json.dumps(document, separators=(",", ":"), allow_nan=False).encode("utf-8")
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8) if raw else torch.empty(0, dtype=torch.uint8)


def loads(tensor: torch.Tensor) -> Any:
    return json.loads(bytes(tensor.numpy().tobytes()).decode("utf-8"))
