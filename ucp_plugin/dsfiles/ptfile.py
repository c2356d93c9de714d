"""Files written by ``torch.save`` (its zip format), read without torch and without running code.

A ``.pt`` file is a zip archive, stored uncompressed: ``<name>/data.pkl`` (a pickle of the object,
each tensor a reference to a storage) and one member ``<name>/data/<key>`` per storage. The pickle is
read by a ``pickle.Unpickler`` whose ``find_class`` answers only from an allowlist (``GLOBALS``: the
names ``torch.save`` writes for tensors, plus the caller's inert stand-ins), as
``torch.load(weights_only=True)`` does; any other global is refused, so nothing is imported or
called. Tensors come back as NumPy arrays over one copy-on-write mapping of the file: nothing is
read until touched, and ``PtFile.release`` gives the touched pages back. bfloat16 arrays have the
dtype ``storage.files.BFLOAT16``. ``as_torch`` turns a loaded tree into torch tensors (zero-copy)
for callers that want them.
"""
from __future__ import annotations

import collections
import io
import mmap
import os
import pickle
import zipfile

import numpy as np

from ..errors import FormatError, UCPError, UnsupportedError
from ..storage.files import BFLOAT16, torch_dtypes

# torch.save's storage classes and the dtype of their elements
STORAGES = {"FloatStorage": "float32", "DoubleStorage": "float64", "HalfStorage": "float16",
            "BFloat16Storage": "bfloat16", "LongStorage": "int64", "IntStorage": "int32",
            "ShortStorage": "int16", "CharStorage": "int8", "ByteStorage": "uint8", "BoolStorage": "bool"}
_LOCAL_HEADER = 30  # bytes of a zip local file header before its name and extra field


class _StorageType:
    def __init__(self, dtype: str):
        self.dtype = BFLOAT16 if dtype == "bfloat16" else np.dtype(dtype)


def _rebuild_tensor(storage, offset, size, stride, requires_grad=False, hooks=None, metadata=None):
    """``torch._utils._rebuild_tensor_v2``: a strided view of the storage, checked to lie inside it
    (``as_strided`` itself would read past the end)."""
    size, stride, item = tuple(size), tuple(stride), storage.dtype.itemsize
    last = offset + sum((n - 1) * s for n, s in zip(size, stride))
    if len(size) != len(stride) or offset < 0 or min(stride, default=0) < 0 or (
            all(size) and last >= storage.size):
        raise ValueError(f"a tensor of size {size}, stride {stride} at {offset} lies outside its storage")
    return np.lib.stride_tricks.as_strided(storage[offset:], shape=size, strides=tuple(s * item for s in stride))


def _rebuild_parameter(data, requires_grad=False, hooks=None):
    return data


class _TensorType:
    """``torch.Tensor`` / ``torch.nn.Parameter`` named as the class to rebuild a tensor as."""


def _rebuild_from_type(func, new_type, args, state):
    """``torch._tensor._rebuild_from_type_v2`` (how a tensor whose class was recorded, such as
    ZeRO-3's flat fp32 partitions, is saved): the array ``func`` rebuilds. ``state`` holds Python
    attributes of the tensor object, not its data, and is dropped."""
    if not isinstance(new_type, _TensorType) or func not in (_rebuild_tensor, _rebuild_parameter):
        raise pickle.UnpicklingError(f"a tensor rebuilt as {new_type!r} by {func!r}")
    return func(*args)


GLOBALS = {("collections", "OrderedDict"): collections.OrderedDict, ("torch", "Size"): tuple,
           ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
           ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
           ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type,
           ("torch", "Tensor"): _TensorType(), ("torch.nn.parameter", "Parameter"): _TensorType(),
           **{("torch", name): _StorageType(dtype) for name, dtype in STORAGES.items()}}


class _Unpickler(pickle.Unpickler):
    def __init__(self, data: bytes, allowed: dict, storage):
        super().__init__(io.BytesIO(data))
        self._allowed, self._storage = allowed, storage

    def find_class(self, module: str, name: str):
        found = self._allowed.get((module, name))
        if found is None:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed")
        return found

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType)):
            raise pickle.UnpicklingError(f"unknown persistent id {pid!r:.80}")
        return self._storage(pid[1].dtype, str(pid[2]), int(pid[4]))


