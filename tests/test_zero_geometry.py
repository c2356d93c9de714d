"""ucp_plugin.plan.zero: golden offsets for small cases, invariants on random ones, and one check of
the geometry against real DeepSpeed engines (4 and 3 ranks, every ZeRO stage / wrapper)."""
from __future__ import annotations

import os
import random

import pytest

from ucp_plugin.errors import LayoutError, UnsupportedError
from ucp_plugin.plan import zero as Z
from ucp_plugin.plan.zero import Buffer, Fragment, FragmentSlot

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ABC = [[("a", 5), ("b", 7), ("c", 3)]]


def frags(layout, rank):
    return [b.fragments for b in layout.for_rank(rank)]


def test_zero_flat_dp4_golden():
    layout = Z.plan_zero(ABC, 4, Z.ZERO_FLAT)  # 15 -> 16 (multiple of 2*4), 4 per rank
    assert [b.numel for b in layout.buffers] == [4, 4, 4, 4]
    assert frags(layout, 0) == [(Fragment("a", 0, 4, 0),)]
    assert frags(layout, 1) == [(Fragment("a", 4, 1, 0), Fragment("b", 0, 3, 1))]
    assert frags(layout, 2) == [(Fragment("b", 3, 4, 0),)]
    assert frags(layout, 3) == [(Fragment("c", 0, 3, 0),)]
    assert layout.for_rank(3)[0].padding == 1


def test_zero_flat_dp3_golden_and_reverse():
    layout = Z.plan_zero(ABC, 3, Z.ZERO_FLAT)  # 15 -> 18 (multiple of 6), 6 per rank
    assert frags(layout, 0) == [(Fragment("a", 0, 5, 0), Fragment("b", 0, 1, 5))]
    assert frags(layout, 1) == [(Fragment("b", 1, 6, 0),)]
    assert frags(layout, 2) == [(Fragment("c", 0, 3, 0),)]
    assert layout.locate("b") == (FragmentSlot(0, 0, Fragment("b", 0, 1, 5)),
                                  FragmentSlot(1, 0, Fragment("b", 1, 6, 0)))
    old = Z.plan_zero(ABC, 4, Z.ZERO_FLAT)
    assert [p.rank for p in old.locate("b")] == [1, 2]


def test_zero_flat_parameter_alignment_golden():
    assert Z.param_alignment(4, True) == 4 and Z.param_alignment(2, True) == 8 and Z.param_alignment(4, False) == 1
    fg = Z.flat_group([5, 7, 3], 4, alignment=4)
    assert fg == Z.FlatGroup(offsets=(0, 8, 16), paddings=(3, 1, 0), total=24, partition_size=6)
    layout = Z.plan_zero(ABC, 4, Z.ZERO_FLAT, alignment=4)
    assert frags(layout, 0) == [(Fragment("a", 0, 5, 0),)]
    assert frags(layout, 1) == [(Fragment("b", 0, 4, 2),)]
    assert frags(layout, 2) == [(Fragment("b", 4, 3, 0), Fragment("c", 0, 2, 4))]
    assert frags(layout, 3) == [(Fragment("c", 2, 1, 0),)]
    assert Z.plan_zero(ABC, 4, Z.BF16_FLAT, alignment=4) == Z.plan_zero(ABC, 4, Z.BF16_FLAT)  # never aligned


def test_zero_flat_tiny_group_leaves_ranks_empty():
    layout = Z.plan_zero([[("x", 1)]], 4, Z.ZERO_FLAT)
    assert [b.numel for b in layout.buffers] == [2, 2, 2, 2]
    assert frags(layout, 0) == [(Fragment("x", 0, 1, 0),)]
    assert all(frags(layout, r) == [()] for r in (1, 2, 3))


def test_zero3_dp3_and_dp4_golden():
    l3 = Z.plan_zero(ABC, 3, Z.ZERO3)  # ds_tensor sizes 2, 3, 1
    assert frags(l3, 0) == [(Fragment("a", 0, 2, 0), Fragment("b", 0, 3, 2), Fragment("c", 0, 1, 5))]
    assert frags(l3, 2) == [(Fragment("a", 4, 1, 0), Fragment("b", 6, 1, 2), Fragment("c", 2, 1, 5))]
    l4 = Z.plan_zero(ABC, 4, Z.ZERO3)  # ds_tensor sizes 2, 2, 1: rank 3 holds only b's last element
    assert l4.for_rank(3) == (Buffer(3, 0, 0, 5, (Fragment("b", 6, 1, 2),)),)
    assert [Z.zero3_partition_numel(n, 4) for n in (5, 7, 3, 8)] == [2, 2, 1, 2]


def test_zero3_sub_groups_golden():
    assert Z.zero3_sub_groups([5, 7, 3], 2, sub_group_size=5) == [range(0, 2), range(2, 3)]
    assert Z.zero3_sub_groups([5, 7, 3], 2, sub_group_size=9) == [range(0, 3)]  # 9 >= 3+4+2
    layout = Z.plan_zero(ABC + [[("d", 4)]], 2, Z.ZERO3, sub_group_size=5)
    assert [(b.index, b.group, b.numel) for b in layout.for_rank(1)] == [(0, 0, 7), (1, 0, 2), (2, 1, 2)]
    assert layout.for_rank(1)[1].fragments == (Fragment("c", 2, 1, 0),)


