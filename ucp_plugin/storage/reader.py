"""Reading a universal checkpoint: any fragment of any layout, fetching only the bytes it needs.

``Checkpoint.open(path)`` accepts a checkpoint folder (with ``ucp.json``) or a save folder with a
``latest`` file and reads its top manifest only. ``plan`` turns a ``plan.ReadItem`` into a
``plan.ReadPlan`` (reading just the shard indexes of its atom); ``execute`` carries it out: each
fetch read once with ``os.preadv`` (nothing is mapped: mapped pages would count in the process's
RSS on top of the destination), its chunks' SHA-256 checked (``verify=False`` skips it and reads
only the copied runs), large plans on a small thread pool. A plain copy is read straight into the
destination and its whole chunks are hashed there; partial chunks and strided or converting copies
go through a per-thread staging buffer. ``read_fragment`` is plan and execute in one call;
``plan_batch`` / ``execute_batch`` do a whole load's items at once.
"""
from __future__ import annotations

import contextlib
import hashlib
import math
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import numpy as np
import torch

from ..errors import FormatError, StateMismatchError
from ..format import DIGEST_BYTES, DIGESTS, MANIFEST, Atom, Manifest, Piece, Region
from ..plan import IDENTITY, TRANSPOSED, transposed_rects
from ..plan.reads import BatchPlan, Copy, Fetch, ReadItem, ReadPlan, plan_read
from .files import TensorFile, load_tree, raw_bytes, read_latest
from .folder import PinnedFolder


def resolve(path: str) -> str:
    """The checkpoint folder that ``path`` names (itself, or ``path/<latest>``)."""
    if not os.path.exists(path):
        raise FormatError(f"{path}: no such file or folder; pass a universal checkpoint folder")
    if not os.path.isdir(path):
        raise FormatError(f"{path}: is a file, not a folder; pass the checkpoint folder that holds "
                          f"{MANIFEST} (or its parent with 'latest')")
    if os.path.isfile(os.path.join(path, MANIFEST)):
        return path
    tag = read_latest(path)
    if tag is not None:
        inner = os.path.join(path, tag)
        if os.path.isfile(os.path.join(inner, MANIFEST)):
            return inner
        raise FormatError(f"{path}/latest names {tag!r}, but {inner} has no {MANIFEST}: that save never "
                          "committed; point 'latest' at a committed tag")
    if not os.listdir(path):
        raise FormatError(f"{path}: folder is empty; it holds no checkpoint")
    raise FormatError(f"{path}: no {MANIFEST} here, so this is not a committed universal checkpoint (an "
                      "interrupted save leaves such a folder); load a committed tag or its parent "
                      "folder with 'latest'")


READ_THREADS = int(os.environ.get("UCP_READ_THREADS", "4"))
PARALLEL_ELEMS = 1 << 22  # below ~16 MB of fp32 a thread pool costs more than it saves
BOUNCE_BYTES = 2 << 20  # per-thread staging buffer: a whole verification chunk fits (256 KiB of fp32)
PAGE = 4096  # unverified runs closer than this are read together: the OS reads whole pages anyway
_local = threading.local()


def _bounce(nbytes: int) -> torch.Tensor:
    """The first ``nbytes`` of this thread's staging buffer (allocated once per thread, reused); a
    new buffer when more is asked (chunks larger than ours, from another writer)."""
    if nbytes > BOUNCE_BYTES:
        return torch.empty(nbytes, dtype=torch.uint8)
    buf = getattr(_local, "bounce", None)
    if buf is None:
        buf = _local.bounce = torch.empty(BOUNCE_BYTES, dtype=torch.uint8)
    return buf[:nbytes]


