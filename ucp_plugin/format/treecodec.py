"""Encode nested training state (lr scheduler, loss scaler, RNG, client state) as JSON + tensors.

Tensors become ``{"__tensor__": key}`` (stored in a safetensors file beside the JSON), tuples become
``{"__tuple__": [...]}``, NumPy arrays ``{"__ndarray__": key}``; other non-JSON values are refused
with their path, so nothing that needs pickle (and could run code on read) ever enters a checkpoint.
"""
from __future__ import annotations

import math
import sys

import numpy as np

from ..errors import FormatError, UnsupportedError

_SCALARS = (str, int, bool, type(None))


def is_tensor(obj) -> bool:
    """Whether ``obj`` is a torch tensor, without importing torch: none exists before torch is."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(obj, torch.Tensor)


def encode(obj, where: str = "state") -> tuple[object, dict]:
    """(JSON-able tree, tensors by key): torch tensors as CPU copies, NumPy arrays as array copies."""
    tensors: dict = {}
    return _enc(obj, where, tensors), tensors


def _enc(obj, path: str, tensors: dict):
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else {"__float__": repr(obj)}
    if isinstance(obj, _SCALARS):
        return obj
    if is_tensor(obj):
        key = f"t{len(tensors)}"
        tensors[key] = obj.detach().cpu().contiguous().clone()
        return {"__tensor__": key}
    if isinstance(obj, np.ndarray):
        key = f"t{len(tensors)}"
        tensors[key] = np.ascontiguousarray(obj).copy()
        return {"__ndarray__": key}
    if isinstance(obj, np.generic):
        return _enc(obj.item(), path, tensors)
    if isinstance(obj, tuple):
        return {"__tuple__": [_enc(v, f"{path}[{i}]", tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_enc(v, f"{path}[{i}]", tensors) for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        bad = [k for k in obj if not isinstance(k, (str, int))]
        if bad:
            raise UnsupportedError(f"{path}: key {bad[0]!r} of type {type(bad[0]).__name__} cannot be "
                                   "saved; use str or int keys")
        return {"__dict__": [[k, _enc(v, f"{path}[{k!r}]", tensors)] for k, v in obj.items()]}
    raise UnsupportedError(f"{path}: value of type {type(obj).__name__} cannot be saved without pickle; "
                           "convert it to numbers, strings, lists, dicts or tensors")


def decode(obj, tensors: dict, where: str = "state"):
    if isinstance(obj, list):
        return [decode(v, tensors, where) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__tensor__" in obj or "__ndarray__" in obj:
        key = obj.get("__tensor__", obj.get("__ndarray__"))
        if key not in tensors:
            raise FormatError(f"{where}: tensor {key!r} is missing from the state file")
        t = tensors[key]
        return t.numpy() if "__ndarray__" in obj else t
    if "__tuple__" in obj:
        return tuple(decode(v, tensors, where) for v in obj["__tuple__"])
    if "__float__" in obj:
        return float(obj["__float__"])
    if "__dict__" in obj:
        return {k: decode(v, tensors, where) for k, v in obj["__dict__"]}
    raise FormatError(f"{where}: unknown encoded object with keys {sorted(obj)}")