def test_replicated_kinds():
    fused = Z.plan_zero(ABC, 2, Z.FUSED_FLAT)
    assert fused.replicated and [b.numel for b in fused.buffers] == [15, 15]
    assert fused.for_rank(1)[0].fragments[2] == Fragment("c", 0, 3, 12)
    plain = Z.plan_zero([[("w", 4), ("frozen", 3)], [("z", 0), ("v", 2)]], 2, Z.PER_PARAM)
    assert [(b.index, b.group, b.numel) for b in plain.for_rank(0)] == [(0, 0, 4), (1, 0, 3), (2, 1, 0), (3, 1, 2)]
    assert plain.for_rank(0)[2].fragments == ()


def test_optimizer_kind_matches_engine_rules():
    assert Z.optimizer_kind(0, "fp32") == Z.PER_PARAM
    assert Z.optimizer_kind(0, "bf16") == Z.PER_PARAM and Z.optimizer_kind(0, "bf16", fused=True) == Z.FUSED_FLAT
    assert Z.optimizer_kind(0, "bf16", pipeline=True) == Z.BF16_FLAT
    assert Z.optimizer_kind(1, "bf16") == Z.ZERO_FLAT and Z.optimizer_kind(1, "bf16", "fp32") == Z.BF16_FLAT
    assert Z.optimizer_kind(1, "bf16", "fp32", cpu_offload=True) == Z.ZERO_FLAT
    assert Z.optimizer_kind(2, "bf16", "fp32") == Z.ZERO_FLAT and Z.optimizer_kind(3, "fp32") == Z.ZERO3
    with pytest.raises(UnsupportedError, match="grad_accum_dtype"):
        Z.optimizer_kind(0, "bf16", "fp32")
    with pytest.raises(LayoutError, match="stage 4"):
        Z.optimizer_kind(4, "fp32")


def test_bad_inputs_raise_with_the_fix():
    with pytest.raises(LayoutError, match="appears twice"):
        Z.plan_zero([[("a", 2)], [("a", 2)]], 2, Z.ZERO_FLAT)
    with pytest.raises(LayoutError, match="drop empty groups"):
        Z.plan_zero([[]], 2, Z.ZERO3)
    with pytest.raises(LayoutError, match="zero-element"):
        Z.plan_zero([[("a", 0)]], 2, Z.ZERO_FLAT)
    with pytest.raises(LayoutError, match="unknown optimizer kind"):
        Z.plan_zero(ABC, 2, "zero4")
    with pytest.raises(LayoutError, match="frozen"):
        Z.plan_zero(ABC, 2, Z.ZERO_FLAT).locate("nope")
    with pytest.raises(LayoutError, match="outside"):
        Z.plan_zero(ABC, 2, Z.ZERO_FLAT).for_rank(2)


def _check_invariants(groups, dp, kind, **kw):
    layout = Z.plan_zero(groups, dp, kind, **kw)
    sizes = dict(p for g in groups for p in g)
    for name, numel in sizes.items():
        runs = sorted((p.fragment.param_offset, p.fragment.length) for p in layout.locate(name))
        cursor = 0
        for off, length in runs:  # every element exactly once, across ranks
            assert off == cursor and length > 0, (name, runs)
            cursor += length
        assert cursor == numel
    for b in layout.buffers:
        spans = sorted((f.buffer_offset, f.buffer_offset + f.length) for f in b.fragments)
        assert all(e <= s2 for (_, e), (s2, _) in zip(spans, spans[1:])) and (not spans or spans[-1][1] <= b.numel)
    numels = {(b.index, b.numel) for b in layout.buffers}
    assert len(numels) == len({b.index for b in layout.buffers})  # a buffer has one size on every rank


@pytest.mark.parametrize("kind", [Z.ZERO_FLAT, Z.BF16_FLAT, Z.ZERO3])
def test_random_groups_cover_every_element_once(kind):
    rng = random.Random(7)
    for _ in range(200):
        groups = [[(f"g{g}p{i}", rng.randint(1, 40)) for i in range(rng.randint(1, 6))] for g in range(rng.randint(1, 3))]
        _check_invariants(groups, rng.randint(1, 9), kind, alignment=rng.choice([1, 4, 8]),
                          sub_group_size=rng.choice([1, 10, 50, Z.DEFAULT_SUB_GROUP_SIZE]))


@pytest.mark.slow
@pytest.mark.parametrize("world_size", [4, 3])
def test_geometry_matches_deepspeed(world_size, tmp_path):
    """One launch per world size; every rank builds one engine per config (ZeRO-0/1/2/3, fp32/bf16,
    BF16_Optimizer, parameter alignment, sub-groups, two param groups, tied head)."""
    from tests.ds_workers import GEOMETRY_CONFIGS
    from ucp_plugin.testing.launcher import run_workers

    env = {"PYTHONPATH": os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]), "OMP_NUM_THREADS": "1"}
    results = run_workers(world_size, "tests.ds_workers:geometry", {"names": list(GEOMETRY_CONFIGS)},
                          timeout=600, env=env, log_dir=str(tmp_path))
    errors = [e for per_rank in results for r in per_rank for e in r["errors"]]
    assert not errors, "\n".join(errors)
    assert all(r["detects_wrong_plan"] for per_rank in results for r in per_rank)
    kinds = {r["config"]: r["kind"] for r in results[0]}
    assert kinds["zero1_bf16_fp32acc"] == Z.BF16_FLAT and kinds["zero3_bf16_tied"] == Z.ZERO3
    assert len(results[0]) == len(GEOMETRY_CONFIGS)
