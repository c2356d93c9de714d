"""megatron's legacy GroupedMLP (``moe_grouped_gemm=True``, local spec) in universal checkpoints.

GroupedMLP keeps all local experts of an EP rank in one ``weight1``/``weight2`` tensor, each expert a
transposed block; the checkpoint stores the SequentialMLP's per-expert atoms
(``...local_experts.K.linear_fc{1,2}.weight``), so a checkpoint moves between the two expert layouts
and across EP/TP. Real megatron-core modules on gloo (GroupedMLP's ``grouped_gemm.ops.gmm`` is the
CPU reference in ``cpu_shim``), real files, the transition machinery of test_megatron_checkpoint:
each resumed run's 5 losses equal the uninterrupted run's within 1e-5 relative and the re-saved
checkpoint holds bitwise the same atoms. Both expert layouts start from the same reference weights
(``reference_init.grouped_shard``), so their uninterrupted runs agree too.

Cost: two launches (one rank, then every two-rank run).
"""

import pytest
import torch

from campaign import ok, rel, run_campaign
from test_megatron_checkpoint import MODELS, SAVE_AFTER, TOL, Plan, _key, \
    assert_same_consolidated_state
from ucp_plugin.storage import Checkpoint
from ucp_plugin.tools.verify import verify

pytestmark = pytest.mark.slow
# 6 experts (3 per EP2 rank), 3 layers: the DistributedOptimizer splits a DP2 rank pair's expert
# buffer (3 layers x [6 weight2 blocks, 6 weight1 blocks]) half-way through a weight1 block; with an
# even number of layers, or 4 experts, the cut would fall on a block boundary by symmetry
SEQUENTIAL = dict(MODELS["mixtral"], experts=6, layers=3)
GROUPED = dict(SEQUENTIAL, grouped_mlp=True)
EP2DP2, DP2, TP2SP = {"dp": 2, "ep": 2}, {"dp": 2}, {"tp": 2, "sp": True}
# (label, source model, source layout, target model, target layout). The DistributedOptimizer is
# the default: at DP2 (expert DP 2) its shards cut GroupedMLP's blocks; at EP2·DP2 expert DP is 1.
TRANSITIONS = [("grouped-EP2DP2->sequential-DP2", GROUPED, EP2DP2, SEQUENTIAL, DP2),
               ("sequential-EP1->grouped-EP2DP2", SEQUENTIAL, {}, GROUPED, EP2DP2),
               ("grouped-distopt-DP2->grouped-TP2SP", GROUPED, DP2, GROUPED, TP2SP),
               ("grouped-EP2DP2->grouped-TP2SP", GROUPED, EP2DP2, GROUPED, TP2SP)]
FC1 = "decoder.layers.{layer}.mlp.experts.local_experts.{expert}.linear_fc1.weight"


def _source(model: dict, layout: dict) -> str:
    kind = "grouped" if model.get("grouped_mlp") else "sequential"
    return f"save:{kind}:{_key(layout)}"


def build_plan(root) -> Plan:
    plan = Plan(root)
    for _, model, layout, _, _ in TRANSITIONS:
        plan.save("mixtral", layout, model=model, name=_source(model, layout))
    for label, model, layout, target_model, target in TRANSITIONS:
        plan.load(f"load:{label}", _source(model, layout), target, model=target_model)
    return plan


@pytest.fixture(scope="module")
def campaign(tmp_path_factory):
    return run_campaign(build_plan(tmp_path_factory.mktemp("mg-grouped")).runs)


@pytest.mark.parametrize("label,model,source,target_model,target", TRANSITIONS, ids=[t[0] for t in TRANSITIONS])
def test_transition_resumes_exactly(campaign, label, model, source, target_model, target):
    saved = ok(campaign, _source(model, source))
    resumed = ok(campaign, f"load:{label}")
    assert resumed["iteration"] == SAVE_AFTER and resumed["extra"] == {"note": "test"}
    diff = rel(resumed["losses"], saved["losses"][SAVE_AFTER:])
    print(f"{label}: max relative loss difference {diff:.1e}")
    assert diff < TOL, f"{label}: relative loss difference {diff:.2e}"
    assert_same_consolidated_state(saved["path"], resumed["resaved"], config_may_differ=("grouped_mlp",))


def test_grouped_trains_like_sequential(campaign):
    """Same reference experts, same batches: GroupedMLP (CPU gmm) at EP2 and at DP2 follows the
    SequentialMLP's losses, so its blocks mean what the checkpoint says they mean."""
    ref = ok(campaign, _source(SEQUENTIAL, {}))["losses"]
    for layout in (EP2DP2, DP2):
        assert rel(ok(campaign, _source(GROUPED, layout))["losses"], ref) < TOL, layout


def test_grouped_checkpoint_holds_the_sequential_atoms(campaign):
    grouped = Checkpoint.open(ok(campaign, _source(GROUPED, EP2DP2))["path"])
    sequential = Checkpoint.open(ok(campaign, _source(SEQUENTIAL, {}))["path"])
    assert {a.name for a in grouped.manifest.atoms} == {a.name for a in sequential.manifest.atoms}
    assert not any(".experts.weight" in a.name for a in grouped.manifest.atoms)
    fc1 = grouped.manifest.atom(FC1.format(layer=2, expert=5))
    assert fc1.shape == (80, 32) and fc1.split == {"kind": "fused", "dim": 0, "parts": [40, 40], "num_parts": 2}
    for path in (grouped.path, ok(campaign, _source(GROUPED, DP2))["path"]):
        assert verify(path) == []


def test_distributed_optimizer_shards_cut_blocks(campaign):
    """At DP2 the DistributedOptimizer's two shards of the expert buffer split some expert's block:
    its atom then has pieces from both ranks, each a canonical rectangle, and still reads whole."""
    ck = Checkpoint.open(ok(campaign, _source(GROUPED, DP2))["path"])
    experts = [a for a in ck.manifest.atoms if ".local_experts." in a.name]
    cut = [a for a in experts if len({p.file for p in a.pieces if p.state == "exp_avg"}) > 1]
    assert cut, "no expert block was cut by the DistributedOptimizer's shards"
    for atom in cut:
        assert torch.isfinite(ck.read_atom(atom.name, "exp_avg")).all()


def test_cpu_gmm_is_one_matmul_per_expert_with_gradients():
    """The shim's stand-in for ``grouped_gemm.ops.gmm`` (pure function: nothing is installed)."""
    from ucp_plugin.testing.cpu_shim import gmm

    gen = torch.Generator().manual_seed(0)
    a = torch.randn(7, 3, generator=gen, requires_grad=True)
    b = torch.randn(3, 3, 4, generator=gen, requires_grad=True)
    sizes = torch.tensor([2, 0, 5])
    out = gmm(a, b, sizes)
    assert torch.equal(out, torch.cat([a[:2] @ b[0], a[2:] @ b[2]]))
    out.square().sum().backward()
    assert torch.equal(b.grad[1], torch.zeros(3, 4)) and b.grad[0].abs().sum() > 0
    assert torch.allclose(gmm(a, b.transpose(1, 2), sizes, trans_b=True), out)
    with pytest.raises(ValueError, match="batch_sizes"):
        gmm(a, b, torch.tensor([1, 1, 1]))
