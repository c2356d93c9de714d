"""Megatron-DeepSpeed: megatron-core GPT models trained by a DeepSpeed engine (``mpu=MegatronMPU()``,
ZeRO over megatron's data-parallel group), saved with ``engine.save_checkpoint`` under
``"checkpoint": {"universal": true}`` and resumed at another TP x DP x ZeRO stage, and across
frameworks: megatron's own optimizer resumes a DeepSpeed-engine checkpoint and the other way round
(one format, megatron's atom names).

Checked as in test_megatron_checkpoint.py: resumed per-step losses equal the uninterrupted run within
1e-5 relative over 5 steps (bf16: 1e-3, as for plain DeepSpeed), and a load followed at once by a save
gives bitwise the same atoms (every state, scalars). Unsupported set-ups are refused at
``deepspeed.initialize`` with the setting named.
"""
import os

import pytest

from campaign import assert_same_atoms, ok, rel, run_campaign
from ucp_plugin.errors import LayoutError
from ucp_plugin.megatron.layout import MegatronLayout
from ucp_plugin.megatron.validate import validate_layout
from ucp_plugin.storage import Checkpoint

pytestmark = pytest.mark.slow
TOL, BF16_TOL = 1e-5, 1e-3
SAVE_AFTER = 2
SETTINGS = dict(steps=SAVE_AFTER + 5, global_batch=4, lr=1e-2)
SIZES = dict(hidden=32, heads=4, ffn=64, layers=2, vocab=100, divisible_by=32, seq_length=16)
MODELS = {"gpt": dict(SIZES, tied=True), "llama": dict(SIZES, query_groups=2, ffn=48),
          "mixtral": dict(SIZES, query_groups=2, ffn=48, experts=4, moe_ffn=40)}
# (id, runner, family, layout, source run id or None, model size overrides)
RUNS = [
    ("ds:llama:tp2dp2z1", "ds_save", "llama", dict(tp=2, dp=2, zero_stage=1), None, {}),
    ("ds:llama:tp2dp2z1->tp1dp4z2", "ds_load", "llama", dict(tp=1, dp=4, zero_stage=2), "ds:llama:tp2dp2z1", {}),
    ("ds:llama:tp2dp2z1->tp2dp1z2", "ds_load", "llama", dict(tp=2, dp=1, zero_stage=2), "ds:llama:tp2dp2z1", {}),
    ("ds:llama:tp2dp2z1->tp1dp2z0", "ds_load", "llama", dict(tp=1, dp=2, zero_stage=0), "ds:llama:tp2dp2z1", {}),
    ("ds:llama:tp2dp2z1->mg:tp2pp2", "mg_load", "llama", dict(tp=2, pp=2), "ds:llama:tp2dp2z1", {}),
    ("mg:llama:tp2dp2", "mg_save", "llama", dict(tp=2, dp=2), None, {}),
    ("mg:llama:tp2dp2->ds:tp1dp4z1", "ds_load", "llama", dict(tp=1, dp=4, zero_stage=1), "mg:llama:tp2dp2", {}),
    ("ds:gpt:tp2dp2z2", "ds_save", "gpt", dict(tp=2, dp=2, zero_stage=2), None, {}),
    ("ds:gpt:tp2dp2z2->tp1dp4z1", "ds_load", "gpt", dict(tp=1, dp=4, zero_stage=1), "ds:gpt:tp2dp2z2", {}),
    ("ds:llama:tp2dp2z1->tp2dp2z3", "ds_load", "llama", dict(tp=2, dp=2, zero_stage=3), "ds:llama:tp2dp2z1", {}),
    ("ds:llama:tp2dp2z3", "ds_save", "llama", dict(tp=2, dp=2, zero_stage=3), None, {}),
    ("ds:llama:tp2dp2z3->tp1dp4z1", "ds_load", "llama", dict(tp=1, dp=4, zero_stage=1), "ds:llama:tp2dp2z3", {}),
    ("ds:gpt:tp2dp2z2->tp2dp1z3", "ds_load", "gpt", dict(tp=2, dp=1, zero_stage=3), "ds:gpt:tp2dp2z2", {}),
    ("ds:gpt:bf16:tp2dp2z1", "ds_save", "gpt", dict(tp=2, dp=2, zero_stage=1, bf16=True), None, {}),
    ("ds:gpt:bf16:tp2dp2z1->tp1dp4z2", "ds_load", "gpt", dict(tp=1, dp=4, zero_stage=2, bf16=True),
     "ds:gpt:bf16:tp2dp2z1", {}),
]
# loads that must fail: (id, family, engine layout, source, model size overrides, message)
WRONG = [("ds:llama:tp2dp2z1->fewer-layers", "llama", dict(tp=1, dp=4, zero_stage=2), "ds:llama:tp2dp2z1",
          {"layers": 1}, "the checkpoint has parameters this model lacks: ['decoder.layers.1."),
         ("ds:llama:tp2dp2z1->wider-ffn", "llama", dict(tp=2, dp=2, zero_stage=1), "ds:llama:tp2dp2z1",
          {"ffn": 64}, "shape mismatch (atom, checkpoint, this model)")]
TRANSITIONS = [r[0] for r in RUNS if r[4] is not None]
# (name, family, megatron layout, ZeRO stage, where refused, message). Sequence parallelism and MoE
# show only on the model: refused right after DeepSpeed wraps it, still inside deepspeed.initialize.
REFUSED = [("pp2", "llama", dict(pp=2, dp=2), 1, "initialize", "pipeline parallelism of a megatron-core model"),
           ("sp", "llama", dict(tp=2, sp=True, dp=2), 1, "initialize", "sequence parallelism of a megatron-core model"),
           ("moe", "mixtral", dict(dp=4), 1, "initialize", "MoE layers of a megatron-core model")]


