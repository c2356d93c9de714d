"""Local tensors made of several atoms' blocks, some stored transposed: pure functions, no torch.

A *segment* says that local elements ``[offset, offset + numel)`` of a parameter are the local tensor
of ``region`` of atom ``atom`` (megatron's legacy GroupedMLP: one block per local expert). Its
``order`` is "identity" (the local tensor in row-major order, what every other parameter is) or
"transposed": the 2-D local tensor [a, b] stored as its transpose [b, a], so block element (j, i)
(flat ``j*a + i``) is local element (i, j).

Stored pieces are always in the atom's canonical order (a piece is a contiguous range of a region's
row-major local tensor), so every reader plans over them as before. A range ``[start, stop)`` of a
transposed block (a DistributedOptimizer shard cuts blocks anywhere) is moved as a few *rectangles*
(``transposed_rects``): at most a partial first column, a band of whole columns and a partial last
column of the local tensor, each cut where the region's intervals break. A rectangle of atom rows
[r0, r1) and columns [c0, c1) is a contiguous range of the region ``Region(1, ((c0, c1),))`` (rows
r0..r1 of that column band), or of ``Region(0, ((r0, r1),))`` when it spans every column. In the
transposed fragment it is a strided matrix: element (r, c) of the rectangle is fragment element
``offset + c * stride + r``, so a writer gathers and a reader scatters it with one strided copy.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..format import Region

IDENTITY, TRANSPOSED = "identity", "transposed"
ORDERS = (IDENTITY, TRANSPOSED)


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


@dataclass(frozen=True)
class Segment:
    """Local elements ``[offset, offset + numel)`` of a parameter: ``region`` of atom ``atom`` (global
    ``shape``), in ``order``."""
    atom: str
    shape: tuple[int, ...]
    region: Region
    offset: int = 0
    order: str = IDENTITY

    def __post_init__(self):
        if self.order not in ORDERS:
            raise ValueError(f"segment of {self.atom!r}: order must be one of {ORDERS}, not {self.order!r}")
        if self.order == TRANSPOSED and (len(self.shape) != 2 or self.region.pad or self.region.dim not in (0, 1)):
            raise ValueError(f"segment of {self.atom!r}: only an unpadded 2-D local tensor can be stored "
                             f"transposed (shape {list(self.shape)}, region {self.region})")

    @property
    def numel(self) -> int:
        return _numel(self.region.local_shape(self.shape))

    def overlap(self, start: int, stop: int) -> tuple[int, int] | None:
        """The part of local range [start, stop) in this segment, as parameter-local offsets."""
        lo, hi = max(start, self.offset), min(stop, self.offset + self.numel)
        return (lo, hi) if hi > lo else None


@dataclass(frozen=True)
class Rect:
    """Atom rows x columns ``[rows, cols]`` of a transposed fragment, stored canonically as elements
    ``[start, stop)`` of ``region``; rectangle element (r, c) is fragment element
    ``offset + c * stride + r``."""
    region: Region
    start: int
    stop: int
    rows: int
    cols: int
    offset: int
    stride: int


def _spans(lo: int, hi: int, intervals) -> list[tuple[int, int, int]]:
    """Local indices [lo, hi) along a split dim -> (atom start, atom stop, local start) per interval."""
    out, base = [], 0
    for s, e in intervals:
        a, b = max(lo, base), min(hi, base + e - s)
        if b > a and out and out[-1][1] == s + a - base:
            out[-1] = (out[-1][0], s + b - base, out[-1][2])  # adjacent in the atom too (TP1's fused parts)
        elif b > a:
            out.append((s + a - base, s + b - base, a))
        base += e - s
    return out


def _local_rects(a: int, start: int, stop: int) -> list[tuple[int, int, int, int]]:
    """Local rows [i0, i1) x columns [j0, j1) covering transposed flat range [start, stop) of a
    local tensor with ``a`` rows: a partial first column, whole columns, a partial last column."""
    j_first, i_first = divmod(start, a)
    j_last, i_last = divmod(stop, a)  # column j_last holds rows [0, i_last)
    if j_first == j_last:
        return [(i_first, i_last, j_first, j_first + 1)]
    rects = []
    if i_first:
        rects.append((i_first, a, j_first, j_first + 1))
        j_first += 1
    if j_last > j_first:
        rects.append((0, a, j_first, j_last))
    if i_last:
        rects.append((0, i_last, j_last, j_last + 1))
    return rects


def transposed_rects(region: Region, shape: tuple[int, ...], start: int, stop: int) -> list[Rect]:
    """The rectangles that move local elements ``[start, stop)`` of a transposed segment (their
    ``offset`` counted from ``start``); together they cover the range exactly once."""
    shape = tuple(shape)
    a = region.local_shape(shape)[0]  # rows of the local tensor = length of a block row
    row_iv = region.intervals if region.dim == 0 else ((0, shape[0]),)
    col_iv = region.intervals if region.dim == 1 else ((0, shape[1]),)
    rects = []
    if stop <= start:
        return rects
    for i0, i1, j0, j1 in _local_rects(a, start, stop):
        for c0, c1, lj in _spans(j0, j1, col_iv):
            for r0, r1, li in _spans(i0, i1, row_iv):
                if c0 == 0 and c1 == shape[1]:
                    reg, lo = Region(0, ((r0, r1),)), 0
                else:
                    reg, lo = Region(1, ((c0, c1),)), r0 * (c1 - c0)
                n = (r1 - r0) * (c1 - c0)
                rects.append(Rect(reg, lo, lo + n, r1 - r0, c1 - c0, lj * a + li - start, a))
    return rects
