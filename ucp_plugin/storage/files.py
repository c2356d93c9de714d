"""Durable file operations: atomic writes, fsync, hashing, tensor files, state trees, `latest`.

torch is imported only where a torch tensor is made or taken apart: the bytes of a file are written
and read from NumPy arrays or buffers, so that ``ucp convert`` of a native DeepSpeed checkpoint,
which never builds a torch tensor, runs without importing torch (over a second of a two-second
conversion; docs/BENCHMARKS.md).
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
from dataclasses import dataclass

import numpy as np

from ..errors import FormatError
from ..format import dtype_name, treecodec
from ..format.treecodec import is_tensor

LATEST = "latest"


def fsync_path(path: str) -> None:
    """Make a folder's entries, or a file written with ``write_tensors(..., sync=False)``, durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: str, text: str) -> None:
    """Write ``text`` so that readers see either the old file or the whole new one."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_path(os.path.dirname(os.path.abspath(path)))


def sha256_file(path: str, block: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def file_sha256(path: str, digest: str) -> str:
    """The SHA-256 a ``format.FileEntry`` with this ``digest`` lists for the file at ``path``."""
    return sha256_file(path) if digest == "file" else chunks_sha256(path)


def chunks_sha256(path: str) -> str:
    """A shard's ``"chunks"`` digest, re-derived from its bytes (``stored_digests``)."""
    with TensorFile(path) as tf:
        return stored_digests(tf)[0]


def stored_digests(tf: "TensorFile") -> tuple[str, dict[str, list[bytes]]]:
    """An open file written with a digest tensor: its ``"chunks"`` SHA-256 and per tensor its chunk
    digests. Every chunk of every tensor is hashed again and must equal the digest stored for it
    (else ``FormatError``), then the file's first bytes, header and stored digests are hashed, as
    ``write_tensors`` did."""
    try:
        sizes = json.loads(tf.metadata[CHUNKS_META])
        last = tf.keys()[-1]  # the digest tensor
        again = {key: _chunk_digests(tf, key, chunk) for key, chunk in sizes}
        stored = bytearray(tf.numel(last))
        tf.read_into(last, 0, len(stored), stored)
        head = os.pread(tf.fileno(), tf.header_bytes, 0)
    except (ValueError, KeyError, TypeError) as e:
        raise FormatError(f"{tf.path}: header without its chunk sizes ({e!r}); the file is damaged — "
                          "restore it or re-save") from None
    if stored != b"".join(b"".join(d) for d in again.values()):
        raise FormatError(f"{tf.path}: a chunk's SHA-256 differs from the one stored in the file (the file "
                          "was modified or damaged); restore it or re-save")
    return hashlib.sha256(head + bytes(stored)).hexdigest(), again


def _chunk_digests(tf: "TensorFile", key: str, chunk_elems: int) -> list[bytes]:
    """The SHA-256 of each ``chunk_elems``-element chunk of tensor ``key``, read one chunk at a time."""
    step, total = chunk_elems * tf.itemsize(key), tf.numel(key) * tf.itemsize(key)
    out = []
    for lo in range(0, max(total, 1), step):
        buf = bytearray(min(step, total - lo))
        tf.read_into(key, lo, lo + len(buf), buf)
        out.append(hashlib.sha256(buf).digest())
    return out


def tensor_bytes(t):
    """A uint8 view of a CPU tensor's bytes (any dtype, bf16 included): zero-copy when contiguous."""
    return raw_bytes(t.detach().contiguous())


# safetensors dtype codes: the dtype's name (torch's and the manifest's) and its size in bytes
DTYPE_NAMES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
               "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "U16": "uint16", "U32": "uint32",
               "U64": "uint64", "BOOL": "bool", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}
ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "U16": 2,
            "U32": 4, "U64": 8, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
DTYPE_CODES = {name: code for code, name in DTYPE_NAMES.items()}
# NumPy has no bfloat16: its values travel as opaque 2-byte items, which copy and slice exactly
BFLOAT16 = np.dtype([("bfloat16", "<u2")])


def numpy_dtype(name: str) -> np.dtype:
    """The NumPy dtype that holds a manifest dtype's bytes (``BFLOAT16`` for bfloat16)."""
    return BFLOAT16 if name == "bfloat16" else np.dtype(name)


