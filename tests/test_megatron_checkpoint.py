"""Megatron universal checkpoints across layouts: the transition matrix.

For each family (GPT, LLaMA, Mixtral) a run saves after 2 steps at a source layout and trains on
(the uninterrupted run); a model built at the target layout with its own (different) initial weights
loads it, re-saves at once to a second folder before any step, and trains 5 more steps. Checked:
the resumed losses equal the uninterrupted ones within 1e-5 relative (measured 0 to ~1e-7), and the
re-saved checkpoint holds bitwise the same consolidated state (``Checkpoint.read_atom`` of every
atom and state, scalars, common state). Not compared, because they describe the layout rather than
the model: the manifest's layout and pieces (which rank wrote which range), the per-rank RNG states
(one per rank of each layout) and how the optimizer's param groups are split among megatron's
chained optimizers (with EP > 1 experts get their own optimizer): their hyper-parameters are compared
as a set.

Cost: every run of one world size goes into one launch (``mg_workers.schedule``/``run_plan``):
4 launches for all transitions plus the checks below (weights-only, wrong model, bf16, a refused
layout).
"""
import json

import pytest
import torch

from campaign import assert_same_atoms, model_record, ok, rel, run_campaign
from ucp_plugin.megatron.layout import MegatronLayout
from ucp_plugin.storage import Checkpoint
from ucp_plugin.tools.verify import verify

pytestmark = pytest.mark.slow
TOL = 1e-5
SAVE_AFTER, RESUMED = 2, 5
SETTINGS = dict(steps=SAVE_AFTER + RESUMED, global_batch=4, lr=1e-2)
SIZES = dict(hidden=32, heads=4, ffn=64, layers=4, vocab=100, divisible_by=32, seq_length=16)
MODELS = {"gpt": dict(SIZES, tied=True),
          "llama": dict(SIZES, query_groups=2, ffn=48),
          "mixtral": dict(SIZES, query_groups=2, ffn=48, experts=4, moe_ffn=40)}
DENSE = [("TP2->TP1", {"tp": 2}, {}),
         ("TP1->TP2", {}, {"tp": 2}),
         ("PP2->PP1", {"pp": 2}, {}),
         ("PP1->PP2-uneven", {}, {"pp": 2, "first_stage_layers": 1}),
         ("TP2PP2->DP4", {"tp": 2, "pp": 2}, {"dp": 4}),
         ("SP-on->off", {"tp": 2, "sp": True}, {"tp": 2})]
# megatron refuses MoE with TP > 1 without sequence parallelism: Mixtral's TP2 is TP2 with SP
MOE = [("TP2->TP1", {"tp": 2, "sp": True}, {}),
       ("TP1->TP2", {}, {"tp": 2, "sp": True}),
       ("PP2->PP1", {"pp": 2}, {}),
       ("PP1->PP2-uneven", {}, {"pp": 2, "first_stage_layers": 3}),
       ("TP2PP2->DP4", {"tp": 2, "pp": 2, "sp": True}, {"dp": 4}),
       ("SP-on->off", {"tp": 2, "sp": True}, {"dp": 2}),
       ("EP2->EP1", {"dp": 2, "ep": 2}, {"dp": 2}),
       ("EP1->EP2", {}, {"dp": 2, "ep": 2}),
       ("EP2DP2->TP2", {"dp": 2, "ep": 2}, {"tp": 2, "sp": True}),
       # expert TP x EP = 4: the dispatcher's uneven token gathers (cpu_shim step 5)
       ("TP2SP-EP2->DP4", {"tp": 2, "sp": True, "dp": 2, "ep": 2}, {"dp": 4}),
       ("TP1->TP2SP-EP2", {}, {"tp": 2, "sp": True, "dp": 2, "ep": 2})]
MATRIX = [("gpt", *t) for t in DENSE] + [("llama", *t) for t in DENSE] + [("mixtral", *t) for t in MOE]


def _key(layout: dict) -> str:
    return MegatronLayout(**layout).describe()