class PtFile:
    """One ``torch.save`` file, loaded: ``obj`` is the unpickled object."""

    def __init__(self, path: str, classes: dict | None = None):
        self.path = path
        try:
            with open(path, "rb") as f:
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        except FileNotFoundError:
            raise FormatError(f"{path}: missing; the checkpoint is incomplete") from None
        except ValueError:  # an empty file cannot be mapped
            raise FormatError(f"{path}: empty; the file is truncated — restore it or re-save") from None
        self._storages: dict[str, np.ndarray] = {}
        try:
            self.obj = self._load({**GLOBALS, **(classes or {})})
        except UCPError:
            raise
        except Exception as e:  # whatever a damaged or hostile pickle makes the unpickler raise
            why = (str(e).splitlines() or [type(e).__name__])[0]
            raise FormatError(f"{path}: refused or unreadable ({why}); it holds objects other than tensors "
                              "and DeepSpeed's known metadata, or is damaged") from None

    def _load(self, allowed: dict):
        if self._map[:4] != b"PK\x03\x04":
            if self._map[:1] == b"\x80":  # a bare pickle: torch.save's format before torch 1.6
                raise UnsupportedError(f"{self.path}: torch's legacy format (_use_new_zipfile_serialization="
                                       "False); re-save it with torch.save's default")
            raise FormatError(f"{self.path}: not a file torch.save wrote; the file is damaged or not a checkpoint")
        with zipfile.ZipFile(self.path) as z:
            infos = {i.filename: i for i in z.infolist()}
            pkl = next((n for n in infos if n.endswith("/data.pkl") or n == "data.pkl"), None)
            if pkl is None:
                raise FormatError(f"{self.path}: a zip file without data.pkl; not written by torch.save")
            root = pkl[:-len("data.pkl")]
            order = infos.get(root + "byteorder")
            if order is not None and z.read(order).decode() != "little":
                raise UnsupportedError(f"{self.path}: saved on a big-endian machine; not supported")
            data = z.read(pkl)
        storages = root + "data/"
        self._members = {n[len(storages):]: i for n, i in infos.items() if n.startswith(storages)}
        return _Unpickler(data, allowed, self._storage).load()

    def _storage(self, dtype: np.dtype, key: str, numel: int) -> np.ndarray:
        if key not in self._storages:
            info = self._members.get(key)
            if info is None or info.compress_type != zipfile.ZIP_STORED:
                raise FormatError(f"{self.path}: storage {key!r} is missing or compressed")
            at = info.header_offset
            name_len, extra_len = (int.from_bytes(self._map[at + o:at + o + 2], "little") for o in (26, 28))
            start = at + _LOCAL_HEADER + name_len + extra_len
            if numel * dtype.itemsize > info.file_size:
                raise FormatError(f"{self.path}: storage {key!r} is shorter than its tensors")
            self._storages[key] = np.frombuffer(self._map, dtype, count=numel, offset=start)
        return self._storages[key]

    def release(self) -> None:
        """Give back the mapped pages touched so far (they leave the process's RSS; touched again,
        they are read again from the page cache). No-op where ``madvise`` is missing."""
        if hasattr(mmap, "MADV_DONTNEED"):
            self._map.madvise(mmap.MADV_DONTNEED)


def as_torch(obj):
    """``obj`` with every NumPy array replaced by a torch tensor over the same memory (dicts, lists
    and tuples followed); torch is imported only when there is an array."""
    if isinstance(obj, np.ndarray):
        import torch
        if obj.dtype == BFLOAT16:
            return torch.from_numpy(obj.view(np.int16)).view(torch_dtypes()["BF16"])
        return torch.from_numpy(obj)
    if isinstance(obj, dict):
        out = {k: as_torch(v) for k, v in obj.items()}
        return collections.OrderedDict(out) if isinstance(obj, collections.OrderedDict) else out
    if isinstance(obj, (list, tuple)) and not hasattr(obj, "_fields"):
        return type(obj)(as_torch(v) for v in obj)
    return obj

