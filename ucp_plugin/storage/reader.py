"""Reading a universal checkpoint: any fragment of any layout, fetching only the bytes it needs.

``Checkpoint.open(path)`` accepts a checkpoint folder (with ``ucp.json``) or a save folder with a
``latest`` file and reads its top manifest only. ``plan`` turns a ``plan.ReadItem`` into a
``plan.ReadPlan`` (reading just the shard indexes of its atom); ``execute`` carries it out: each
fetch read once from the memory-mapped shard, its chunks' SHA-256 checked (``verify=False`` skips
it and reads exactly the copied elements), copied straight into the destination, large plans on a
small thread pool. ``read_fragment`` is the two in one call.
"""
from __future__ import annotations

import hashlib
import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import torch

from ..errors import FormatError, StateMismatchError
from ..format import DIGEST_BYTES, DIGESTS, MANIFEST, Atom, Manifest, Piece, Region
from ..plan import IDENTITY, TRANSPOSED, transposed_rects
from ..plan.reads import Copy, Fetch, ReadItem, ReadPlan, plan_read
from .files import load_tree, read_latest, tensor_bytes
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
            self._run(plan.replicas[0], out)
            return out
        acc = None
        for fetches in plan.replicas:
            part = torch.zeros_like(out)
            self._run(fetches, part)
            acc = self._combine(plan.item.atom, plan.reduce, acc, part)
        return out.copy_(acc / len(plan.replicas) if plan.reduce == "average" else acc)

    def _run(self, fetches: tuple[Fetch, ...], out: torch.Tensor) -> None:
        big = sum(f.elements for f in fetches) >= PARALLEL_ELEMS and len(fetches) > 1
        if big:  # file reads, hashing and tensor copies release the GIL
            with ThreadPoolExecutor(min(READ_THREADS, len(fetches))) as pool:
                self.bytes_read += sum(pool.map(lambda f: self._fetch(f, out), fetches))
        else:
            self.bytes_read += sum(self._fetch(f, out) for f in fetches)

    def _fetch(self, f: Fetch, out: torch.Tensor) -> int:
        """One fetch: read (and verify) its range, copy it out; returns the bytes read."""
        data = self._view(f.piece)[f.lo:f.hi]
        if f.verify:
            self._check_chunks(f.piece, data, f.lo)
        for c in f.copies:
            _copy(c, data, out)
        return f.elements * data.element_size()

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

    def _view(self, piece: Piece) -> torch.Tensor:
        """The whole stored piece, a zero-copy view of the mapped file (nothing fetched yet)."""
        data = self._handle(piece.file).flat(piece.key)
        if data.numel() != piece.stop - piece.start:
            raise FormatError(f"{os.path.join(self.path, piece.file)}: {piece.key!r} holds {data.numel()} "
                              f"elements, the manifest says {piece.stop - piece.start}; the file is from "
                              "another checkpoint — re-save it")
        return data

    def _check_chunks(self, piece: Piece, data: torch.Tensor, lo: int) -> None:
        c = piece.chunk_elems
        for i in range(0, data.numel(), c):
            k = (lo + i) // c
            digest = hashlib.sha256(tensor_bytes(data[i:i + c])).digest()
            if digest != self._digest(piece, k):
                raise FormatError(f"{os.path.join(self.path, piece.file)}: {piece.key!r} chunk {k} fails "
                                  "its SHA-256 check (the file was modified or damaged); restore the "
                                  "file or re-save, or load with verify=False to skip checks")

    def _digest(self, piece: Piece, k: int) -> bytes | None:
        """The recorded SHA-256 of chunk ``k`` of ``piece``: inline (1.0) or from the shard's digest
        tensor (1.1, 32 bytes read and counted as metadata)."""
        if piece.digest_at < 0:
            return bytes.fromhex(piece.digests[k]) if k < len(piece.digests) else None
        table = self._handle(piece.file).flat(DIGESTS)
        at = (piece.digest_at + k) * DIGEST_BYTES
        if at + DIGEST_BYTES > table.numel():
            return None
        self.folder.count(DIGEST_BYTES)
        return table[at:at + DIGEST_BYTES].numpy().tobytes()

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