def array_dtype_name(a: np.ndarray) -> str:
    """The manifest's dtype name of a NumPy array (``BFLOAT16`` arrays are bfloat16)."""
    return "bfloat16" if a.dtype == BFLOAT16 else a.dtype.name


@functools.cache
def torch_dtypes() -> dict:
    """safetensors dtype code -> torch dtype."""
    import torch
    return {code: getattr(torch, name) for code, name in DTYPE_NAMES.items()}


def _flat(t) -> tuple[str, int, memoryview]:
    """A torch tensor or NumPy array as (safetensors dtype code, elements, its bytes, row-major)."""
    if is_tensor(t):
        t = t.detach().reshape(-1).contiguous()
        return DTYPE_CODES[dtype_name(t.dtype)], t.numel(), memoryview(raw_bytes(t))
    a = np.ascontiguousarray(t).reshape(-1)
    return DTYPE_CODES[array_dtype_name(a)], a.size, memoryview(a.view(np.uint8))


@dataclass(frozen=True)
class Written:
    """What ``write_tensors`` wrote: the file's size, its SHA-256 (of what ``digest`` names, as in
    ``format.FileEntry``) and per tensor its chunk digests (32 raw bytes each), all computed from the
    bytes as they were written."""
    bytes: int
    sha256: str
    digests: dict
    digest: str = "file"


CHUNK_ELEMS = 1 << 16  # 256 KiB of fp32: the largest read-verification unit
CHUNKS_META = "ucp.chunk_elems"  # header metadata of a shard: [[key, chunk elements], ...] in digest order


def write_tensors(path: str, tensors: dict, chunks: dict[str, int] | None = None,
                  digest_key: str | None = None, sync: bool = True) -> Written:
    """Write a safetensors file of torch tensors or NumPy arrays, fsynced, hashing every byte as it
    is written (never re-read): for each key in ``chunks``, the SHA-256 of its consecutive
    ``chunks[key]``-element chunks. Without ``digest_key`` the file's SHA-256 is of all its bytes.
    With ``digest_key`` the chunk digests are stored in the same file as a last uint8 tensor of that
    name, every tensor must be chunked, and the file's SHA-256 is of its first bytes, header and
    digest tensor (``digest="chunks"``): each byte is hashed once. ``sync=False`` leaves the fsync
    to the caller (``fsync_path``)."""
    chunks = chunks or {}
    flats = {k: _flat(v) for k, v in tensors.items()}
    if digest_key and set(chunks) != set(flats):
        raise ValueError(f"{path}: with a digest tensor every tensor needs a chunk size")
    text = _header(flats, chunks, digest_key)
    whole, digests = hashlib.sha256(), {}
    with open(path, "wb") as f:
        for part in (len(text).to_bytes(8, "little"), text):
            f.write(part)
            whole.update(part)
        for k, (code, _, data) in flats.items():
            digests[k] = _write_hashed(f, None if digest_key else whole, data, chunks.get(k, 0) * ITEMSIZE[code])
        if digest_key:
            _write_hashed(f, whole, b"".join(d for k in flats for d in digests[k]), 0)
        f.flush()
        if sync:
            os.fsync(f.fileno())
        size = f.tell()
    return Written(size, whole.hexdigest(), digests, "chunks" if digest_key else "file")


def _header(flats: dict, chunks: dict, digest_key: str | None) -> bytes:
    """The safetensors header, padded to 8 bytes; a shard's also names its chunk sizes, so that
    ``chunks_sha256`` can re-derive its digest from the file alone."""
    n_digests = sum(_n_chunks(flats[k][1], c) for k, c in chunks.items())
    layout = [(k, code, numel, len(data)) for k, (code, numel, data) in flats.items()]
    header, offset = {}, 0
    if digest_key:
        layout.append((digest_key, "U8", 32 * n_digests, 32 * n_digests))
        header["__metadata__"] = {CHUNKS_META: json.dumps([[k, chunks[k]] for k in flats])}
    for k, dtype, numel, n in layout:
        header[k] = {"dtype": dtype, "shape": [numel], "data_offsets": [offset, offset + n]}
        offset += n
    text = json.dumps(header, separators=(",", ":")).encode()
    return text + b" " * (-len(text) % 8)