class Plan:
    """The runs of the campaign, named, each with its world size and the save it loads."""

    def __init__(self, root):
        self.root, self.runs = root, []

    def save(self, family, layout, model=None, settings=None, optimizer=True, name=None, **extra) -> str:
        rid = name or f"save:{family}:{_key(layout)}"
        if not any(r["id"] == rid for r in self.runs):
            args = dict(family=family, model=model or MODELS[family], layout=layout,
                        settings=settings or SETTINGS, root=str(self.root / rid.replace(":", "_")),
                        save_after=SAVE_AFTER, optimizer=optimizer, **extra)
            self._add(rid, "save", layout, None, args)
        return rid

    def load(self, rid, source, layout, family=None, model=None, resave=True, **extra):
        src = next(r for r in self.runs if r["id"] == source)["args"]
        resave_root = str(self.root / rid.replace(":", "_").replace(">", "")) if resave else None
        args = dict(family=family or src["family"], model=model or src["model"], layout=layout,
                    settings=src["settings"], root=src["root"], resave_root=resave_root, **extra)
        self._add(rid, "load", layout, source, args)
        return rid

    def _add(self, rid, kind, layout, after, args):
        self.runs.append({"id": rid, "kind": kind, "world": MegatronLayout(**layout).world_size,
                          "after": after, "args": args})


def build_plan(root) -> Plan:
    plan = Plan(root)
    for family, label, source, target in MATRIX:
        plan.save(family, source)
    plan.save("llama", {"tp": 2, "sp": True}, optimizer=False, name="save:llama:weights-only")
    bf16 = dict(SETTINGS, bf16=True)
    plan.save("gpt", {"tp": 2}, settings=bf16, name="save:gpt:bf16")
    plan.save("llama", {"tp": 2}, name="save:llama:async", async_save=True)  # written while training goes on
    for family, label, source, target in MATRIX:
        plan.load(f"load:{family}:{label}", f"save:{family}:{_key(source)}", target)
    plan.load("load:llama:weights-only", "save:llama:weights-only", {"pp": 2}, resave=False)
    plan.load("load:gpt:bf16-same", "save:gpt:bf16", {"tp": 2})
    plan.load("load:gpt:bf16-other", "save:gpt:bf16", {"dp": 2, "optimizer": "ddp"})
    plan.load("load:llama:async-TP2->TP1", "save:llama:async", {})
    gpt_tp1 = f"save:gpt:{_key({})}"
    plan.load("load:wrong-family", gpt_tp1, {}, family="llama", model=MODELS["llama"], resave=False)
    plan.load("load:wrong-shape", gpt_tp1, {}, model=dict(MODELS["gpt"], ffn=32), resave=False)
    plan.load("load:bad-layout:tp4", f"save:llama:{_key({})}", {"tp": 4}, resave=False)
    plan.load("load:bad-layout:moe-tp2-no-sp", f"save:mixtral:{_key({})}", {"tp": 2}, resave=False)
    # vocabulary 100 padded to 112 rows at TP1, to 128 at TP2 (divisible_by=16)
    padded = dict(MODELS["gpt"], divisible_by=16)
    plan.save("gpt", {}, model=padded, name="save:gpt:plain", plain=True)
    plan.save("gpt", {}, model=padded, name="save:gpt:described")
    plan.load("load:gpt:plain-same", "save:gpt:plain", {"dp": 2}, resave=False, plain=True)
    plan.load("load:gpt:plain-recut-unknown", "save:gpt:plain", {"tp": 2}, resave=False, plain=True)
    plan.load("load:gpt:plain-recut", "save:gpt:plain", {"tp": 2}, resave=False, plain=True, vocab=100)
    plan.load("load:gpt:described-recut", "save:gpt:described", {"tp": 2}, resave=False)
    return plan


@pytest.fixture(scope="module")
def campaign(tmp_path_factory):
    """{run id: [per-rank result]} of every run of the plan."""
    return run_campaign(build_plan(tmp_path_factory.mktemp("mg-campaign")).runs)


def _hyper_set(common: dict) -> set:
    groups = (common.get("optimizer") or {}).get("param_groups") or []
    return {json.dumps({k: v for k, v in g.items() if k != "is_expert_parallel"}, sort_keys=True)
            for inner in groups for g in inner}


def assert_same_consolidated_state(saved: str, resaved: str, config_may_differ: tuple[str, ...] = ()) -> None:
    """``config_may_differ``: ModelConfig fields that name an implementation, not the model
    (``grouped_mlp``: the expert layout, which stores the same atoms)."""
    a, b = assert_same_atoms(saved, resaved, config_may_differ)
    ca, cb = (model_record(c.load_state(), config_may_differ) for c in (a, b))
    assert _hyper_set(ca) == _hyper_set(cb)
    # the seed a reshard re-seeded this job from (checkpoint.reseed) is the job's, not the model's
    drop = ("optimizer", "rng_seed")
    assert {k: v for k, v in ca.items() if k not in drop} == {k: v for k, v in cb.items() if k not in drop}
    assert ca["optimizer"]["grad_scaler"] == cb["optimizer"]["grad_scaler"]


