"""Mixtral with an expert-tensor-parallel size (ETP) other than TP, in universal checkpoints.

megatron-core's ``expert_tensor_parallel_size`` splits each expert over ETP ranks while attention and
the router stay split over TP; the expert layers re-cut the TP x DP ranks as ETP x EP x expert-DP.
The checkpoint stores the same per-expert atoms at every ETP (the adapter applies Mixtral's expert
splits with megatron's expert-TP rank and size), so a checkpoint moves between ETP sizes like between
TP sizes. Real megatron-core modules on gloo, real files, the transition machinery of
test_megatron_checkpoint: each resumed run's 5 losses equal the uninterrupted run's within 1e-5
relative and the re-saved checkpoint holds bitwise the same atoms. A target ETP the experts cannot
take is refused from the manifest alone, naming ETP and its valid sizes.

Cost: two launches (two ranks, four ranks), every save and load of one world size in one.
"""
import os
import shutil

import pytest

from campaign import ok, rel, run_campaign
from test_megatron_checkpoint import SAVE_AFTER, TOL, Plan, _key, assert_same_consolidated_state
from ucp_plugin.errors import LayoutError
from ucp_plugin.format import MANIFEST
from ucp_plugin.megatron.layout import MegatronLayout
from ucp_plugin.megatron.validate import validate_layout
from ucp_plugin.storage import Checkpoint
from ucp_plugin.tools.validate import validate
from ucp_plugin.tools.verify import verify

pytestmark = pytest.mark.slow
# TP2+SP with ETP1 and EP2 on 4 ranks: attention split over 2 ranks, whole experts on 2 EP ranks,
# each expert replicated on 2 (expert DP 2)
ETP1_EP2 = {"tp": 2, "sp": True, "dp": 2, "ep": 2, "etp": 1}
DP4 = {"dp": 4}
TP2SP_ETP2 = {"tp": 2, "sp": True, "dp": 2, "etp": 2}
TP2SP_ETP1 = {"tp": 2, "sp": True, "dp": 2, "etp": 1}
# on 2 ranks: EP2 with DP1 (room made by ETP1 < TP2), then ETP2 > TP1
EP2_DP1 = {"tp": 2, "sp": True, "ep": 2, "etp": 1}
DP2_ETP2 = {"dp": 2, "etp": 2}
# TP2SP-ETP2 -> TP2SP-ETP1 lands on EP1 with ETP != TP, where megatron-core 0.16 would reduce the
# expert gradients over the wrong group unless ``build.mark_expert_data_parallel`` marks them (measured
# without it: 3.5e-3 relative loss difference)
TRANSITIONS = [("TP2SP-ETP1-EP2->TP1-DP4", ETP1_EP2, DP4),
               ("TP1-DP4->TP2SP-ETP1-EP2", DP4, ETP1_EP2),
               ("TP2SP-ETP2->TP2SP-ETP1", TP2SP_ETP2, TP2SP_ETP1),
               ("TP2SP-ETP1-EP2-DP1->TP1-DP2-ETP2", EP2_DP1, DP2_ETP2)]
FC1 = "decoder.layers.{layer}.mlp.experts.local_experts.{expert}.linear_fc1.weight"


def build_plan(root) -> Plan:
    plan = Plan(root)
    for _, source, _ in TRANSITIONS:
        plan.save("mixtral", source)
    for label, source, target in TRANSITIONS:
        plan.load(f"load:{label}", f"save:mixtral:{_key(source)}", target)
    return plan


@pytest.fixture(scope="module")
def campaign(tmp_path_factory):
    return run_campaign(build_plan(tmp_path_factory.mktemp("mg-etp")).runs)


def _saved(campaign, layout: dict) -> dict:
    return ok(campaign, f"save:mixtral:{_key(layout)}")