def _n_chunks(numel: int, chunk: int) -> int:
    return max(1, -(-numel // chunk))


def _write_hashed(f, whole, data, chunk_bytes: int) -> list[bytes]:
    """Write ``data``; SHA-256 of each ``chunk_bytes`` chunk (none when 0); ``whole`` (a running
    SHA-256 of the file, or None) takes the bytes too.
    An empty tensor has one chunk (the digest of no bytes)."""
    step = chunk_bytes or (1 << 24)
    out = []
    for i in range(0, max(len(data), 1), step):
        part = data[i:i + step]
        f.write(part)
        if whole is not None:
            whole.update(part)
        if chunk_bytes:
            out.append(hashlib.sha256(part).digest())
    return out


def save_tensors(path: str, tensors: dict) -> Written:
    """safetensors file, fsynced; returns its size and SHA-256 (computed while writing)."""
    return write_tensors(path, tensors)


def open_tensors(path: str):
    """``safe_open`` with errors that name the file (truncated, not safetensors, missing)."""
    if not os.path.isfile(path):
        raise FormatError(f"{path}: tensor file is missing; the checkpoint is incomplete — re-save it or "
                          "restore the file")
    try:
        from safetensors import safe_open
        return safe_open(path, framework="pt")
    except Exception as e:  # safetensors raises its own error types; all mean "corrupt"
        raise FormatError(f"{path}: not a readable safetensors file ({e}); the file is truncated or "
                          "corrupt — re-save the checkpoint") from None


class TensorFile:
    """A safetensors file open for reading: the header parsed and checked once (dtypes, bounds,
    sizes), then byte ranges of one tensor read with ``os.preadv`` straight into the caller's memory.
    Nothing is mapped: a mapped page a load touches counts in the process's RSS on top of the engine
    buffer it is copied into. The open descriptor keeps the file's inode alive even if the folder is
    replaced later; ``preadv`` takes its own offset, so threads share the descriptor."""

    def __init__(self, path: str, dir_fd: int | None = None):
        """``path`` relative to the folder open as ``dir_fd`` when given (a pinned folder)."""
        try:
            self._fd = os.open(path, os.O_RDONLY, dir_fd=dir_fd)
        except FileNotFoundError:
            raise FormatError(f"{path}: tensor file is missing; the checkpoint is incomplete — re-save it or "
                              "restore the file") from None
        try:
            self._parse(path)
        except BaseException:
            self.close()
            raise

    def _parse(self, path: str) -> None:
        self.path, size = path, os.fstat(self._fd).st_size
        try:
            n = int.from_bytes(os.pread(self._fd, 8, 0), "little")
            if not 0 < n <= size - 8:
                raise ValueError(f"header length {n} does not fit the file's {size} bytes")
            header = json.loads(os.pread(self._fd, n, 8))
            self.metadata = header.pop("__metadata__", None) or {}
            self._entries = {k: self._entry(k, v, size - 8 - n) for k, v in header.items()}
        except (ValueError, KeyError, TypeError) as e:
            raise FormatError(f"{path}: not a readable safetensors file ({e}); the file is truncated or "
                              "corrupt — re-save the checkpoint") from None
        self.header_bytes = self._base = 8 + n

    @staticmethod
    def _entry(key: str, info: dict, data_bytes: int) -> tuple[str, int, int]:
        code = info["dtype"]
        begin, end = (int(x) for x in info["data_offsets"])
        numel = 1
        for d in info["shape"]:
            numel *= int(d)
        if not 0 <= begin <= end <= data_bytes or end - begin != numel * ITEMSIZE[code]:
            raise ValueError(f"tensor {key!r} lies outside the file or has the wrong size")
        return code, begin, end

    def keys(self) -> list[str]:
        """The tensors' names, in the order their bytes lie in the file."""
        return sorted(self._entries, key=lambda k: self._entries[k][1])

    def fileno(self) -> int:
        return self._fd

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "TensorFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown: nothing left to release
            pass

    def _info(self, key: str) -> tuple[str, int, int]:
        if key not in self._entries:
            raise FormatError(f"{self.path}: has no tensor {key!r}; the file is corrupt or from another "
                              "checkpoint — re-save it")
        return self._entries[key]

    def dtype(self, key: str):
        """Tensor ``key``'s torch dtype."""
        return torch_dtypes()[self._info(key)[0]]

    def dtype_name(self, key: str) -> str:
        return DTYPE_NAMES[self._info(key)[0]]

    def itemsize(self, key: str) -> int:
        return ITEMSIZE[self._info(key)[0]]

    def numel(self, key: str) -> int:
        code, begin, end = self._info(key)
        return (end - begin) // ITEMSIZE[code]

    def offset(self, key: str) -> int:
        """Where tensor ``key``'s bytes begin in the file."""
        return self._base + self._info(key)[1]

    def read_into(self, key: str, byte_lo: int, byte_hi: int, dst) -> None:
        """Bytes ``[byte_lo, byte_hi)`` of tensor ``key`` into ``dst``: a contiguous CPU tensor of
        exactly that many bytes (any dtype), or a writable buffer such as a ``memoryview``."""
        _, begin, end = self._info(key)
        if not 0 <= byte_lo <= byte_hi <= end - begin:
            raise ValueError(f"{self.path}: bytes [{byte_lo}, {byte_hi}) lie outside tensor {key!r}")
        view = memoryview(raw_bytes(dst) if is_tensor(dst) else dst).cast("B")
        if len(view) != byte_hi - byte_lo:
            raise ValueError(f"{self.path}: reading {byte_hi - byte_lo} bytes of {key!r} into {len(view)}")
        at, done = self._base + begin + byte_lo, 0
        while done < len(view):  # preadv may return short counts (signals, large reads)
            n = os.preadv(self._fd, [view[done:]], at + done)
            if n <= 0:
                raise FormatError(f"{self.path}: ends inside tensor {key!r}; the file is truncated — "
                                  "restore it or re-save the checkpoint")
            done += n

    def read(self, key: str):
        """Tensor ``key``, whole and flat, in a new torch tensor."""
        import torch
        out = torch.empty(self.numel(key), dtype=self.dtype(key))
        self.read_into(key, 0, out.numel() * out.element_size(), out)
        return out


def raw_bytes(t):
    """A writable uint8 NumPy view of contiguous CPU tensor ``t``'s memory (any dtype)."""
    if not t.is_contiguous() or t.device.type != "cpu":
        raise ValueError(f"the bytes of a tensor of shape {tuple(t.shape)} on {t.device}: only a "
                         "contiguous CPU tensor is read or written in place")
    return t.detach().reshape(-1).view(torch_dtypes()["U8"]).numpy()


def save_tree(stem: str, obj) -> list[tuple[str, int, str]]:
    """Write a state tree as ``stem.json`` (+ ``stem.safetensors`` if it holds tensors); returns
    (path, bytes, sha256) of each file written, hashed as written."""
    tree, tensors = treecodec.encode(obj, where=os.path.basename(stem))
    written = []
    if tensors:
        w = save_tensors(stem + ".safetensors", tensors)
        written.append((stem + ".safetensors", w.bytes, w.sha256))
    text = json.dumps(tree)
    atomic_write_text(stem + ".json", text)
    data = text.encode()
    return written + [(stem + ".json", len(data), hashlib.sha256(data).hexdigest())]


def load_tree(stem: str):
    if not os.path.isfile(stem + ".json"):
        raise FormatError(f"{stem}.json: training-state file is missing; the checkpoint is incomplete")
    with open(stem + ".json") as f:
        try:
            tree = json.load(f)
        except json.JSONDecodeError as e:
            raise FormatError(f"{stem}.json: not valid JSON ({e}); the file is corrupt") from None
    tensors = {}
    if os.path.exists(stem + ".safetensors"):
        with open_tensors(stem + ".safetensors") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    return treecodec.decode(tree, tensors, where=stem + ".json")


def read_latest(root: str) -> str | None:
    path = os.path.join(root, LATEST)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return f.read().strip() or None


def write_latest(root: str, tag: str) -> None:
    atomic_write_text(os.path.join(root, LATEST), tag)
