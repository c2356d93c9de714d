"""Megatron state beyond parameters and per-parameter optimizer states, on real megatron-core
(gloo, CPU shim, one launch of 2 ranks, under the NCCL-rule emulation like every campaign):

- an optimizer that keeps Adam's ``step`` per param group (Transformer Engine / apex ``FusedAdam``;
  here ``ucp_plugin.testing.group_step_adam``, a stand-in with TE's state layout): the step is saved
  as every parameter's scalar and restored into the group on another layout (bias correction goes
  on; restarting it at 1 moves the resumed losses by ~1e-3);
- persistent buffers: megatron's MoE router ``expert_bias`` (aux-loss-free balancing), trained,
  saved and restored across EP2 -> EP1;
- RNG with dropout on: a same-layout resume continues bit-exactly (CPU, CUDA-shim and tracker
  streams restored); after a reshard (TP2 -> DP2) ranks are re-seeded from the saved seed and
  iteration, so two resumes of one checkpoint draw the same masks.
"""
import pytest

from campaign import GPT, MIXTRAL, SAVE_AFTER, SETTINGS, assert_same_atoms, ok, rel, run_campaign
from ucp_plugin.storage import Checkpoint

pytestmark = pytest.mark.slow
DROPOUT = dict(hidden_dropout=0.1, attention_dropout=0.1)
EXPERT_BIAS = dict(moe_router_enable_expert_bias=True, moe_router_score_function="sigmoid",
                   moe_router_bias_update_rate=1e-2)


def _runs(root) -> list[dict]:
    def save(rid, family, model, layout, overrides):
        args = dict(family=family, model=model, layout=layout, settings=SETTINGS, root=str(root / rid),
                    save_after=SAVE_AFTER, overrides=overrides, group_step=True)
        return {"id": rid, "kind": "save", "world": 2, "after": None, "args": args}

    def load(rid, source, layout):
        src = dict(source["args"])
        args = dict(src, layout=layout, resave_root=str(root / rid))
        args.pop("save_after")
        return {"id": rid, "kind": "load", "world": 2, "after": source["id"], "args": args}

    gpt = save("save:gpt-dropout", "gpt", GPT, {"tp": 2}, DROPOUT)
    moe = save("save:mixtral-bias", "mixtral", MIXTRAL, {"dp": 2, "ep": 2}, EXPERT_BIAS)
    return [gpt, moe, load("load:gpt-dropout-same", gpt, {"tp": 2}), load("load:gpt-dropout-dp2-a", gpt, {"dp": 2}),
            load("load:gpt-dropout-dp2-b", gpt, {"dp": 2}), load("load:mixtral-bias-ep1", moe, {"dp": 2})]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return run_campaign(_runs(tmp_path_factory.mktemp("mg-state")), "mg_state_workers:run_plan")


def test_group_step_and_buffers_resume_on_another_layout(runs):
    saved, resumed = ok(runs, "save:mixtral-bias"), ok(runs, "load:mixtral-bias-ep1")
    assert saved["at_save"]["optimizer"] == "GroupStepAdam"
    assert set(saved["at_save"]["group_steps"]) == {SAVE_AFTER} == set(resumed["loaded"]["group_steps"])
    trained = saved["at_save"]["expert_bias"]
    assert any(v != 0 for layer in trained for v in layer), "the router's expert bias never moved"
    assert resumed["loaded"]["expert_bias"] == trained
    diff = rel(resumed["losses"], saved["losses"][SAVE_AFTER:])
    print(f"mixtral EP2 -> EP1, per-group step + expert_bias: max relative loss difference {diff:.1e}")
    assert diff < 1e-5
    a, _ = assert_same_atoms(saved["path"], resumed["resaved"])
    atoms = {x.name: x for x in a.manifest.atoms}
    assert {atoms[f"decoder.layers.{i}.mlp.router.expert_bias"].kind for i in range(2)} == {"buffer"}
    assert {x.scalars.get("step") for x in atoms.values() if x.kind == "param"} == {SAVE_AFTER}


def test_dropout_resumes_bit_exactly_on_the_same_layout(runs):
    saved, same = ok(runs, "save:gpt-dropout"), ok(runs, "load:gpt-dropout-same")
    assert same["losses"] == saved["losses"][SAVE_AFTER:]
    assert_same_atoms(saved["path"], same["resaved"])


def test_dropout_after_a_reshard_is_reseeded_deterministically(runs):
    saved = ok(runs, "save:gpt-dropout")
    a, b = ok(runs, "load:gpt-dropout-dp2-a"), ok(runs, "load:gpt-dropout-dp2-b")
    assert a["losses"] == b["losses"]
    print(f"gpt TP2 -> DP2 with dropout 0.1: relative difference from the uninterrupted run "
          f"{rel(a['losses'], saved['losses'][SAVE_AFTER:]):.1e} (other masks, same distribution)")
    assert Checkpoint.open(a["resaved"]).load_state()["rng_seed"] != Checkpoint.open(saved["path"]).load_state()["rng_seed"]