def _world(runner: str, layout: dict) -> int:
    if runner.startswith("ds"):
        return layout["tp"] * layout["dp"]
    return MegatronLayout(**layout).world_size


def build_runs(root) -> list[dict]:
    runs, by_id = [], {}
    wrong = [(rid, "ds_load", family, layout, source, sizes) for rid, family, layout, source, sizes, _ in WRONG]
    for rid, runner, family, layout, source, sizes in RUNS + wrong:
        folder = str(root / rid.replace(":", "_").replace(">", ""))
        model = {**MODELS[family], **sizes}
        if source is None:
            args = dict(family=family, model=model, layout=layout, settings=SETTINGS, root=folder,
                        save_after=SAVE_AFTER)
        else:
            args = dict(family=family, model=model, layout=layout, settings=SETTINGS,
                        root=by_id[source]["args"]["root"], resave_root=folder)
        run = {"id": rid, "kind": runner, "world": _world(runner, layout), "after": source, "args": args}
        by_id[rid] = run
        runs.append(run)
    for name, family, layout, stage, _, _ in REFUSED:
        runs.append({"id": f"refused:{name}", "kind": "ds_refused", "world": MegatronLayout(**layout).world_size,
                     "after": None, "args": dict(family=family, model=MODELS[family], layout=layout,
                                                 zero_stage=stage, root=str(root / f"refused_{name}"))})
    return runs


@pytest.fixture(scope="module")
def campaign(tmp_path_factory):
    return run_campaign(build_runs(tmp_path_factory.mktemp("mgds")), "mgds_workers:run_plan",
                        env={"DS_ACCELERATOR": "cpu"})


@pytest.mark.parametrize("rid", TRANSITIONS)
def test_transition_resumes_exactly(campaign, rid):
    run = next(r for r in RUNS if r[0] == rid)
    saved, resumed = ok(campaign, run[4]), ok(campaign, rid)
    assert resumed["iteration"] == SAVE_AFTER
    diff = rel(resumed["losses"], saved["losses"][SAVE_AFTER:])
    tol = BF16_TOL if run[3].get("bf16") else TOL
    print(f"{rid}: max relative loss difference over {len(resumed['losses'])} steps {diff:.1e}")
    assert diff < tol, f"{rid}: relative loss difference {diff:.2e}"
    assert_same_atoms(saved["path"], resumed["resaved"])


def test_client_state_and_manifest(campaign):
    resumed = ok(campaign, "ds:llama:tp2dp2z1->tp1dp4z2")
    assert resumed["client"] == {"note": "test"}
    assert ok(campaign, "mg:llama:tp2dp2->ds:tp1dp4z1")["client"] == {"note": "test"}  # megatron's extra
    manifest = Checkpoint.open(ok(campaign, "ds:llama:tp2dp2z1")["path"]).manifest
    assert manifest.writer.adapter == "deepspeed.megatron" and manifest.family == "llama"
    assert (manifest.layout.tp, manifest.layout.dp, manifest.layout.zero_stage) == (2, 2, 1)
    assert {"embedding.word_embeddings.weight@vocab_padding", "output_layer.weight"} <= \
        {a.name for a in manifest.atoms}


def test_deepspeed_engine_trains_as_megatron_does(campaign):
    """Same reference weights, batches and AdamW: DeepSpeed's ZeRO-1 at TP2 x DP2 (gradient norm over
    the TP group through ``MegatronMPU``, clipping active) and megatron's DistributedOptimizer give the
    same losses to rounding (1e-6: a real difference, e.g. weight decay on the norms in one of them,
    shows from the second step on as ~1e-6 and grows)."""
    ds, mg = ok(campaign, "ds:llama:tp2dp2z1")["losses"], ok(campaign, "mg:llama:tp2dp2")["losses"]
    assert ds[-1] < ds[0], f"does not learn: {ds}"
    assert rel(ds, mg) < 1e-6, (ds, mg)


@pytest.mark.parametrize("rid,family,layout,source,sizes,text", WRONG, ids=[w[0] for w in WRONG])
def test_loading_another_model_is_refused_with_the_parameters(campaign, rid, family, layout, source, sizes,
                                                               text):
    errors = [r.get("error") or "" for r in campaign[rid]]  # the others re-raise rank 0's (comm.Comm)
    assert all(text in e for e in errors), errors
    assert errors[0].startswith("StateMismatchError") and "/iter_0000002" in errors[0], errors[0]


@pytest.mark.parametrize("name,family,layout,stage,at,text", REFUSED, ids=[r[0] for r in REFUSED])
def test_unsupported_setups_are_refused(campaign, name, family, layout, stage, at, text):
    results = {(r["error"], r["at"]) for r in campaign[f"refused:{name}"]}
    assert len(results) == 1, results
    error, where = results.pop()
    assert error is not None and error.startswith("UnsupportedError") and text in error \
        and 'remove "universal"' in error, error
    assert where == at, (where, error)
    assert not os.path.exists(os.path.join(campaign[f"refused:{name}"][0]["root"], "latest"))


def test_target_layout_checked_from_the_manifest(campaign):
    path = ok(campaign, "ds:llama:tp2dp2z1")["path"]
    with pytest.raises(LayoutError, match=r"TP=3 .* valid TP sizes|cannot be loaded at TP=3") as info:
        validate_layout(path, MegatronLayout(tp=3))
    assert "Valid sizes for this model: TP in [1, 2]" in str(info.value)
