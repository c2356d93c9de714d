"""Read plans: which stored bytes fill a rank's fragment, as values (no I/O, no process group).

A *read item* describes one thing a rank needs: elements ``[start, stop)`` of ``region``'s local
tensor of one atom state (``ReadItem``). ``plan_read`` turns it, with the atom's pieces (format
metadata), into a ``ReadPlan``: per replica, the ``Fetch``es — one element range of one stored piece
each, chunk-aligned when verified (a chunk's SHA-256 covers the whole chunk) — and, per fetch, the
``Copy``s out of it. A ``Copy`` is ``count`` equal runs at constant strides, so a row-parallel
weight resharded TP2 -> TP4 (one short run per row) is one strided copy per piece, not thousands.
Plans compare with ``==`` and print, so tests assert exact offsets; ``storage`` executes them.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import FormatError, StateMismatchError
from ..format import Atom, Piece, Region
from ..language import split_from_json
from .regions import CopyPlan, intersect, runs


@dataclass(frozen=True)
class ReadItem:
    """Elements ``[start, stop)`` of the local tensor ``region`` of ``atom``'s ``state``."""
    atom: str
    state: str
    region: Region
    start: int
    stop: int

    @property
    def numel(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class Copy:
    """``count`` runs of ``length`` elements: run i goes from fetched element
    ``src + i * src_stride`` (counted from the fetch's ``lo``) to item element ``dst + i * dst_stride``."""
    src: int
    dst: int
    length: int
    count: int = 1
    src_stride: int = 0
    dst_stride: int = 0

    @property
    def total(self) -> int:
        return self.length * self.count


@dataclass(frozen=True)
class Fetch:
    """Elements ``[lo, hi)`` of stored ``piece`` (verified chunk by chunk when ``verify``) and the
    copies out of them. Unverified fetches read only the copied elements."""
    piece: Piece
    lo: int
    hi: int
    verify: bool
    copies: tuple[Copy, ...]

    @property
    def elements(self) -> int:
        """Elements read from storage."""
        return self.hi - self.lo if self.verify else sum(c.total for c in self.copies)


@dataclass(frozen=True)
class ReadPlan:
    """How to fill ``item``: ``replicas`` holds one tuple of fetches per stored replica combined by
    ``reduce`` ("first": one replica, "check": all equal, "average"); ``padded``: the item has
    elements no atom element fills (vocabulary padding), which read as zero."""
    item: ReadItem
    replicas: tuple[tuple[Fetch, ...], ...]
    reduce: str
    padded: bool

    @property
    def files(self) -> tuple[str, ...]:
        return tuple(sorted({f.piece.file for fs in self.replicas for f in fs}))

    @property
    def elements(self) -> int:
        return sum(f.elements for fs in self.replicas for f in fs)


@dataclass(frozen=True)
class BatchPlan:
    """Every read of one rank's load at once: ``plans[i]`` fills destination ``i``. Executed as one
    pool of fetches (``storage.Checkpoint.execute_batch``), so a load of many small fragments still
    keeps the disk and the cores busy."""
    plans: tuple[ReadPlan, ...]

    @property
    def files(self) -> tuple[str, ...]:
        return tuple(sorted({f for p in self.plans for f in p.files}))

    @property
    def elements(self) -> int:
        return sum(p.elements for p in self.plans)


def plan_batch(atoms: dict[str, Atom], items, verify: bool = True, where: str = "checkpoint") -> BatchPlan:
    """The plans of ``items`` against ``atoms`` (name -> atom with its pieces loaded)."""
    missing = sorted({i.atom for i in items} - set(atoms))
    if missing:
        raise StateMismatchError(f"{where}: has no parameter {missing[0]!r} ({len(missing)} missing); the "
                                 "model has parameters the checkpoint lacks (a different model or config?)")
    return BatchPlan(tuple(plan_read(atoms[i.atom], i, verify, where) for i in items))


def plan_read(atom: Atom, item: ReadItem, verify: bool = True, where: str = "checkpoint") -> ReadPlan:
    """The plan that fills ``item`` from ``atom``'s pieces (``atom.pieces`` must be loaded)."""
    if item.state not in atom.states:
        raise StateMismatchError(f"parameter {atom.name!r} has no state {item.state!r} in {where} "
                                 f"(it has {sorted(atom.states)})")
    target = runs(item.region, atom.shape, item.start, item.stop)
    pieces = [p for p in atom.pieces if p.state == item.state]
    reduce = split_from_json(atom.split).reduce if atom.split.get("kind") == "replicated" else "first"
    replicas = sorted({p.replica for p in pieces}) if reduce != "first" else [0]
    planned = []
    for replica in replicas:
        fetches, filled = [], 0
        for piece in (p for p in pieces if p.replica == replica):
            cp = intersect(target, runs(piece.region, atom.shape, piece.start, piece.stop))
            if len(cp):
                filled += cp.total
                fetches += _fetches(piece, cp, verify)
        if filled != target.total:
            raise FormatError(f"{where}: the pieces of {atom.name!r} state {item.state!r} cover {filled} of "
                              f"the {target.total} elements asked for; the checkpoint is incomplete")
        planned.append(tuple(fetches))
    return ReadPlan(item, tuple(planned), reduce if len(planned) > 1 else "first", target.total != item.numel)


def _fetches(piece: Piece, cp: CopyPlan, verify: bool) -> list[Fetch]:
    if verify:
        return [Fetch(piece, lo, hi, True, strided(part, lo))
                for lo, hi, part in cp.read_spans(piece.chunk_elems, piece.stop - piece.start)]
    lo = int(cp.src.min())
    return [Fetch(piece, lo, int((cp.src + cp.length).max()), False, strided(cp, lo))]


def _joined(src: np.ndarray, dst: np.ndarray, n: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Runs that continue each other in source and destination alike, joined into one run each."""
    if len(n) < 2:
        return src, dst, n
    ends_s, ends_d = src[:-1] + n[:-1], dst[:-1] + n[:-1]
    starts = np.flatnonzero(np.concatenate([[True], (src[1:] != ends_s) | (dst[1:] != ends_d)]))
    return src[starts], dst[starts], np.add.reduceat(n, starts)


def strided(cp: CopyPlan, base: int = 0) -> tuple[Copy, ...]:
    """``cp``'s runs (sources counted from ``base``) as few ``Copy``s: runs that continue each other
    join into one longer run (one larger copy), then consecutive runs of equal length at constant
    source and destination steps merge into one strided copy."""
    src, dst, n = _joined(cp.src - base, cp.dst, cp.length)
    m = len(n)
    if m == 0:
        return ()
    ds, dd = np.diff(src), np.diff(dst)
    ok = (n[1:] == n[:-1]) & (ds > 0) & (dd > 0)  # a step that a strided copy can take
    # label each step by its (src step, dst step); a change of label or a bad step starts a new run
    change = np.ones(max(m - 1, 0), dtype=bool)
    if m > 2:
        change[1:] = (ds[1:] != ds[:-1]) | (dd[1:] != dd[:-1]) | ~ok[:-1]
    out, i = [], 0
    bad = np.flatnonzero(change | ~ok)  # steps that cannot continue the run before them
    for s in bad.tolist() + [m - 1]:
        if s < i:
            continue
        while i < s:  # elements before this run's first step that no run took: single copies
            out.append(Copy(int(src[i]), int(dst[i]), int(n[i])))
            i += 1
        if s == m - 1 or not ok[s]:
            continue
        k = int(np.searchsorted(bad, s + 1))
        e = int(bad[k]) if k < len(bad) else m - 1  # the run's steps are s .. e - 1
        out.append(Copy(int(src[s]), int(dst[s]), int(n[s]), e - s + 1, int(ds[s]), int(dd[s])))
        i = e + 1
    out += [Copy(int(src[k]), int(dst[k]), int(n[k])) for k in range(i, m)]
    return tuple(out)
