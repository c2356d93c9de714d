"""Exact element maps between fragments and atoms: pure functions, no process group.

A rank's *local tensor* of a parameter is a ``Region`` of the atom (``region_for``). A *fragment* is
the flat range ``[start, stop)`` of that local tensor. ``runs`` turns a fragment into ``Runs``:
contiguous stretches ``(glob, local, length)`` where atom-flat index ``glob + i`` is fragment element
``local + i``. Two fragments' runs intersect into a ``CopyPlan`` of (src offset, dst offset, length)
triples, which is all a reader needs to move bytes from any stored piece into any target fragment.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import singledispatch

import numpy as np

from ..format import Region
from ..language import Fused, Partitioned, Replicated, Split, VocabPartitioned


@dataclass(frozen=True)
class Runs:
    glob: np.ndarray
    local: np.ndarray
    length: np.ndarray

    @property
    def total(self) -> int:
        return int(self.length.sum())


@dataclass(frozen=True)
class CopyPlan:
    src: np.ndarray
    dst: np.ndarray
    length: np.ndarray

    def __len__(self) -> int:
        return len(self.length)

    @property
    def total(self) -> int:
        return int(self.length.sum())

    def read_spans(self, align: int, size: int) -> list[tuple[int, int, "CopyPlan"]]:
        """Source ranges to fetch, aligned to ``align``-element chunks (the unit a reader verifies)
        and clipped to ``size``: chunks no copy touches are skipped, so a reader fetches at most
        one partial chunk per end of each span beyond what it needs."""
        order = np.argsort(self.src, kind="stable")
        src, dst, n = self.src[order], self.dst[order], self.length[order]
        first_chunk, last_chunk = src // align, (src + n - 1) // align
        # a new span starts where a copy begins beyond the chunk the previous copies ended in
        breaks = np.nonzero(first_chunk[1:] > np.maximum.accumulate(last_chunk)[:-1] + 1)[0] + 1
        spans = []
        for idx in np.split(np.arange(len(src)), breaks):
            lo = int(first_chunk[idx[0]]) * align
            hi = min(int(last_chunk[idx].max() + 1) * align, size)
            spans.append((lo, hi, CopyPlan(src[idx], dst[idx], n[idx])))
        return spans


def _norm_dim(dim: int, ndim: int) -> int:
    return dim % max(ndim, 1)


@singledispatch
def region_for(split: Split, shape: tuple[int, ...], tp_rank: int, tp: int) -> Region:
    """The region of a parameter's atom held by TP rank ``tp_rank`` of ``tp``."""
    raise NotImplementedError(f"no planner for split kind {type(split).__name__}")


@region_for.register
def _(split: Replicated, shape, tp_rank, tp):
    return Region.whole(tuple(shape))


@region_for.register
def _(split: Partitioned, shape, tp_rank, tp):
    d = _norm_dim(split.dim, len(shape))
    n = shape[d] // tp
    return Region(d, ((tp_rank * n, (tp_rank + 1) * n),), 0)


@region_for.register
def _(split: VocabPartitioned, shape, tp_rank, tp):
    d = _norm_dim(split.dim, len(shape))
    size = shape[d]
    per_rank = split.padded_size(size, tp) // tp
    lo, hi = tp_rank * per_rank, (tp_rank + 1) * per_rank
    real = (min(lo, size), min(hi, size))
    intervals = (real,) if real[1] > real[0] else ()
    return Region(d, intervals, per_rank - (real[1] - real[0]))


@region_for.register
def _(split: Fused, shape, tp_rank, tp):
    d = _norm_dim(split.dim, len(shape))
    intervals, offset = [], 0
    for size in split.part_sizes(shape[d]):
        n = size // tp
        intervals.append((offset + tp_rank * n, offset + (tp_rank + 1) * n))
        offset += size
    return Region(d, tuple(intervals), 0)


def local_numel(region: Region, shape: tuple[int, ...]) -> int:
    return int(np.prod(region.local_shape(shape), dtype=np.int64))


