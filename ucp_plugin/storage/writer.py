"""Writing a universal checkpoint: each rank writes its own shard; rank 0 commits.

Protocol (framework adapters drive it through ``ucp_plugin.comm``):
1. rank 0 ``prepare_staging`` -> every rank gets the same staging folder (barrier in between);
2. each rank fills a ``ShardWriter`` and calls ``finish`` (shard file + its index, fsynced);
3. rank 0 ``commit``: merges the indexes' metadata (atoms, which ranks hold pieces of each, file
   sizes and SHA-256 the ranks computed while writing) into the top manifest, never reading a shard
   or state byte; writes it last (the commit marker), renames the staging folder to ``<tag>`` and
   moves ``latest``.
A crash at any point before the rename leaves the previous checkpoint and ``latest`` untouched.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import uuid
from dataclasses import replace

import torch

from ..errors import FormatError
from ..format import DIGESTS, FORMAT_VERSION, INDEX, MANIFEST, Atom, FileEntry, Manifest, Piece, Region, ShardIndex
from ..plan import IDENTITY, TRANSPOSED, transposed_rects
from . import faults
from .folder import in_use
from .stale import owner_suffix, sweep
from .files import CHUNK_ELEMS, atomic_write_text, fsync_path, save_tree, write_latest, write_tensors

MIN_CHUNK_ELEMS = 1 << 10


def chunk_size(numel: int) -> int:
    """Verification chunk for a piece: about an eighth of it, within [1 Ki, 64 Ki] elements, so a
    reader of part of a small piece does not have to fetch all of it to check what it reads."""
    return min(CHUNK_ELEMS, max(MIN_CHUNK_ELEMS, -(-numel // 8)))
SHARDS, INDEXES, STATE = "shards", "index", "state"


def staging_name(tag: str) -> str:
    """Hidden, unique, and naming its owner (rank 0's pid and host) so ``stale.sweep`` can tell a
    dead save's folder from a live one."""
    return f".{tag}.staging-{uuid.uuid4().hex[:8]}-{owner_suffix()}"


def prepare_staging(root: str, name: str) -> str:
    path = os.path.join(root, name)
    os.makedirs(os.path.join(path, SHARDS), exist_ok=True)
    os.makedirs(os.path.join(path, INDEXES), exist_ok=True)
    os.makedirs(os.path.join(path, STATE), exist_ok=True)
    return path


class ShardWriter:
    """Collects one rank's fragments and writes them as one safetensors file plus its index
    (``format.ShardIndex``). The chunk digests and the file's SHA-256 are computed from the bytes as
    ``finish`` writes them; state files written by ``save_state`` (before ``finish``) are listed
    in the index too."""

    def __init__(self, staging: str, rank: int):
        self.staging, self.rank = staging, rank
        self.file = f"{SHARDS}/rank-{rank:05d}.safetensors"
        self._tensors: dict[str, torch.Tensor] = {}
        self._pieces: list[tuple[str, Piece]] = []
        self._atoms: dict[str, Atom] = {}
        self._files: list[FileEntry] = []

    def add_atom(self, info: Atom) -> None:
        """Declare an atom this rank holds pieces of (its ``pieces`` are ignored: ``add`` makes them)."""
        old = self._atoms.get(info.name)
        if old is not None and old != info:
            raise FormatError(f"atom {info.name!r} described twice differently on rank {self.rank}")
        self._atoms[info.name] = info

    def add(self, atom: str, state: str, data: torch.Tensor, region: Region, start: int,
            replica: int = 0, order: str = IDENTITY) -> None:
        """Store ``data`` (flattened) as local elements ``[start, start + numel)`` of ``region``, in
        ``order``. A transposed range is stored as one piece per rectangle (``transposed_rects``) in
        the atom's canonical order, so readers never see the transposition; the atom must have been
        declared (``add_atom``) first, for its shape.

        A contiguous CPU tensor is held by reference, not copied: ``finish`` writes it as it is then.
        Both callers allow that: a synchronous save calls ``finish`` before the training runs again,
        and an asynchronous one adds the staging arena's views (``snapshot``), which no one changes
        until the save is over. A copy would be a second host copy of the rank's state per save."""
        flat = _held(data)
        key = f"{atom}/{state}/{replica}"
        if key in self._tensors:
            raise FormatError(f"rank {self.rank} wrote {atom!r} state {state!r} twice")
        if order == IDENTITY:
            self._piece(atom, state, key, flat, region, start, replica)
            return
        if order != TRANSPOSED:
            raise ValueError(f"rank {self.rank}: atom {atom!r} written in unknown order {order!r}")
        if atom not in self._atoms:
            raise FormatError(f"rank {self.rank}: atom {atom!r} written transposed before add_atom declared "
                              "its shape; call add_atom first")
        rects = transposed_rects(region, self._atoms[atom].shape, start, start + flat.numel())
        for i, r in enumerate(rects):
            rect = flat.new_empty(r.rows * r.cols)  # fresh, so contiguous with unit stride
            block = flat.as_strided((r.cols, r.rows), (r.stride, 1), flat.storage_offset() + r.offset)
            rect.view(r.rows, r.cols).copy_(block.t())
            self._piece(atom, state, key if i == 0 else f"{key}/{i}", rect, r.region, r.start, replica)

    def _piece(self, atom: str, state: str, key: str, flat: torch.Tensor, region: Region, start: int,
               replica: int) -> None:
        self._tensors[key] = flat
        chunk = chunk_size(flat.numel())
        self._pieces.append((atom, Piece(state, self.file, key, region, start, start + flat.numel(), replica,
                                         chunk)))

    def finish(self) -> None:
        faults.point("before_shard", self.rank)
        pieces = []
        if self._tensors:
            written = write_tensors(os.path.join(self.staging, self.file), self._tensors,
                                    {p.key: p.chunk_elems for _, p in self._pieces}, DIGESTS)
            self._files.insert(0, FileEntry(self.file, written.bytes, written.sha256, written.digest))
            at = _digest_offsets(self._tensors, written.digests)
            pieces = [(name, replace(p, digest_at=at[p.key])) for name, p in self._pieces]
        faults.point("after_shard", self.rank)
        index = ShardIndex(self.rank, tuple(replace(a, pieces=()) for a in self._atoms.values()), tuple(pieces),
                           tuple(self._files))
        atomic_write_text(os.path.join(self.staging, INDEX.format(rank=self.rank)), index.to_json())

    def save_state(self, obj, common: bool = False) -> None:
        stem = "common" if common else f"rank-{self.rank:05d}"
        for path, size, sha in save_tree(os.path.join(self.staging, STATE, stem), obj):
            self._files.append(FileEntry(os.path.relpath(path, self.staging), size, sha))


def _held(data: torch.Tensor) -> torch.Tensor:
    """``data`` flattened, as a contiguous CPU tensor: itself when it is one, else one copy."""
    flat = data.detach().reshape(-1)
    if flat.device.type == "cpu" and flat.is_contiguous():
        return flat
    return torch.empty(flat.numel(), dtype=flat.dtype).copy_(flat)


def _digest_offsets(tensors: dict, digests: dict) -> dict[str, int]:
    """Where each tensor's first chunk digest sits in the shard's digest tensor (tensor order)."""
    out, n = {}, 0
    for k in tensors:
        out[k] = n
        n += len(digests[k])
    return out


def _read_indexes(staging: str, world_size: int) -> list[tuple[ShardIndex, FileEntry]]:
    """Every rank's index and its file entry (hashed from the text read: metadata only)."""
    out = []
    for rank in range(world_size):
        rel = INDEX.format(rank=rank)
        path = os.path.join(staging, rel)
        if not os.path.exists(path):
            raise FormatError(f"{path}: rank {rank} did not finish writing; the save is not committed")
        with open(path, "rb") as f:
            data = f.read()
        index = ShardIndex.from_json(data.decode(), path)
        if index.rank != rank:
            raise FormatError(f"{path}: holds the index of rank {index.rank}; the staging folder is damaged")
        out.append((index, FileEntry(rel, len(data), hashlib.sha256(data).hexdigest())))
    return out


def merge_indexes(indexes: list[ShardIndex]) -> tuple[Atom, ...]:
    """The top manifest's atom table: each atom as its writers declared it (they must agree) with
    ``regions`` and ``shards``: which rank's index holds pieces of which part of it."""
    atoms: dict[str, Atom] = {}
    where: dict[str, dict[tuple[int, Region], list[int]]] = {}
    for index in indexes:
        for a in index.atoms:
            if atoms.setdefault(a.name, a) != a:
                raise FormatError(f"atom {a.name!r}: ranks disagree on its shape/split/states "
                                  f"(rank {index.rank}: {a}, before: {atoms[a.name]})")
        for name, p in index.pieces:
            span = where.setdefault(name, {}).setdefault((index.rank, p.region), [p.start, p.stop])
            span[0], span[1] = min(span[0], p.start), max(span[1], p.stop)
    missing = sorted(set(where) - set(atoms))
    if missing:
        raise FormatError(f"pieces for undeclared atoms {missing[:5]}")
    return tuple(_located(atoms[n], where.get(n, {})) for n in sorted(atoms))


def _located(atom: Atom, spans: dict) -> Atom:
    regions = list(dict.fromkeys(region for _, region in spans))
    number = {r: i for i, r in enumerate(regions)}
    shards = tuple((rank, number[region], lo, hi) for (rank, region), (lo, hi) in spans.items())
    return replace(atom, regions=tuple(regions), shards=shards)


def commit(root: str, staging: str, tag: str, world_size: int, header: Manifest,
           update_latest: bool = True) -> str:
    """Rank 0 only: complete ``header`` (writer, layout, family, iteration, model) with the atom
    table and the index files, write it (the commit marker) and publish ``<root>/<tag>``. Reads
    the ranks' index files only: its cost grows with the metadata, not with the data."""
    indexes = _read_indexes(staging, world_size)
    atoms = merge_indexes([i for i, _ in indexes])
    faults.point("before_manifest", 0)
    manifest = replace(header, atoms=atoms, files=tuple(f for _, f in indexes), state_ranks=world_size,
                       format_version=FORMAT_VERSION, index=INDEX)
    atomic_write_text(os.path.join(staging, MANIFEST), manifest.to_json())
    faults.point("after_manifest", 0)
    final = os.path.join(root, tag)
    _publish(staging, final)
    faults.point("before_latest", 0)
    if update_latest:
        write_latest(root, tag)
    sweep(root)
    return final


def _publish(staging: str, final: str) -> None:
    """Rename the committed staging folder to its tag; an older checkpoint under the same tag is
    moved aside first and removed once the new one is in place and no reader holds it."""
    old = None
    if os.path.exists(final):
        old = f"{final}.old-{uuid.uuid4().hex[:8]}"
        os.replace(final, old)
    os.replace(staging, final)
    fsync_path(os.path.dirname(final))
    if old and not in_use(old):  # a job still reading it keeps it until a later commit's sweep
        shutil.rmtree(old, ignore_errors=True)

