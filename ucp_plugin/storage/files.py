"""Durable file operations: atomic writes, fsync, hashing, tensor files, state trees, `latest`."""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass

import torch
from safetensors import safe_open

from ..errors import FormatError
from ..format import treecodec

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
    """A shard's ``"chunks"`` digest, re-derived from its bytes: every chunk of every tensor is
    hashed again and must equal the digest stored for it (else ``FormatError``), then the file's
    first bytes, header and stored digests are hashed, as ``write_tensors`` did."""
    tf = TensorFile(path)
    try:
        sizes = json.loads(tf.metadata[CHUNKS_META])
        last = tf.keys()[-1]  # the digest tensor
        again = b"".join(_chunk_digests(tf, key, chunk) for key, chunk in sizes)
        stored = bytes(tf.read(last).numpy())
        head = os.pread(tf.fileno(), tf.header_bytes, 0)
    except (ValueError, KeyError, TypeError) as e:
        raise FormatError(f"{path}: header without its chunk sizes ({e!r}); the file is damaged — "
                          "restore it or re-save") from None
    finally:
        tf.close()
    if stored != again:
        raise FormatError(f"{path}: a chunk's SHA-256 differs from the one stored in the file (the file "
                          "was modified or damaged); restore it or re-save")
    return hashlib.sha256(head + stored).hexdigest()


def _chunk_digests(tf: "TensorFile", key: str, chunk_elems: int) -> bytes:
    """The SHA-256 of each ``chunk_elems``-element chunk of tensor ``key``, read one chunk at a time."""
    step, total = chunk_elems * tf.dtype(key).itemsize, tf.numel(key) * tf.dtype(key).itemsize
    out = []
    for lo in range(0, max(total, 1), step):
        buf = bytearray(min(step, total - lo))
        tf.read_into(key, lo, lo + len(buf), buf)
        out.append(hashlib.sha256(buf).digest())
    return b"".join(out)


def tensor_bytes(t: torch.Tensor):
    """A uint8 view of a CPU tensor's bytes (any dtype, bf16 included): zero-copy when contiguous."""
    return raw_bytes(t.detach().contiguous())


def chunk_digests(t: torch.Tensor, chunk_elems: int) -> tuple[str, ...]:
    flat = t.reshape(-1)
    return tuple(hashlib.sha256(tensor_bytes(flat[i:i + chunk_elems])).hexdigest()
                 for i in range(0, max(flat.numel(), 1), chunk_elems))


_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64, "BOOL": torch.bool,
           "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
_NAMES = {v: k for k, v in _DTYPES.items()}


@dataclass(frozen=True)
class Written:
    """What ``write_tensors`` wrote: the file's size, its SHA-256 (of what ``digest`` names, as in
    ``format.FileEntry``) and per tensor its chunk digests (32 raw bytes each), all computed from the
    bytes as they were written."""
    bytes: int
    sha256: str
    digests: dict
    digest: str = "file"


CHUNKS_META = "ucp.chunk_elems"  # header metadata of a shard: [[key, chunk elements], ...] in digest order


