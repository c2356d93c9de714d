"""Unit tests of the planner: exact offsets, and property-based round trips for every split kind."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ucp_plugin.errors import LayoutError
from ucp_plugin.format import Region
from ucp_plugin.language import Fused, Partitioned, Replicated, VocabPartitioned
from ucp_plugin.plan import (atom_from_fragment, fragment_of_atom, intersect, local_numel, region_for, runs,
                             transposed_rects)


def fragments(split, shape, tp, dp):
    """Every (tp rank, region, start, stop) when each TP-local tensor is cut into dp flat ranges."""
    out = []
    for r in range(tp):
        region = region_for(split, shape, r, tp)
        n = local_numel(region, shape)
        bounds = np.linspace(0, n, dp + 1).astype(int)
        out += [(r, region, int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]
    return out


def slice_all(atom, split, shape, tp, dp):
    return [(reg, a, b, fragment_of_atom(atom, reg, shape, a, b, np.zeros(b - a, atom.dtype)))
            for _, reg, a, b in fragments(split, shape, tp, dp)]


def consolidate(frags, shape):
    atom = np.full(int(np.prod(shape)), -1.0)
    for reg, a, b, data in frags:
        atom_from_fragment(data, reg, shape, a, b, atom)
    return atom


@st.composite
def cases(draw):
    kind = draw(st.sampled_from(["rep", "part", "vocab", "fused"]))
    tp = draw(st.integers(1, 4))
    dims = draw(st.lists(st.integers(1, 5), min_size=1, max_size=3))
    dim = draw(st.integers(0, len(dims) - 1))
    shape = list(dims)
    if kind == "part":
        shape[dim] *= tp
        split = Partitioned(dim)
    elif kind == "fused":
        parts = tuple(draw(st.integers(1, 3)) * tp for _ in range(draw(st.integers(1, 3))))
        shape[dim] = sum(parts)
        split = Fused(dim, parts)
    elif kind == "vocab":
        split = VocabPartitioned(dim, draw(st.integers(1, 4)))
    else:
        split = Replicated()
    return split, tuple(shape), tp, draw(st.integers(1, 5))


@settings(max_examples=300, deadline=None)
@given(cases(), cases())
def test_round_trip_and_reshard(a, b):
    split, shape, tp, dp = a
    atom = np.arange(int(np.prod(shape)), dtype=np.float64)
    frags = slice_all(atom, split, shape, tp, dp)
    if not isinstance(split, Replicated):  # replicas overwrite each other identically
        covered = sum(len(runs(reg, shape, s, e).glob) and runs(reg, shape, s, e).total
                      for reg, s, e, _ in frags)
        assert covered == atom.size  # every element exactly once: no gap, no overlap
    assert np.array_equal(consolidate(frags, shape), atom)
    # layout A -> atoms -> layout B equals slicing directly for B, via the copy plans a reader uses
    _, _, tp_b, dp_b = b
    for _, reg_b, sb, eb in fragments(split, shape, tp_b, dp_b):
        out = np.zeros(eb - sb)
        for reg_a, sa, ea, data in frags:
            plan = intersect(runs(reg_b, shape, sb, eb), runs(reg_a, shape, sa, ea))
            for s, d, n in zip(plan.src, plan.dst, plan.length):
                out[d:d + n] = data[s:s + n]
        assert np.array_equal(out, fragment_of_atom(atom, reg_b, shape, sb, eb, np.zeros(eb - sb)))


def test_golden_dp4_to_dp3_uneven():
    shape = (10,)
    region = Region.whole(shape)
    # source: DP4 partitions of 3,3,2,2 elements; target rank 1 of DP3 holds [4, 7)
    dst = runs(region, shape, 4, 7)
    got = [intersect(dst, runs(region, shape, a, b)) for a, b in [(0, 3), (3, 6), (6, 8), (8, 10)]]
    triples = [list(zip(p.src.tolist(), p.dst.tolist(), p.length.tolist())) for p in got]
    assert triples == [[], [(1, 0, 2)], [(0, 2, 1)], []]


def test_golden_gqa_tp2_to_tp4():
    # fused QKV of 4 query groups x (2 q heads + k + v) x head_dim 2 = 32 rows, hidden 3
    split, shape = Partitioned(0, groups=4), (32, 3)
    assert region_for(split, shape, 1, 2) == Region(0, ((16, 32),), 0)
    assert region_for(split, shape, 3, 4) == Region(0, ((24, 32),), 0)
    # TP4 rank 1 reads rows 8..16 = the second half of TP2 rank 0's local tensor
    plan = intersect(runs(region_for(split, shape, 1, 4), shape),
                     runs(region_for(split, shape, 0, 2), shape))
    assert list(zip(plan.src.tolist(), plan.dst.tolist(), plan.length.tolist())) == [(24, 0, 24)]
    with pytest.raises(LayoutError, match="does not divide its 4 groups.*valid TP sizes: \\[1, 2, 4\\]"):
        split.check("linear_qkv.weight", shape, 8)


def test_golden_swiglu_and_vocab_padding():
    assert region_for(Fused(0, (4, 4)), (8, 2), 1, 2) == Region(0, ((2, 4), (6, 8)), 0)
    # vocab 10 padded to a multiple of 4*2=8 -> 16 rows, 8 per rank, rank 1 holds 2 real + 6 pad
    assert region_for(VocabPartitioned(0, 4), (10, 3), 1, 2) == Region(0, ((8, 10),), 6)
    r = runs(Region(0, ((8, 10),), 6), (10, 3))
    assert (r.glob.tolist(), r.local.tolist(), r.length.tolist()) == ([24], [0], [6])


def test_dim1_split_runs_are_rows():
    r = runs(region_for(Partitioned(1), (3, 4), 1, 2), (3, 4), 1, 5)
    assert list(zip(r.glob.tolist(), r.local.tolist(), r.length.tolist())) == [(3, 0, 1), (6, 1, 2), (10, 3, 1)]


# ------------------------------------------------------------------- transposed blocks (GroupedMLP)

def _rect_view(fragment, rect):
    """The rectangle as a [rows, cols] view of the fragment (numpy strides count bytes)."""
    step = fragment.itemsize
    return np.lib.stride_tricks.as_strided(fragment[rect.offset:], (rect.rows, rect.cols),
                                           (step, rect.stride * step))


def _transposed_local(atom, region, shape):
    n = local_numel(region, shape)
    local = fragment_of_atom(atom, region, shape, 0, n, np.zeros(n))
    return local.reshape(region.local_shape(shape)).T.reshape(-1)


@st.composite
def transposed_cases(draw):
    tp = draw(st.integers(1, 3))
    dim = draw(st.integers(0, 1))
    shape = [draw(st.integers(1, 4)), draw(st.integers(1, 4))]
    if draw(st.booleans()):
        parts = tuple(draw(st.integers(1, 3)) * tp for _ in range(draw(st.integers(1, 3))))
        shape[dim] = sum(parts)
        split = Fused(dim, parts)
    else:
        shape[dim] *= tp
        split = Partitioned(dim)
    return split, tuple(shape), tp, draw(st.integers(1, 5))


@settings(max_examples=300, deadline=None)
@given(transposed_cases())
def test_transposed_blocks_written_as_canonical_pieces_round_trip(case):
    """Every TP rank's transposed block, cut into dp flat ranges anywhere, is written as rectangles
    in canonical order: together they cover the atom exactly once, and reading each range back
    through the rectangles gives the transposed fragment."""
    split, shape, tp, dp = case
    atom = np.arange(int(np.prod(shape)), dtype=np.float64)
    rebuilt, covered = np.full(atom.size, -1.0), 0
    for _, region, a, b in fragments(split, shape, tp, dp):
        frag = _transposed_local(atom, region, shape)[a:b].copy()
        back = np.zeros(b - a)
        for rect in transposed_rects(region, shape, a, b):
            piece = _rect_view(frag, rect).reshape(-1)  # canonical: atom rows x columns, row-major
            assert rect.stop - rect.start == piece.size
            atom_from_fragment(piece, rect.region, shape, rect.start, rect.stop, rebuilt)
            covered += runs(rect.region, shape, rect.start, rect.stop).total
            _rect_view(back, rect)[...] = fragment_of_atom(atom, rect.region, shape, rect.start, rect.stop,
                                                           np.zeros(piece.size)).reshape(rect.rows, rect.cols)
        assert np.array_equal(back, frag)
    assert covered == atom.size and np.array_equal(rebuilt, atom)


def test_golden_transposed_swiglu_block_cut_mid_column():
    # fc1 atom [gate; up] = [4, 3] (ffn 2, hidden 3); TP2 rank 1 holds rows (1, 3) -> local [2, 3],
    # stored transposed as a [3, 2] block; a shard [1, 5) of it is local (1,0) | columns 1..2 | (0,2)
    region = region_for(Fused(0, (2, 2)), (4, 3), 1, 2)
    assert region == Region(0, ((1, 2), (3, 4)), 0)
    got = [(r.region, r.start, r.stop, r.rows, r.cols, r.offset, r.stride)
           for r in transposed_rects(region, (4, 3), 1, 5)]
    assert got == [(Region(1, ((0, 1),)), 3, 4, 1, 1, 0, 2),
                   (Region(1, ((1, 2),)), 1, 2, 1, 1, 1, 2),
                   (Region(1, ((1, 2),)), 3, 4, 1, 1, 2, 2),
                   (Region(1, ((2, 3),)), 1, 2, 1, 1, 3, 2)]
    # a whole block of a dim-1 split (fc2 [hidden 3, ffn 4], TP2 rank 0 holds columns 0..2)
    region = region_for(Partitioned(1), (3, 4), 0, 2)
    [whole] = transposed_rects(region, (3, 4), 0, 6)
    assert (whole.region, whole.start, whole.stop, whole.rows, whole.cols, whole.offset, whole.stride) == \
        (Region(1, ((0, 2),)), 0, 6, 3, 2, 0, 3)
    assert transposed_rects(region, (3, 4), 2, 2) == []