def runs(region: Region, shape: tuple[int, ...], start: int = 0, stop: int | None = None) -> Runs:
    """Runs of local-tensor elements ``[start, stop)`` of ``region``; ``local`` counts from ``start``.
    Padding elements have no run (they belong to no atom element)."""
    shape = tuple(shape) or (1,)
    lshape = region.local_shape(shape)
    d = region.dim
    outer = int(np.prod(shape[:d], dtype=np.int64))
    inner = int(np.prod(shape[d + 1:], dtype=np.int64))
    stop = outer * lshape[d] * inner if stop is None else stop
    if not region.intervals or stop <= start:
        return Runs(*(np.zeros(0, np.int64),) * 3)
    row = lshape[d] * inner  # local elements per outer index
    o_lo, o_hi = start // row, min(outer, -(-stop // row))
    o = np.arange(o_lo, o_hi, dtype=np.int64)[:, None]
    iv = np.asarray(region.intervals, dtype=np.int64)
    lens = (iv[:, 1] - iv[:, 0]) * inner
    loc_off = np.concatenate([[0], np.cumsum(lens)[:-1]])
    lstart = (o * row + loc_off[None, :]).ravel()
    gstart = (o * shape[d] * inner + iv[None, :, 0] * inner).ravel()
    length = np.broadcast_to(lens, (len(o), len(lens))).ravel()
    lo = np.maximum(lstart, start)
    hi = np.minimum(lstart + length, stop)
    keep = hi > lo
    return Runs(gstart[keep] + (lo - lstart)[keep], lo[keep] - start, (hi - lo)[keep])


def intersect(dst: Runs, src: Runs) -> CopyPlan:
    """Copies that fill ``dst`` runs from ``src`` runs (both sorted by ``glob``, each disjoint)."""
    if not len(dst.glob) or not len(src.glob):
        return CopyPlan(*(np.zeros(0, np.int64),) * 3)
    src_end = src.glob + src.length
    dst_end = dst.glob + dst.length
    first = np.searchsorted(src_end, dst.glob, side="right")
    last = np.searchsorted(src.glob, dst_end, side="left")
    count = np.maximum(last - first, 0)
    di = np.repeat(np.arange(len(dst.glob)), count)
    si = np.repeat(first, count) + (np.arange(count.sum()) - np.repeat(np.cumsum(count) - count, count))
    lo = np.maximum(dst.glob[di], src.glob[si])
    hi = np.minimum(dst_end[di], src_end[si])
    keep = hi > lo
    di, si, lo, hi = di[keep], si[keep], lo[keep], hi[keep]
    return CopyPlan(src.local[si] + (lo - src.glob[si]), dst.local[di] + (lo - dst.glob[di]), hi - lo)


def apply(plan: CopyPlan, src, dst, src_base: int = 0) -> None:
    """Copy per ``plan`` from 1-D ``src`` (holding source elements from ``src_base`` on) into ``dst``.
    Works for torch tensors and NumPy arrays alike."""
    if not len(plan):
        return
    if len(plan) > 64 and plan.total // len(plan) < 256:
        # many short runs (a dim-1 split): one gather beats thousands of tiny slice copies
        s_idx = _expand(plan.src - src_base, plan.length)
        d_idx = _expand(plan.dst, plan.length)
        if hasattr(dst, "index_copy_"):
            import torch
            dst[torch.from_numpy(d_idx)] = src[torch.from_numpy(s_idx)].to(dst.dtype)
        else:
            dst[d_idx] = src[s_idx]
        return
    for s, d, n in zip(plan.src.tolist(), plan.dst.tolist(), plan.length.tolist()):
        dst[d:d + n] = src[s - src_base:s - src_base + n]


def _expand(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    offsets = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    return np.repeat(starts, lengths) + offsets


def fragment_of_atom(atom_flat, region: Region, shape, start: int, stop: int, out):
    """Fill ``out`` (1-D, ``stop - start`` long) with the fragment's elements taken from a flat atom.
    Padding elements are left as they are (callers pass zeros)."""
    r = runs(region, shape, start, stop)
    apply(CopyPlan(r.glob, r.local, r.length), atom_flat, out)
    return out


def atom_from_fragment(fragment, region: Region, shape, start: int, stop: int, atom_flat) -> None:
    """Scatter a fragment's elements back into a flat atom (the inverse of ``fragment_of_atom``)."""
    r = runs(region, shape, start, stop)
    apply(CopyPlan(r.local, r.glob, r.length), fragment, atom_flat)
