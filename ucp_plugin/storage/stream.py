"""A safetensors file written tensor by tensor (``StreamWriter``): the header is computed first from
the declared names, dtypes and shapes, then each tensor's bytes are appended, possibly in several
pieces, so a writer holds one piece at a time instead of every tensor (``safetensors.save_file``
needs them all in memory). The file is written under a temporary name and renamed when complete.
"""
from __future__ import annotations

import json
import os

import torch

from ..errors import FormatError
from ..format import dtype_name
from .files import DTYPE_CODES, tensor_bytes


class StreamWriter:
    """``with StreamWriter(path, [(name, dtype, shape), ...]) as w: w.write(piece) ...`` -- pieces in
    declaration order, each tensor's row-major bytes; ``close`` checks every byte was written."""

    def __init__(self, path: str, tensors: list[tuple[str, torch.dtype, tuple[int, ...]]],
                 metadata: dict[str, str] | None = None):
        self.path, self.tmp = path, path + ".partial"
        header, offset = {"__metadata__": dict(metadata or {"format": "pt"})}, 0
        for name, dtype, shape in tensors:
            size = dtype.itemsize
            for s in shape:
                size *= s
            header[name] = {"dtype": DTYPE_CODES[dtype_name(dtype)], "shape": list(shape),
                            "data_offsets": [offset, offset + size]}
            offset += size
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # safetensors aligns the data to 8 bytes
        self.total, self.written = offset, 0
        self._f = open(self.tmp, "wb")
        self._f.write(len(raw).to_bytes(8, "little") + raw)

    def write(self, piece: torch.Tensor) -> int:
        data = tensor_bytes(piece)
        self._f.write(data)
        self.written += data.nbytes
        return data.nbytes

    def close(self) -> None:
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        if self.written != self.total:
            raise FormatError(f"{self.path}: wrote {self.written} of {self.total} bytes; the writer's plan is wrong")
        os.replace(self.tmp, self.path)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *_):
        if exc_type is None:
            self.close()
        else:
            self._f.close()
            os.remove(self.tmp)