@pytest.mark.parametrize("label,source,target", TRANSITIONS, ids=[t[0] for t in TRANSITIONS])
def test_transition_resumes_exactly(campaign, label, source, target):
    saved = _saved(campaign, source)
    resumed = ok(campaign, f"load:{label}")
    assert resumed["iteration"] == SAVE_AFTER and resumed["extra"] == {"note": "test"}
    diff = rel(resumed["losses"], saved["losses"][SAVE_AFTER:])
    print(f"{label}: max relative loss difference {diff:.1e}")
    assert diff < TOL, f"{label}: relative loss difference {diff:.2e}"
    assert_same_consolidated_state(saved["path"], resumed["resaved"])


def test_every_etp_trains_alike(campaign):
    """Same reference weights (sliced by the expert-TP rank), same batches: ETP1, ETP2 and TP1 agree."""
    ref = _saved(campaign, DP4)["losses"]
    assert ref[-1] < ref[0], f"mixtral does not learn: {ref}"
    for layout in (ETP1_EP2, TP2SP_ETP2, EP2_DP1):
        assert rel(_saved(campaign, layout)["losses"], ref) < TOL, layout


def test_experts_are_whole_on_their_ep_rank(campaign):
    """ETP1·EP2 on 4 ranks: megatron's expert grid is EP-innermost, so ranks 0, 2 hold experts 0-1 and
    ranks 1, 3 experts 2-3; the manifest records ETP; each expert's fc1 is written whole (one region),
    not in TP halves, while attention is written in TP halves."""
    saved = campaign[f"save:mixtral:{_key(ETP1_EP2)}"]
    assert [r["experts"] for r in saved] == [[0, 1], [2, 3], [0, 1], [2, 3]]
    path = _saved(campaign, ETP1_EP2)["path"]
    assert verify(path) == []
    m = Checkpoint.open(path).manifest
    assert (m.layout.tp, m.layout.ep, m.layout.dp, m.layout.etp) == (2, 2, 2, 1)
    fc1 = m.atom(FC1.format(layer=3, expert=2))
    # fused [gate; up]: one region holding both parts whole (at TP2 it would be two halves of each)
    assert {p.region.intervals for p in fc1.pieces if p.state == "fp32"} == {((0, 40), (40, 80))}
    qkv = m.atom("decoder.layers.3.self_attention.linear_qkv.weight")
    assert {p.region.intervals for p in qkv.pieces if p.state == "fp32"} == {((0, 32),), ((32, 64),)}
    assert Checkpoint.open(_saved(campaign, DP4)["path"]).manifest.layout.etp == 1


def test_etp_not_dividing_the_expert_ffn_is_refused_from_the_manifest(campaign, tmp_path):
    """A folder holding only the manifest is enough: the refusal comes before any tensor is read or
    any model built, and names ETP, the expert FFN and the valid ETP sizes; ``ucp validate`` says the
    same and proposes layouts."""
    shutil.copy(os.path.join(_saved(campaign, ETP1_EP2)["path"], MANIFEST), tmp_path / MANIFEST)
    with pytest.raises(LayoutError) as e:
        validate_layout(str(tmp_path), MegatronLayout(dp=3, etp=3))
    msg = str(e.value)
    assert "cannot be loaded at TP=1 PP=1 EP=1 ETP=3" in msg and "moe_ffn=40" in msg
    assert "fused part of size 40 is not divisible by ETP=3" in msg
    assert "ETP in [1, 2, 4, 5, 8, 10, 20, 40]" in msg
    verdict = validate(_saved(campaign, ETP1_EP2)["path"], dp=3, etp=3)
    assert not verdict.ok and "not divisible by ETP=3; valid ETP sizes: [1, 2, 4, 5, 8, 10, 20, 40]" in \
        verdict.render()
    assert verdict.nearest == ("TP1·PP1·DP3",)  # ETP1 = TP1: nothing more to say
    assert validate(_saved(campaign, ETP1_EP2)["path"], tp=2, dp=2, ep=2, etp=1).ok
