"""Writing a universal checkpoint: each rank writes its own shard; rank 0 commits.

Protocol (framework adapters drive it through ``ucp_plugin.comm``):
1. rank 0 ``prepare_staging`` -> every rank gets the same staging folder (barrier in between);
2. each rank fills a ``ShardWriter`` and calls ``finish`` (shard file + its index, fsynced);
3. rank 0 ``commit``: merges the indexes into the manifest, writes it last (the commit marker),
   renames the staging folder to ``<tag>`` and moves ``latest``.
A crash at any point before the rename leaves the previous checkpoint and ``latest`` untouched.
"""
from __future__ import annotations

import glob
import json
import os
import shutil
import uuid
from dataclasses import asdict, replace

import torch

from ..errors import FormatError
from ..format import MANIFEST, Atom, FileEntry, Manifest, Piece, Region
from ..plan import IDENTITY, TRANSPOSED, transposed_rects
from . import faults
from .stale import owner_suffix, sweep
from .files import atomic_write_text, chunk_digests, fsync_dir, save_tensors, save_tree, sha256_file, \
    write_latest

CHUNK_ELEMS = 1 << 16  # 256 KiB of fp32: the largest read-verification unit
MIN_CHUNK_ELEMS = 1 << 10


def chunk_size(numel: int) -> int:
    """Verification chunk for a piece: about an eighth of it, within [1 Ki, 64 Ki] elements, so a
    reader of part of a small piece does not have to fetch all of it to check what it reads."""
    return min(CHUNK_ELEMS, max(MIN_CHUNK_ELEMS, -(-numel // 8)))
SHARDS, INDEX, STATE = "shards", "index", "state"


def staging_name(tag: str) -> str:
    """Hidden, unique, and naming its owner (rank 0's pid and host) so ``stale.sweep`` can tell a
    dead save's folder from a live one."""
    return f".{tag}.staging-{uuid.uuid4().hex[:8]}-{owner_suffix()}"


def prepare_staging(root: str, name: str) -> str:
    path = os.path.join(root, name)
    os.makedirs(os.path.join(path, SHARDS), exist_ok=True)
    os.makedirs(os.path.join(path, INDEX), exist_ok=True)
    os.makedirs(os.path.join(path, STATE), exist_ok=True)
    return path


class ShardWriter:
    """Collects one rank's fragments and writes them as one safetensors file plus a JSON index."""

    def __init__(self, staging: str, rank: int):
        self.staging, self.rank = staging, rank
        self.file = f"{SHARDS}/rank-{rank:05d}.safetensors"
        self._tensors: dict[str, torch.Tensor] = {}
        self._pieces: list[dict] = []
        self._atoms: dict[str, Atom] = {}

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
        declared (``add_atom``) first, for its shape."""
        flat = data.detach().reshape(-1).to("cpu", copy=True)
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
        self._pieces.append({"atom": atom, "piece": Piece(
            state, self.file, key, region, start, start + flat.numel(), replica, chunk,
            chunk_digests(flat, chunk))})

    def finish(self) -> None:
        faults.point("before_shard", self.rank)
        if self._tensors:
            save_tensors(os.path.join(self.staging, self.file), self._tensors)
        faults.point("after_shard", self.rank)
        index = {"rank": self.rank, "atoms": [asdict(replace(a, pieces=())) for a in self._atoms.values()],
                 "pieces": [{"atom": p["atom"], **asdict(p["piece"])} for p in self._pieces]}
        atomic_write_text(os.path.join(self.staging, INDEX, f"rank-{self.rank:05d}.json"), json.dumps(index))

    def save_state(self, obj, common: bool = False) -> None:
        stem = "common" if common else f"rank-{self.rank:05d}"
        save_tree(os.path.join(self.staging, STATE, stem), obj)


def _merge_indexes(staging: str, world_size: int) -> list[Atom]:
    atoms: dict[str, dict] = {}
    pieces: dict[str, list[Piece]] = {}
    for rank in range(world_size):
        path = os.path.join(staging, INDEX, f"rank-{rank:05d}.json")
        if not os.path.exists(path):
            raise FormatError(f"{path}: rank {rank} did not finish writing; the save is not committed")
        with open(path) as f:
            index = json.load(f)
        for a in index["atoms"]:
            if atoms.setdefault(a["name"], a) != a:
                raise FormatError(f"atom {a['name']!r}: ranks disagree on its shape/split/states "
                                  f"(rank {rank}: {a}, before: {atoms[a['name']]})")
        for p in index["pieces"]:
            name = p.pop("atom")
            region = Region(p["region"]["dim"], tuple(tuple(i) for i in p["region"]["intervals"]),
                            p["region"]["pad"])
            pieces.setdefault(name, []).append(Piece(**{**p, "region": region,
                                                        "digests": tuple(p["digests"])}))
    missing = sorted(set(pieces) - set(atoms))
    if missing:
        raise FormatError(f"pieces for undeclared atoms {missing[:5]}")
    return [Atom(a["name"], a["kind"], tuple(a["shape"]), a["split"], a["states"], a["scalars"],
                 tuple(sorted(pieces.get(a["name"], ()), key=lambda p: (p.state, p.replica, p.file))))
            for a in sorted(atoms.values(), key=lambda a: a["name"])]


def _file_entries(staging: str) -> tuple[FileEntry, ...]:
    entries = []
    for path in sorted(glob.glob(os.path.join(staging, "*", "*"))):
        rel = os.path.relpath(path, staging)
        entries.append(FileEntry(rel, os.path.getsize(path), sha256_file(path)))
    return tuple(entries)


def commit(root: str, staging: str, tag: str, world_size: int, header: Manifest,
           update_latest: bool = True) -> str:
    """Rank 0 only: complete ``header`` (writer, layout, family, iteration, model) with the ranks'
    atoms and the file list, write it (the commit marker) and publish ``<root>/<tag>``."""
    atoms = _merge_indexes(staging, world_size)
    faults.point("before_manifest", 0)
    manifest = replace(header, atoms=tuple(atoms), files=_file_entries(staging), state_ranks=world_size)
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
    moved aside first and removed only once the new one is in place."""
    old = None
    if os.path.exists(final):
        old = f"{final}.old-{uuid.uuid4().hex[:8]}"
        os.replace(final, old)
    os.replace(staging, final)
    fsync_dir(os.path.dirname(final))
    if old:
        shutil.rmtree(old, ignore_errors=True)