class Clock:
    """Seconds spent reading, verifying and copying, summed over the pool's threads (a load's
    phases: ``benchmarks/load_bench.py --phases``)."""

    def __init__(self):
        self.seconds = dict.fromkeys(("read", "verify", "copy"), 0.0)
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def __call__(self, what: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            with self._lock:
                self.seconds[what] += time.perf_counter() - start


def _spans(copies: tuple[Copy, ...], gap: int) -> list[tuple[int, int]]:
    """Source element ranges the copies read, those less than ``gap`` elements apart joined."""
    starts = np.concatenate([c.src + np.arange(c.count, dtype=np.int64) * c.src_stride for c in copies])
    ends = starts + np.concatenate([np.full(c.count, c.length, dtype=np.int64) for c in copies])
    order = np.argsort(starts, kind="stable")
    starts, ends = starts[order], np.maximum.accumulate(ends[order])
    cut = np.flatnonzero(starts[1:] - ends[:-1] >= gap) + 1
    firsts, lasts = np.concatenate([[0], cut]), np.concatenate([cut - 1, [len(starts) - 1]])
    return list(zip(starts[firsts].tolist(), ends[lasts].tolist()))


@torch.no_grad()  # pool threads do not inherit the caller's grad mode; a load is never tracked
def _copy(c: Copy, src: torch.Tensor, dst: torch.Tensor) -> None:
    """One (strided) copy, converting dtype and device as ``copy_`` does."""
    if c.count == 1:
        dst[c.dst:c.dst + c.length].copy_(src[c.src:c.src + c.length])
        return
    if dst.stride(0) != 1 or src.stride(0) != 1:
        for i in range(c.count):
            dst[c.dst + i * c.dst_stride:][:c.length].copy_(src[c.src + i * c.src_stride:][:c.length])
        return
    d = dst.as_strided((c.count, c.length), (c.dst_stride, 1), dst.storage_offset() + c.dst)
    d.copy_(src.as_strided((c.count, c.length), (c.src_stride, 1), src.storage_offset() + c.src))


def _overlaps(atom: Atom, shard: tuple[int, int, int, int], item: ReadItem) -> bool:
    """Whether the pieces a shard index holds of ``atom`` (``Atom.shards`` entry) may hold elements
    of ``item``. Compares the outer rows and the split dimension's global positions each range
    touches (cheap, never a false "no"); the plan then takes exactly what overlaps."""
    _, r, lo, hi = shard
    region = atom.regions[r]
    if region == item.region:
        return lo < item.stop and item.start < hi
    if region.dim != item.region.dim:
        return True
    a, b = _extent(region, atom.shape, lo, hi), _extent(item.region, atom.shape, item.start, item.stop)
    return a[0] <= b[1] and b[0] <= a[1] and any(x0 < y1 and y0 < x1 for x0, x1 in a[2] for y0, y1 in b[2])


def _extent(region: Region, shape: tuple[int, ...], lo: int, hi: int) -> tuple[int, int, list]:
    """(first outer row, last outer row, global intervals along the split dim) that local elements
    [lo, hi) of ``region`` touch."""
    shape = tuple(shape) or (1,)
    inner = math.prod(shape[region.dim + 1:])
    length = region.local_shape(shape)[region.dim]
    row = max(length * inner, 1)
    first, last = lo // row, (hi - 1) // row
    p0, p1 = ((lo % row) // inner, ((hi - 1) % row) // inner + 1) if first == last else (0, length)
    touched, off = [], 0
    for a, b in region.intervals:
        s, e = max(p0, off), min(p1, off + b - a)
        if s < e:
            touched.append((a + s - off, a + e - off))
        off += b - a
    return first, last, touched


def _destination(out: torch.Tensor | None, n: int, dtype: torch.dtype, name: str) -> torch.Tensor:
    if out is None:
        return torch.empty(n, dtype=dtype)
    if out.dim() != 1 or out.numel() != n:
        raise ValueError(f"reading {name!r}: destination has shape {tuple(out.shape)}, expected ({n},)")
    return out


class Checkpoint:
    """A committed checkpoint opened for reading. ``top`` is its top manifest (layout, atom table,
    no pieces in format 1.1); ``atom(name)`` adds the atom's pieces, read from the shard indexes
    that hold them; ``manifest`` is the whole thing (every index read: for tools, not for loads)."""

    def __init__(self, folder: PinnedFolder, verify: bool = True):
        self.folder, self.path, self.top, self.verify = folder, folder.path, folder.top, verify
        self._atoms: dict[str, Atom] = {}
        self._manifest: Manifest | None = None
        self.bytes_read = 0
        self._count = threading.Lock()  # fetches of a batch run on a pool
        self.clock = Clock()

    @staticmethod
    def open(path: str, verify: bool = True) -> "Checkpoint":
        """Open a committed checkpoint: reads its top manifest and nothing else. The folder is pinned
        (``storage.folder``): a save that publishes a new checkpoint under the same tag later does
        not change what this object reads."""
        for _ in range(10):
            folder = PinnedFolder.open(resolve(path))
            if folder is not None:
                return Checkpoint(folder, verify)
        raise FormatError(f"{path}: the checkpoint kept changing while being opened (another job is "
                          "saving into it); retry when that save is done")

    @property
    def files_opened(self) -> list[str]:
        """Tensor files this reader has opened, in order."""
        return list(self.folder.files_opened)

    @property
    def metadata_bytes(self) -> int:
        """Bytes of metadata read: top manifest, shard indexes, tensor headers, chunk digests."""
        return self.folder.metadata_bytes

    @property
    def manifest(self) -> Manifest:
        """The whole manifest, every atom with its pieces and every file listed (reads every shard
        index of a 1.1 checkpoint)."""
        if self._manifest is None:
            if not self.top.indexed:
                self._manifest = self.top
            else:
                atoms = tuple(self.atom(a.name) for a in self.top.atoms)
                self._manifest = replace(self.top, atoms=atoms, files=self.folder.all_files(self.verify))
        return self._manifest

    def atom(self, name: str, item: ReadItem | None = None) -> Atom:
        """Atom ``name`` with its pieces; with ``item``, only the pieces of the shard indexes that
        may overlap it (format 1.1: the others are not read)."""
        key = name if item is None else item
        if key in self._atoms:
            return self._atoms[key]
        try:
            atom = self.top.atom(name)
        except KeyError:
            raise StateMismatchError(f"parameter {name!r} is not in checkpoint {self.path}; the model "
                                     "has a parameter the checkpoint lacks (a different model or "
                                     "config?)") from None
        if self.top.indexed:
            ranks = sorted({s[0] for s in atom.shards if item is None or _overlaps(atom, s, item)})
            pieces = [p for r in ranks for p in self.folder.index(r, self.verify).of(name)]
            atom = replace(atom, pieces=tuple(pieces))
        if item is None:
            self._atoms[key] = atom
        return atom

    def _handle(self, rel: str):
        return self.folder.tensors(rel)

    def close(self) -> None:
        self.folder.close()

    def read_fragment(self, name: str, state: str, region: Region, start: int, stop: int,
                      dtype: torch.dtype = torch.float32, order: str = IDENTITY,
                      out: torch.Tensor | None = None) -> torch.Tensor:
        """Local elements ``[start, stop)`` of ``region`` of atom ``name``'s ``state``, the local
        tensor taken in ``order`` (``plan.segments``: "transposed" for a GroupedMLP block). Padding
        elements (vocabulary padding) are zero. With ``out`` (1-D, ``stop - start`` elements, any
        dtype and device: typically a slice of the engine's own buffer) the elements are copied
        straight into it and it is returned; nothing else is allocated."""
        out = _destination(out, stop - start, dtype, name)
        if order == TRANSPOSED:
            return self._read_transposed(name, state, region, start, stop, out)
        if order != IDENTITY:
            raise ValueError(f"reading {name!r}: unknown local order {order!r}")
        return self.execute(self.plan(ReadItem(name, state, region, start, stop)), out)

    def plan(self, item: ReadItem) -> ReadPlan:
        """The read plan for ``item`` (reads the shard indexes naming its atom, no tensor bytes)."""
        return plan_read(self.atom(item.atom, item), item, self.verify, self.path)

    def execute(self, plan: ReadPlan, out: torch.Tensor | None = None,
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Fill ``out`` (1-D, the item's length; allocated in ``dtype`` when None) per ``plan``:
        each fetch read once, verified, copied straight into ``out`` (on its device)."""
        out = _destination(out, plan.item.numel, dtype, plan.item.atom)
        if plan.padded:
            out.zero_()  # padding elements belong to no atom element: zero, as documented
        if len(plan.replicas) == 1:
            self._run([(f, out) for f in plan.replicas[0]])
            return out
        acc = None
        for fetches in plan.replicas:
            part = torch.zeros_like(out)
            self._run([(f, part) for f in fetches])
            acc = self._combine(plan.item.atom, plan.reduce, acc, part)
        return out.copy_(acc / len(plan.replicas) if plan.reduce == "average" else acc)

    def plan_batch(self, items) -> BatchPlan:
        """The plans of every item of a load (reads the shard indexes naming their atoms)."""
        return BatchPlan(tuple(self.plan(i) for i in items))

    def execute_batch(self, plan: BatchPlan, outs) -> None:
        """Fill ``outs[i]`` (1-D, item ``i``'s length, any dtype/device) per ``plan.plans[i]``: the
        fetches of every single-replica plan go to one pool, largest first."""
        if len(outs) != len(plan.plans):
            raise ValueError(f"a batch plan of {len(plan.plans)} items needs as many destinations, got {len(outs)}")
        tasks = []
        for p, out in zip(plan.plans, outs):
            out = _destination(out, p.item.numel, out.dtype, p.item.atom)
            if len(p.replicas) != 1:
                self.execute(p, out)
                continue
            if p.padded:
                out.zero_()
            tasks += [(f, out) for f in p.replicas[0]]
        tasks.sort(key=lambda t: -t[0].elements)
        self._run(tasks)

    def _run(self, tasks: list) -> None:
        """Carry out (fetch, destination) pairs; large sets on a small pool (file reads, hashing and
        tensor copies release the GIL)."""
        if sum(f.elements for f, _ in tasks) >= PARALLEL_ELEMS and len(tasks) > 1:
            with ThreadPoolExecutor(min(READ_THREADS, len(tasks))) as pool:
                read = sum(pool.map(lambda t: self._fetch(*t), tasks))
        else:
            read = sum(self._fetch(f, out) for f, out in tasks)
        with self._count:
            self.bytes_read += read

    @torch.no_grad()  # pool threads do not inherit the caller's grad mode; a load is never tracked
    def _fetch(self, f: Fetch, out: torch.Tensor) -> int:
        """One fetch: read (and verify) its range, copy it out; returns the bytes read. A single
        plain copy into CPU memory of the stored dtype is read straight into the destination."""
        tf, dtype = self._file(f.piece)
        c = f.copies[0] if len(f.copies) == 1 else None
        if c is not None and c.count == 1 and out.device.type == "cpu" and out.dtype == dtype \
                and out.stride(0) == 1:
            return self._direct(tf, f, c.src + f.lo, out[c.dst:c.dst + c.length])
        return self._staged(tf, f, out, dtype)

    def _direct(self, tf: TensorFile, f: Fetch, s: int, dst: torch.Tensor) -> int:
        """Piece elements ``[s, s + len(dst))`` read into ``dst``. Verified: whole chunks inside the
        range are read in place and hashed there; a partial chunk at either end is read whole into
        the thread's bounce buffer, hashed, and its part copied."""
        piece, size, e = f.piece, dst.element_size(), s + dst.numel()
        if not f.verify:
            self._read(tf, piece.key, s * size, e * size, dst)
            return (e - s) * size
        c, n = piece.chunk_elems, piece.stop - piece.start
        k0, k1 = s // c, (e - 1) // c + 1
        digests, read, whole = self._digests(piece, k0, k1), 0, []
        for k in range(k0, k1):
            lo, hi = k * c, min((k + 1) * c, n)
            if s <= lo and hi <= e:
                whole.append(k)
                continue
            read += self._whole_chunks(tf, piece, whole, digests, k0, s, dst)
            whole = []
            buf = _bounce((hi - lo) * size)
            self._read(tf, piece.key, lo * size, hi * size, buf)
            self._check(piece, k, buf, digests[k - k0])
            a, b = max(lo, s), min(hi, e)
            with self.clock("copy"):
                dst[a - s:b - s].copy_(buf.view(dst.dtype)[a - lo:b - lo])
            read += (hi - lo) * size
        return read + self._whole_chunks(tf, piece, whole, digests, k0, s, dst)

    def _whole_chunks(self, tf: TensorFile, piece: Piece, ks: list, digests: list, k0: int, s: int,
                      dst: torch.Tensor) -> int:
        """Consecutive whole chunks ``ks`` read with one call straight into ``dst``, hashed in place."""
        if not ks:
            return 0
        c, n, size = piece.chunk_elems, piece.stop - piece.start, dst.element_size()
        lo, hi = ks[0] * c, min((ks[-1] + 1) * c, n)
        self._read(tf, piece.key, lo * size, hi * size, dst[lo - s:hi - s])
        raw = raw_bytes(dst[lo - s:hi - s])
        for k in ks:
            self._check(piece, k, raw[(k * c - lo) * size:(min((k + 1) * c, n) - lo) * size], digests[k - k0])
        return (hi - lo) * size

    def _staged(self, tf: TensorFile, f: Fetch, out: torch.Tensor, dtype: torch.dtype) -> int:
        """Strided copies, another dtype or device: the fetch read into a staging buffer (the bounce
        buffer when it fits), verified chunk by chunk, then copied out."""
        size, piece = dtype.itemsize, f.piece
        nbytes = (f.hi - f.lo) * size
        buf = _bounce(nbytes)
        if f.verify:
            self._read(tf, piece.key, f.lo * size, f.hi * size, buf)
            read = nbytes
            c = piece.chunk_elems
            k0 = f.lo // c
            k1 = k0 + -(-(f.hi - f.lo) // c)
            for k, digest in zip(range(k0, k1), self._digests(piece, k0, k1)):
                lo, hi = (k * c - f.lo) * size, min(((k + 1) * c - f.lo) * size, nbytes)
                self._check(piece, k, buf[lo:hi], digest)
        else:  # only the copied runs, those less than a page apart joined into one read
            read = 0
            for lo, hi in _spans(f.copies, PAGE // size):
                self._read(tf, piece.key, (f.lo + lo) * size, (f.lo + hi) * size, buf[lo * size:hi * size])
                read += (hi - lo) * size
        data = buf.view(dtype)
        with self.clock("copy"):
            for cp in f.copies:
                _copy(cp, data, out)
        return read

    def _read_transposed(self, name, state, region, start, stop, out: torch.Tensor) -> torch.Tensor:
        """Each rectangle of the range read in canonical order, scattered with one strided copy."""
        if not out.is_contiguous():
            raise ValueError(f"reading {name!r} transposed: the destination must be contiguous")
        for r in transposed_rects(region, self.atom(name).shape, start, stop):
            rect = self.read_fragment(name, state, r.region, r.start, r.stop, out.dtype)
            # as_strided's offset is absolute: ``out`` may be a slice of the engine's buffer
            at = out.storage_offset() + r.offset
            out.as_strided((r.cols, r.rows), (r.stride, 1), at).copy_(rect.view(r.rows, r.cols).t())
        return out

    @staticmethod
    def _combine(name, reduce, acc, part):
        if acc is None:
            return part.clone() if reduce == "average" else part
        if reduce == "check" and not torch.equal(acc, part):
            raise FormatError(f"replicated parameter {name!r}: tensor-parallel copies differ; load with "
                              "reduce='average' or 'first' in the model spec if that is expected")
        return acc + part if reduce == "average" else acc

    def _file(self, piece: Piece) -> tuple[TensorFile, torch.dtype]:
        """The open file holding ``piece``, and the piece's stored dtype (its size checked)."""
        tf = self._handle(piece.file)
        if tf.numel(piece.key) != piece.stop - piece.start:
            raise FormatError(f"{os.path.join(self.path, piece.file)}: {piece.key!r} holds "
                              f"{tf.numel(piece.key)} elements, the manifest says {piece.stop - piece.start}; "
                              "the file is from another checkpoint — re-save it")
        return tf, tf.dtype(piece.key)

    def _read(self, tf: TensorFile, key: str, byte_lo: int, byte_hi: int, dst) -> None:
        with self.clock("read"):
            tf.read_into(key, byte_lo, byte_hi, dst)

    def _check(self, piece: Piece, k: int, data, digest: bytes | None) -> None:
        """Chunk ``k`` of ``piece`` (its bytes, any buffer) against its recorded SHA-256."""
        with self.clock("verify"):
            ok = hashlib.sha256(raw_bytes(data) if torch.is_tensor(data) else data).digest() == digest
        if not ok:
            raise FormatError(f"{os.path.join(self.path, piece.file)}: {piece.key!r} chunk {k} fails "
                              "its SHA-256 check (the file was modified or damaged); restore the "
                              "file or re-save, or load with verify=False to skip checks")

    def _digests(self, piece: Piece, k0: int, k1: int) -> list[bytes | None]:
        """The recorded SHA-256 of chunks ``k0 .. k1 - 1`` of ``piece`` (None where none is
        recorded): inline (1.0) or from the shard's digest tensor (1.1: one read, counted as metadata)."""
        if piece.digest_at < 0:
            return [bytes.fromhex(piece.digests[k]) if k < len(piece.digests) else None for k in range(k0, k1)]
        tf = self._handle(piece.file)
        total = tf.numel(DIGESTS)
        lo, hi = min((piece.digest_at + k0) * DIGEST_BYTES, total), min((piece.digest_at + k1) * DIGEST_BYTES, total)
        table = bytearray(hi - lo)
        tf.read_into(DIGESTS, lo, hi, table)
        self.folder.count(hi - lo)
        got = [bytes(table[i:i + DIGEST_BYTES]) for i in range(0, hi - lo, DIGEST_BYTES)]
        return got + [None] * (k1 - k0 - len(got))

    def read_atom(self, name: str, state: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        atom = self.atom(name)
        dtype = dtype or getattr(torch, atom.states[state])
        region = Region.whole(atom.shape)
        return self.read_fragment(name, state, region, 0, atom.numel, dtype).reshape(atom.shape)

    def load_state(self, rank: int | None = None):
        stem = "common" if rank is None else f"rank-{rank:05d}"
        return load_tree(os.path.join(self.path, "state", stem))

    def has_state(self, rank: int | None = None) -> bool:
        stem = "common" if rank is None else f"rank-{rank:05d}"
        return os.path.isfile(os.path.join(self.path, "state", stem + ".json"))
