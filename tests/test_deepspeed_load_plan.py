"""A DeepSpeed load of a plain model is described, planned, then executed as one batch: the plan is a
value built with no process group and no file (``describe`` + ``plan_batch``), and a real 2-rank
load goes through ``plan_batch`` / ``execute_batch`` and restores the saved state bit for bit."""
import pytest

from ucp_plugin.deepspeed.load import MASTER, Want, describe
from ucp_plugin.format import Atom, Piece, Region
from ucp_plugin.language import Replicated
from ucp_plugin.plan import zero as Z
from ucp_plugin.plan.reads import BatchPlan, Copy, Fetch, ReadItem, ReadPlan, plan_batch

STATES = ("fp32", "exp_avg", "exp_avg_sq")
GROUPS = [[("a", 6), ("b", 10)]]  # a (6,) and b (2, 5): 16 elements, 4 per rank at DP4, 8 at DP2
SAVED = {"a": [(0, 0, 4), (1, 4, 6)], "b": [(1, 0, 2), (2, 2, 6), (3, 6, 10)]}  # rank, element range


def _atoms() -> dict[str, Atom]:
    """The atoms a ZeRO-2 DP4 save of GROUPS records (one piece per rank and state, chunks of 4)."""
    shapes, out = {"a": (6,), "b": (2, 5)}, {}
    for name, held in SAVED.items():
        pieces = tuple(Piece(s, f"shards/rank-{r:05d}.safetensors", f"{name}/{s}/0", Region.whole(shapes[name]),
                             lo, hi, chunk_elems=4, digest_at=0) for r, lo, hi in held for s in STATES)
        out[name] = Atom(name, "param", shapes[name], Replicated().to_json(), dict.fromkeys(STATES, "float32"),
                         {"step": 1}, pieces)
    return out


def _piece(atoms, name: str, rank: int, state: str) -> Piece:
    return next(p for p in atoms[name].pieces if p.state == state and p.file.endswith(f"{rank:05d}.safetensors"))


def test_dp4_to_dp2_batch_plan_is_a_value():
    atoms = _atoms()
    layout = Z.plan_zero(GROUPS, 2, Z.ZERO_FLAT)
    wb = Region.whole((2, 5))
    wants = describe(layout.for_rank(1), atoms, {"a", "b"}, with_opt=True)
    # DP2 rank 1 holds b's elements 2..9 at the start of its buffer: master, then each Adam state
    assert wants == (Want(ReadItem("b", "fp32", wb, 2, 10), 0, MASTER, 0),
                     Want(ReadItem("b", "exp_avg", wb, 2, 10), 0, "exp_avg", 0),
                     Want(ReadItem("b", "exp_avg_sq", wb, 2, 10), 0, "exp_avg_sq", 0))
    plan = plan_batch(atoms, [w.item for w in wants])
    assert plan == BatchPlan(tuple(
        ReadPlan(w.item, ((Fetch(_piece(atoms, "b", 2, w.item.state), 0, 4, True, (Copy(0, 0, 4),)),
                           Fetch(_piece(atoms, "b", 3, w.item.state), 0, 4, True, (Copy(0, 4, 4),))),),
                 "first", False) for w in wants))
    assert plan.files == ("shards/rank-00002.safetensors", "shards/rank-00003.safetensors")
    assert plan.elements == 24
    # rank 0: a whole (two DP4 pieces) at offset 0, then b's first two elements (DP4 rank 1) at 6
    rank0 = describe(layout.for_rank(0), atoms, {"a", "b"}, with_opt=False)
    assert [(w.item.atom, w.item.start, w.item.stop, w.offset) for w in rank0] == [("a", 0, 6, 0), ("b", 0, 2, 6)]
    plan0 = plan_batch(atoms, [w.item for w in rank0])
    assert [p.replicas for p in plan0.plans] == [
        ((Fetch(_piece(atoms, "a", 0, "fp32"), 0, 4, True, (Copy(0, 0, 4),)),
          Fetch(_piece(atoms, "a", 1, "fp32"), 0, 2, True, (Copy(0, 4, 2),))),),
        ((Fetch(_piece(atoms, "b", 1, "fp32"), 0, 2, True, (Copy(0, 0, 2),)),),)]


def test_describe_refuses_a_buffer_of_mixed_optimizer_states():
    from ucp_plugin.errors import StateMismatchError

    atoms = _atoms()
    atoms["b"] = Atom("b", "param", (2, 5), atoms["b"].split, {"fp32": "float32", "momentum_buffer": "float32"},
                      {}, ())
    with pytest.raises(StateMismatchError, match="'b' has optimizer states \\['momentum_buffer'\\]"):
        describe(Z.plan_zero(GROUPS, 2, Z.ZERO_FLAT).for_rank(0), atoms, {"a", "b"}, True, "ck")


@pytest.mark.slow
def test_two_rank_load_runs_as_one_batch_and_restores_bitwise(tmp_path):
    """Saved by ZeRO-3 at DP2, loaded by ZeRO-2 at DP2 (another buffer layout): the load is one
    batch on each rank, reads every byte it keeps (verified whole chunks only), and a re-save right
    after it holds the saved fp32 master and optimizer states bit for bit."""
    from tests.ds_checks import assert_resave_bitwise, checkpoint_digest, launch, rank0, rel
    from tests.ds_harness import ds_config as C

    save, resave = tmp_path / "z3", tmp_path / "resave"
    U = ["ucp_plugin.deepspeed"]
    runs = [dict(config=C(3, "fp32", 2, universal=True), steps=3, save_dir=str(save), imports=U),
            dict(config=C(2, "fp32", 2, universal=True), steps=1, init_seed=1, save_at=0, imports=U,
                 load_dir=str(save), save_dir=str(resave))]
    _, target = launch(2, runs, tmp_path / "log")
    reports = [r["load_reports"][0] for r in target]
    assert all(r["batched"] for r in reports), reports
    assert all(r["requested"] <= r["fetched"] <= 1.05 * r["requested"] for r in reports), reports
    assert all({"open", "plan", "execute", "read", "verify", "copy"} <= set(r["phases"]) for r in reports)
    assert rel(rank0(target)["digest_after_load"], checkpoint_digest(str(save))) < 1e-9
    assert_resave_bitwise(str(save), str(resave))