def write_tensors(path: str, tensors: dict[str, torch.Tensor], chunks: dict[str, int] | None = None,
                  digest_key: str | None = None, sync: bool = True) -> Written:
    """Write a safetensors file, fsynced, hashing every byte as it is written (never re-read): for
    each key in ``chunks``, the SHA-256 of its consecutive ``chunks[key]``-element chunks. Without
    ``digest_key`` the file's SHA-256 is of all its bytes. With ``digest_key`` the chunk digests are
    stored in the same file as a last uint8 tensor of that name, every tensor must be chunked, and
    the file's SHA-256 is of its first bytes, header and digest tensor (``digest="chunks"``): each
    byte is hashed once. ``sync=False`` leaves the fsync to the caller (``fsync_path``)."""
    chunks = chunks or {}
    flats = {k: v.detach().reshape(-1).contiguous() for k, v in tensors.items()}
    if digest_key and set(chunks) != set(flats):
        raise ValueError(f"{path}: with a digest tensor every tensor needs a chunk size")
    text = _header(flats, chunks, digest_key)
    whole, digests = hashlib.sha256(), {}
    with open(path, "wb") as f:
        for part in (len(text).to_bytes(8, "little"), text):
            f.write(part)
            whole.update(part)
        for k, t in flats.items():
            digests[k] = _write_hashed(f, None if digest_key else whole, tensor_bytes(t),
                                       chunks.get(k, 0) * t.element_size())
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
    n_digests = sum(_n_chunks(flats[k].numel(), c) for k, c in chunks.items())
    layout = [(k, _NAMES[t.dtype], t.numel(), t.numel() * t.element_size()) for k, t in flats.items()]
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
    An empty tensor has one chunk (the digest of no bytes), as ``chunk_digests`` counts."""
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


def save_tensors(path: str, tensors: dict[str, torch.Tensor]) -> Written:
    """safetensors file, fsynced; returns its size and SHA-256 (computed while writing)."""
    return write_tensors(path, tensors)


def open_tensors(path: str):
    """``safe_open`` with errors that name the file (truncated, not safetensors, missing)."""
    if not os.path.isfile(path):
        raise FormatError(f"{path}: tensor file is missing; the checkpoint is incomplete — re-save it or "
                          "restore the file")
    try:
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
    def _entry(key: str, info: dict, data_bytes: int) -> tuple[torch.dtype, int, int]:
        dtype = _DTYPES[info["dtype"]]
        begin, end = (int(x) for x in info["data_offsets"])
        numel = 1
        for d in info["shape"]:
            numel *= int(d)
        if not 0 <= begin <= end <= data_bytes or end - begin != numel * dtype.itemsize:
            raise ValueError(f"tensor {key!r} lies outside the file or has the wrong size")
        return dtype, begin, end

    def keys(self) -> list[str]:
        """The tensors' names, in the order their bytes lie in the file."""
        return sorted(self._entries, key=lambda k: self._entries[k][1])

    def fileno(self) -> int:
        return self._fd

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown: nothing left to release
            pass

    def _info(self, key: str) -> tuple[torch.dtype, int, int]:
        if key not in self._entries:
            raise FormatError(f"{self.path}: has no tensor {key!r}; the file is corrupt or from another "
                              "checkpoint — re-save it")
        return self._entries[key]

    def dtype(self, key: str) -> torch.dtype:
        return self._info(key)[0]

    def numel(self, key: str) -> int:
        dtype, begin, end = self._info(key)
        return (end - begin) // dtype.itemsize

    def offset(self, key: str) -> int:
        """Where tensor ``key``'s bytes begin in the file."""
        return self._base + self._info(key)[1]

    def read_into(self, key: str, byte_lo: int, byte_hi: int, dst) -> None:
        """Bytes ``[byte_lo, byte_hi)`` of tensor ``key`` into ``dst``: a contiguous CPU tensor of
        exactly that many bytes (any dtype), or a writable buffer such as a ``memoryview``."""
        _, begin, end = self._info(key)
        if not 0 <= byte_lo <= byte_hi <= end - begin:
            raise ValueError(f"{self.path}: bytes [{byte_lo}, {byte_hi}) lie outside tensor {key!r}")
        view = memoryview(raw_bytes(dst) if torch.is_tensor(dst) else dst).cast("B")
        if len(view) != byte_hi - byte_lo:
            raise ValueError(f"{self.path}: reading {byte_hi - byte_lo} bytes of {key!r} into {len(view)}")
        at, done = self._base + begin + byte_lo, 0
        while done < len(view):  # preadv may return short counts (signals, large reads)
            n = os.preadv(self._fd, [view[done:]], at + done)
            if n <= 0:
                raise FormatError(f"{self.path}: ends inside tensor {key!r}; the file is truncated — "
                                  "restore it or re-save the checkpoint")
            done += n

    def read(self, key: str) -> torch.Tensor:
        """Tensor ``key``, whole and flat, in a new tensor."""
        out = torch.empty(self.numel(key), dtype=self.dtype(key))
        self.read_into(key, 0, out.numel() * out.element_size(), out)
        return out


def raw_bytes(t: torch.Tensor):
    """A writable uint8 NumPy view of contiguous CPU tensor ``t``'s memory (any dtype)."""
    if not t.is_contiguous() or t.device.type != "cpu":
        raise ValueError(f"the bytes of a tensor of shape {tuple(t.shape)} on {t.device}: only a "
                         "contiguous CPU tensor is read or written in place")
    return t.detach().reshape(-1).view(torch.uint8).numpy()


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
