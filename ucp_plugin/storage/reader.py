"""Reading a universal checkpoint: any fragment of any layout, fetching only the bytes it needs.

``Checkpoint.open(path)`` accepts a checkpoint folder (with ``ucp.json``) or a save folder with a
``latest`` file. ``read_fragment`` fills one target fragment from whichever stored pieces overlap
it, reading for each piece only the chunk-aligned span that covers the overlap and verifying those
chunks' SHA-256 (``verify=False`` skips it).
"""
from __future__ import annotations

import hashlib
import os
import torch

from ..errors import FormatError, StateMismatchError
from ..format import MANIFEST, Atom, Manifest, Piece, Region
from ..language import split_from_json
from ..plan import IDENTITY, TRANSPOSED, apply, intersect, runs, transposed_rects
from .files import MappedTensors, load_tree, read_latest, tensor_bytes


def _inode(folder: str) -> int | None:
    try:
        return os.stat(folder).st_ino
    except FileNotFoundError:
        return None


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


class Checkpoint:
    def __init__(self, path: str, manifest: Manifest, verify: bool = True):
        self.path, self.manifest, self.verify = path, manifest, verify
        self._handles: dict[str, object] = {}
        self.bytes_read = 0

    @staticmethod
    def open(path: str, verify: bool = True) -> "Checkpoint":
        """Open a committed checkpoint and map all its tensor files at once. A save that publishes a
        new checkpoint under the same tag swaps the folder (a new inode); mapping the files while
        the folder is unchanged pins one consistent version even if it is replaced later."""
        for _ in range(10):
            folder = resolve(path)
            inode = os.stat(folder).st_ino
            where = os.path.join(folder, MANIFEST)
            with open(where) as f:
                manifest = Manifest.from_json(f.read(), where)
            ck = Checkpoint(folder, manifest, verify)
            try:
                for rel in sorted({p.file for a in manifest.atoms for p in a.pieces}):
                    ck._handle(rel)
            except FormatError:
                if _inode(folder) == inode:
                    raise
                continue
            if _inode(folder) == inode:
                return ck
        raise FormatError(f"{path}: the checkpoint kept changing while being opened (another job is "
                          "saving into it); retry when that save is done")

    def atom(self, name: str) -> Atom:
        try:
            return self.manifest.atom(name)
        except KeyError:
            raise StateMismatchError(f"parameter {name!r} is not in checkpoint {self.path}; the model "
                                     "has a parameter the checkpoint lacks (a different model or "
                                     "config?)") from None

    def _handle(self, rel: str):
        if rel not in self._handles:
            self._handles[rel] = MappedTensors(os.path.join(self.path, rel))
        return self._handles[rel]

    def close(self) -> None:
        self._handles.clear()

    def read_fragment(self, name: str, state: str, region: Region, start: int, stop: int,
                      dtype: torch.dtype = torch.float32, order: str = IDENTITY) -> torch.Tensor:
        """Local elements ``[start, stop)`` of ``region`` of atom ``name``'s ``state``, the local
        tensor taken in ``order`` (``plan.segments``: "transposed" for a GroupedMLP block). Padding
        elements (vocabulary padding) are zero."""
        if order == TRANSPOSED:
            return self._read_transposed(name, state, region, start, stop, dtype)
        if order != IDENTITY:
            raise ValueError(f"reading {name!r}: unknown local order {order!r}")
        atom = self.atom(name)
        if state not in atom.states:
            raise StateMismatchError(f"parameter {name!r} has no state {state!r} in {self.path} "
                                     f"(it has {sorted(atom.states)})")
        out = torch.zeros(stop - start, dtype=dtype)
        target = runs(region, atom.shape, start, stop)
        pieces = [p for p in atom.pieces if p.state == state]
        reduce = split_from_json(atom.split).reduce if atom.split.get("kind") == "replicated" else "first"
        replicas = sorted({p.replica for p in pieces}) if reduce != "first" else [0]
        filled = 0
        acc = None
        for replica in replicas:
            part = torch.zeros_like(out) if len(replicas) > 1 else out
            filled = self._fill(atom, [p for p in pieces if p.replica == replica], target, part)
            acc = self._combine(name, reduce, acc, part)
        if filled != target.total:
            raise FormatError(f"{self.path}: the pieces of {name!r} state {state!r} cover {filled} of the "
                              f"{target.total} elements asked for; the checkpoint is incomplete")
        if len(replicas) > 1:
            out.copy_(acc / len(replicas) if reduce == "average" else acc)
        return out

    def _read_transposed(self, name, state, region, start, stop, dtype) -> torch.Tensor:
        """Each rectangle of the range read in canonical order, scattered with one strided copy."""
        out = torch.zeros(stop - start, dtype=dtype)
        for r in transposed_rects(region, self.atom(name).shape, start, stop):
            rect = self.read_fragment(name, state, r.region, r.start, r.stop, dtype)
            out.as_strided((r.cols, r.rows), (r.stride, 1), r.offset).copy_(rect.view(r.rows, r.cols).t())
        return out

    @staticmethod
    def _combine(name, reduce, acc, part):
        if acc is None:
            return part.clone() if reduce == "average" else part
        if reduce == "check" and not torch.equal(acc, part):
            raise FormatError(f"replicated parameter {name!r}: tensor-parallel copies differ; load with "
                              "reduce='average' or 'first' in the model spec if that is expected")
        return acc + part if reduce == "average" else acc

    def _fill(self, atom: Atom, pieces: list[Piece], target, out: torch.Tensor) -> int:
        filled = 0
        for piece in pieces:
            plan = intersect(target, runs(piece.region, atom.shape, piece.start, piece.stop))
            if not len(plan):
                continue
            if self.verify:  # a chunk's hash covers the whole chunk: fetch every chunk a copy touches
                for lo, hi, part in plan.read_spans(piece.chunk_elems, piece.stop - piece.start):
                    apply(part, self._read(piece, lo, hi, out.dtype), out, src_base=lo)
            else:  # copy straight out of the mapping: exactly the elements needed are fetched
                data = self._view(piece)
                apply(plan, data, out)
                self.bytes_read += plan.total * data.element_size()
            filled += plan.total
        return filled

    def _view(self, piece: Piece) -> torch.Tensor:
        """The whole stored piece, a zero-copy view of the mapped file (nothing fetched yet)."""
        data = self._handle(piece.file).flat(piece.key)
        if data.numel() != piece.stop - piece.start:
            raise FormatError(f"{os.path.join(self.path, piece.file)}: {piece.key!r} holds {data.numel()} "
                              f"elements, the manifest says {piece.stop - piece.start}; the file is from "
                              "another checkpoint — re-save it")
        return data

    def _read(self, piece: Piece, lo: int, hi: int, dtype: torch.dtype) -> torch.Tensor:
        """Elements [lo, hi) of a piece, counted as fetched and, with ``verify``, checked."""
        data = self._view(piece)[lo:hi]
        self.bytes_read += data.numel() * data.element_size()
        if self.verify:
            self._check_chunks(piece, data, lo)
        return data.to(dtype)

    def _check_chunks(self, piece: Piece, data: torch.Tensor, lo: int) -> None:
        c = piece.chunk_elems
        for i in range(0, data.numel(), c):
            k = (lo + i) // c
            digest = hashlib.sha256(tensor_bytes(data[i:i + c])).hexdigest()
            if k >= len(piece.digests) or digest != piece.digests[k]:
                raise FormatError(f"{os.path.join(self.path, piece.file)}: {piece.key!r} chunk {k} fails "
                                  "its SHA-256 check (the file was modified or damaged); restore the "
                                  "file or re-save, or load with verify=False to skip checks")

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
