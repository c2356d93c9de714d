"""Read plans are values: exact fetches and copies for DP and TP changes, with no process group and
no file (the pieces are what a DP4 / TP2 save records)."""
import pytest

from ucp_plugin.errors import FormatError
from ucp_plugin.format import Atom, Piece, Region
from ucp_plugin.language import Partitioned, Replicated
from ucp_plugin.plan import region_for
from ucp_plugin.plan.reads import Copy, Fetch, ReadItem, plan_read


def _dp4_atom() -> Atom:
    """A (8, 4) parameter saved at ZeRO DP4: rank r stored elements [8r, 8r + 8), chunks of 4."""
    whole = Region.whole((8, 4))
    pieces = tuple(Piece("fp32", f"shards/rank-{r:05d}.safetensors", "w/fp32/0", whole, 8 * r, 8 * r + 8,
                         chunk_elems=4, digest_at=0) for r in range(4))
    return Atom("w", "param", (8, 4), Replicated().to_json(), {"fp32": "float32"}, {}, pieces)


def test_dp4_to_dp2_reads_two_whole_pieces():
    atom = _dp4_atom()
    plan = plan_read(atom, ReadItem("w", "fp32", Region.whole((8, 4)), 16, 32))
    p = atom.pieces
    assert plan.replicas == ((Fetch(p[2], 0, 8, True, (Copy(0, 0, 8),)),
                              Fetch(p[3], 0, 8, True, (Copy(0, 8, 8),))),)
    assert plan.files == ("shards/rank-00002.safetensors", "shards/rank-00003.safetensors")
    assert plan.elements == 16 and not plan.padded


def test_unaligned_range_fetches_whole_chunks_only_when_verified():
    atom, item = _dp4_atom(), ReadItem("w", "fp32", Region.whole((8, 4)), 6, 18)
    p = atom.pieces
    assert plan_read(atom, item).replicas == ((Fetch(p[0], 4, 8, True, (Copy(2, 0, 2),)),
                                               Fetch(p[1], 0, 8, True, (Copy(0, 2, 8),)),
                                               Fetch(p[2], 0, 4, True, (Copy(0, 10, 2),))),)
    exact = plan_read(atom, item, verify=False)
    assert exact.replicas == ((Fetch(p[0], 6, 8, False, (Copy(0, 0, 2),)),
                               Fetch(p[1], 0, 8, False, (Copy(0, 2, 8),)),
                               Fetch(p[2], 0, 2, False, (Copy(0, 10, 2),))),)
    assert exact.elements == 12 and plan_read(atom, item).elements == 16


def test_tp2_to_tp4_row_parallel_is_one_strided_copy_per_piece():
    """A (4, 8) weight split over columns: TP4 rank 1 needs columns 2..3 of every row, which TP2
    rank 0 stored as local columns 2..3 of its (4, 4) tensor."""
    shape, split = (4, 8), Partitioned(1)
    pieces = tuple(Piece("fp32", f"shards/rank-{t:05d}.safetensors", "w/fp32/0", region_for(split, shape, t, 2),
                         0, 16, chunk_elems=16, digest_at=0) for t in range(2))
    atom = Atom("w", "param", shape, split.to_json(), {"fp32": "float32"}, {}, pieces)
    for rank, (piece, src) in enumerate([(0, 0), (0, 2), (1, 0), (1, 2)]):
        region = region_for(split, shape, rank, 4)
        plan = plan_read(atom, ReadItem("w", "fp32", region, 0, 8))
        assert plan.replicas == ((Fetch(pieces[piece], 0, 16, True, (Copy(src, 0, 2, 4, 4, 2),)),),), rank
    # part of the local tensor: rows 1..2 of TP4 rank 3 (local elements 2..6)
    plan = plan_read(atom, ReadItem("w", "fp32", region_for(split, shape, 3, 4), 2, 6), verify=False)
    assert plan.replicas == ((Fetch(pieces[1], 6, 12, False, (Copy(0, 0, 2, 2, 4, 2),)),),)


def test_missing_piece_is_refused_naming_the_atom():
    atom = _dp4_atom()
    gap = Atom("w", "param", (8, 4), atom.split, atom.states, {}, atom.pieces[:3])
    with pytest.raises(FormatError, match="pieces of 'w' state 'fp32' cover 8 of the 16"):
        plan_read(gap, ReadItem("w", "fp32", Region.whole((8, 4)), 16, 32), where="ck")


def test_strided_joins_runs_that_continue_each_other():
    """Runs contiguous in source and destination become one copy; a run that breaks either side
    does not join, and equal runs at constant steps still merge into one strided copy."""
    import numpy as np

    from ucp_plugin.plan.reads import strided
    from ucp_plugin.plan.regions import CopyPlan

    def cp(*runs):
        return CopyPlan(*(np.array(x, dtype=np.int64) for x in zip(*runs)))

    assert strided(cp((10, 0, 4), (14, 4, 4), (18, 8, 2))) == (Copy(10, 0, 10),)
    assert strided(cp((10, 0, 4), (14, 4, 4), (20, 8, 2)), base=10) == (Copy(0, 0, 8), Copy(10, 8, 2))
    # the first two join into (0, 0, 4), which then steps by (8, 4) like the other two: one strided copy
    assert strided(cp((0, 0, 2), (2, 2, 2), (8, 4, 4), (16, 8, 4))) == (Copy(0, 0, 4, 3, 8, 4),)