@pytest.mark.parametrize("family,label,source,target", MATRIX, ids=[f"{f}-{l}" for f, l, _, _ in MATRIX])
def test_transition_resumes_exactly(campaign, family, label, source, target):
    saved = ok(campaign, f"save:{family}:{_key(source)}")
    resumed = ok(campaign, f"load:{family}:{label}")
    assert resumed["iteration"] == SAVE_AFTER and resumed["extra"] == {"note": "test"}
    diff = rel(resumed["losses"], saved["losses"][SAVE_AFTER:])
    print(f"{family} {label} ({_key(source)} -> {_key(target)}): max relative loss difference {diff:.1e}")
    assert diff < TOL, f"{family} {label}: relative loss difference {diff:.2e}"
    assert_same_consolidated_state(saved["path"], resumed["resaved"])


def test_async_save_resumes_as_the_sync_one(campaign):
    """llama TP2 saved asynchronously: the same losses and bit-for-bit the same checkpoint as the
    synchronous save of the same run, and its TP1 resume as exact as the synchronous TP2->TP1."""
    sync, other = ok(campaign, f"save:llama:{_key({'tp': 2})}"), ok(campaign, "save:llama:async")
    assert other["losses"] == sync["losses"]
    assert_same_consolidated_state(sync["path"], other["path"])
    resumed = ok(campaign, "load:llama:async-TP2->TP1")
    assert resumed["iteration"] == SAVE_AFTER and resumed["extra"] == {"note": "test"}
    assert resumed["losses"] == ok(campaign, "load:llama:TP2->TP1")["losses"]
    assert rel(resumed["losses"], other["losses"][SAVE_AFTER:]) < TOL
    assert_same_consolidated_state(other["path"], resumed["resaved"])


def test_every_layout_trains_alike(campaign):
    """Same reference weights and batches: every source layout's 7 losses match TP1's."""
    for family in MODELS:
        ref = ok(campaign, f"save:{family}:{_key({})}")
        assert ref["losses"][-1] < ref["losses"][0], f"{family} does not learn: {ref['losses']}"
        for rid in [r for r in campaign if r.startswith(f"save:{family}:tp")]:
            assert rel(ok(campaign, rid)["losses"], ref["losses"]) < TOL, rid


def test_the_bitwise_check_tells_trainings_apart(campaign):
    """Two trainings at different layouts agree to ~1e-8 but not bitwise (reductions round
    differently): a load + re-save is bitwise equal because it copies, not by luck."""
    a = Checkpoint.open(ok(campaign, f"save:gpt:{_key({})}")["path"])
    b = Checkpoint.open(ok(campaign, f"save:gpt:{_key({'tp': 2})}")["path"])
    pairs = [(atom.name, s) for atom in a.manifest.atoms for s in atom.states]
    differ = sum(not torch.equal(a.read_atom(n, s), b.read_atom(n, s)) for n, s in pairs)
    assert differ > len(pairs) // 2, f"only {differ} of {len(pairs)} atom states differ"


def test_stages_and_experts_are_where_megatron_puts_them(campaign):
    layers = lambda rid: [r["layers"] for r in campaign[rid]]  # noqa: E731
    assert layers(f"save:gpt:{_key({'pp': 2})}") == [[0, 1], [2, 3]]
    assert layers("load:llama:PP1->PP2-uneven") == [[0], [1, 2, 3]]
    assert layers("load:mixtral:PP1->PP2-uneven") == [[0, 1, 2], [3]]
    assert [r["experts"] for r in campaign["load:mixtral:EP1->EP2"]] == [[0, 1], [2, 3]]
    # a tied output layer is its own parameter on the last stage: one more than at PP1
    pp2 = campaign[f"save:gpt:{_key({'pp': 2})}"]
    assert sum(r["num_params"] for r in pp2) == campaign[f"save:gpt:{_key({})}"][0]["num_params"] + 1


def test_manifest_atoms_and_verify(campaign):
    path = ok(campaign, f"save:gpt:{_key({'tp': 2})}")["path"]
    assert verify(path) == []
    m = Checkpoint.open(path).manifest
    atoms = {a.name: a for a in m.atoms}
    assert (m.layout.tp, m.layout.zero_stage, m.family, m.iteration) == (2, 1, "gpt", SAVE_AFTER)
    emb = atoms["embedding.word_embeddings.weight"]
    assert emb.shape == (100, 32) and emb.split["kind"] == "vocab_partitioned"
    assert set(emb.states) == {"fp32", "exp_avg", "exp_avg_sq"} and emb.scalars == {"step": SAVE_AFTER}
    # megatron pads 100 -> 128 rows; the trained padding rows are kept beside the real ones
    assert atoms["embedding.word_embeddings.weight@vocab_padding"].shape == (28, 32)
    assert "output_layer.weight" not in atoms  # tied: the embedding's atom
    qkv = atoms["decoder.layers.3.self_attention.linear_qkv.weight"]
    assert qkv.shape == (96, 32) and {p.region.intervals for p in qkv.pieces if p.state == "fp32"} == \
        {((0, 48),), ((48, 96),)}


def test_weights_only_checkpoint_resumes_the_forward(campaign):
    saved = ok(campaign, "save:llama:weights-only")
    assert all(set(a.states) == {"fp32"} for a in Checkpoint.open(saved["path"]).manifest.atoms)
    resumed = ok(campaign, "load:llama:weights-only")
    # same weights: the first resumed loss matches; the optimizer then starts afresh
    assert rel(resumed["losses"][:1], saved["losses"][SAVE_AFTER:SAVE_AFTER + 1]) < TOL


def test_bf16_resume_uses_the_fp32_masters(campaign):
    """bf16 parameters, fp32 masters: the same layout resumes bit-exactly; another layout (and the
    other optimizer kind) within bf16's layout-to-layout rounding; both re-save the same state."""
    saved = ok(campaign, "save:gpt:bf16")
    same, other = ok(campaign, "load:gpt:bf16-same"), ok(campaign, "load:gpt:bf16-other")
    assert same["losses"] == saved["losses"][SAVE_AFTER:]
    assert rel(other["losses"], saved["losses"][SAVE_AFTER:]) < 1e-4
    assert_same_consolidated_state(saved["path"], same["resaved"])
    assert_same_consolidated_state(saved["path"], other["resaved"])


def test_loading_another_model_names_the_missing_parameters(campaign):
    assert "checkpoint lacks" in campaign["load:wrong-family"][0]["error"]
    assert "shape mismatch" in campaign["load:wrong-shape"][0]["error"]


def test_refused_layouts_fail_before_building(campaign):
    """The harness's resume validates the target layout on the manifest before building anything."""
    tp4 = campaign["load:bad-layout:tp4"][0]["error"]
    assert tp4.startswith("LayoutError: ") and "cannot be loaded at TP=4 PP=1 EP=1" in tp4
    assert "TP=4 does not divide its 2 groups" in tp4 and "TP in [1, 2]" in tp4
    no_sp = campaign["load:bad-layout:moe-tp2-no-sp"][0]["error"]
    assert "set sp=True" in no_sp and "TP in [1, 2]" in no_sp


def test_padded_vocabulary_without_ceremony(campaign):
    """``save_universal(model, optimizer, dir, tag, iteration)`` on a GPTModel whose vocabulary is padded,
    nothing said about the model: the padded rows are saved as the vocabulary; a load at the same
    padded size needs nothing either and resumes exactly; a load that re-cuts the padded rows asks
    for the true size, naming both padded sizes, and with it loads the same model as a checkpoint
    saved with the full description."""
    plain, described = ok(campaign, "save:gpt:plain"), ok(campaign, "save:gpt:described")
    assert plain["losses"] == described["losses"]  # the same training; only the save call differs
    manifest = Checkpoint.open(plain["path"]).manifest
    assert manifest.model["padded_vocab"] == 112 and manifest.family == "gpt"
    assert manifest.atom("embedding.word_embeddings.weight").shape == (112, 32)
    assert not any(a.name.endswith("@vocab_padding") for a in manifest.atoms)
    same = ok(campaign, "load:gpt:plain-same")
    assert rel(same["losses"], plain["losses"][SAVE_AFTER:]) < TOL
    unknown = campaign["load:gpt:plain-recut-unknown"][0]["error"]
    assert unknown.startswith("UnsupportedError: ") and "padded to 112 rows" in unknown
    assert "pads it to 128 rows" in unknown and "vocab=N" in unknown
    recut, reference = ok(campaign, "load:gpt:plain-recut"), ok(campaign, "load:gpt:described-recut")
    assert recut["iteration"] == reference["iteration"] == SAVE_AFTER
    assert rel(recut["losses"], reference["losses"]) < TOL

