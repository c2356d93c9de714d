"""The Megatron harness trains the same model identically at every layout: with the same seed, the
same reference initial weights and the same global batch, per-step losses of TP2, PP2, DP2, EP2, SP,
uneven-PP runs agree with the TP1 run within 1e-5 relative (measured: ~1e-8, fp32 rounding)."""
import os

import pytest

from ucp_plugin.errors import LayoutError
from ucp_plugin.launcher import run_workers
from ucp_plugin.megatron.harness import TrainSettings, rank_micro_batches, token_batches
from ucp_plugin.megatron.layout import MegatronLayout
from ucp_plugin.models import ModelConfig

TOL = 1e-5
SIZES = dict(hidden=32, heads=4, ffn=64, layers=4, vocab=100, divisible_by=32, seq_length=16)
MODELS = {"gpt": dict(SIZES, tied=True),
          "llama": dict(SIZES, query_groups=2, ffn=48),
          "mixtral": dict(SIZES, query_groups=2, ffn=48, experts=4, moe_ffn=40)}
SETTINGS = dict(steps=3, global_batch=4, lr=1e-2)


def _tokens(family):
    """One global batch repeated: the model memorises it, so the loss must go down."""
    batch = token_batches(ModelConfig(**MODELS[family]), TrainSettings(**dict(SETTINGS, steps=1)))[0]
    return [batch.tolist()] * SETTINGS["steps"]


def _train(family, layout, overrides=None, tokens=True):
    """``tokens=True``: one batch repeated; None: the harness's fresh batch per step."""
    kwargs = {"family": family, "model": MODELS[family], "layout": layout, "settings": SETTINGS,
              "tokens": _tokens(family) if tokens else None, "overrides": overrides}
    out = run_workers(MegatronLayout(**layout).world_size, "ucp_plugin.megatron.harness:train_worker",
                      kwargs, timeout=600)
    assert all(o["losses"] == out[0]["losses"] for o in out), "ranks disagree on the step losses"
    return out


def _assert_close(losses, reference):
    rel = max(abs(a - b) / abs(b) for a, b in zip(losses, reference))
    assert rel < TOL, f"relative loss difference {rel:.2e} >= {TOL}: {losses} vs {reference}"


@pytest.fixture(scope="module")
def baseline():
    cache = {}

    def get(family):
        if family not in cache:
            cache[family] = _train(family, {})[0]
        return cache[family]
    return get


@pytest.mark.slow
def test_gpt_tp2_and_pp2_match_tp1(baseline):
    ref = baseline("gpt")
    assert ref["losses"][-1] < ref["losses"][0], f"the model does not learn: {ref['losses']}"
    tp2 = _train("gpt", {"tp": 2})
    pp2 = _train("gpt", {"pp": 2})
    _assert_close(tp2[0]["losses"], ref["losses"])
    _assert_close(pp2[0]["losses"], ref["losses"])
    # the tied output layer lives on the last stage as its own parameter: one more than at PP1
    assert [o["layers"] for o in pp2] == [[0, 1], [2, 3]]
    assert sum(o["num_params"] for o in pp2) == ref["num_params"] + 1
    assert tp2[0]["num_params"] == ref["num_params"]


@pytest.mark.slow
@pytest.mark.parametrize("family,layout", [
    ("gpt", {"dp": 2, "optimizer": "ddp"}),
    ("llama", {"tp": 2, "sp": True}),
    ("llama", {"pp": 2, "first_stage_layers": 1}),
    ("mixtral", {"dp": 2, "ep": 2}),
    ("mixtral", {"tp": 2, "sp": True}),
])
def test_other_layouts_match_tp1(baseline, family, layout):
    out = _train(family, layout)
    _assert_close(out[0]["losses"], baseline(family)["losses"])
    if layout.get("ep"):
        assert [o["experts"] for o in out] == [[0, 1], [2, 3]]
    if layout.get("first_stage_layers"):
        assert [o["layers"] for o in out] == [[0], [1, 2, 3]]


def test_micro_batches_hold_the_same_sequences_at_every_dp():
    cfg, settings = ModelConfig(**MODELS["gpt"]), TrainSettings(steps=1, global_batch=4)
    step = token_batches(cfg, settings)[0]
    one = [mb["tokens"] for mb in rank_micro_batches(step, settings, 0, 1)]
    two = [mb["tokens"] for r in (0, 1) for mb in rank_micro_batches(step, settings, r, 2)]
    assert all((a == b).all() for a, b in zip(one, two)) and len(one) == len(two) == 4
    assert settings.micro_batches(2) == 2
    with pytest.raises(LayoutError, match="global_batch=4"):
        settings.micro_batches(3)


def test_layout_validation_names_the_fix():
    with pytest.raises(LayoutError, match="EP=2 must divide DP=1"):
        MegatronLayout(ep=2)
    with pytest.raises(LayoutError, match="sp=True"):
        MegatronLayout(tp=2, dp=2, ep=2).check_model(layers=2, experts=4)
    with pytest.raises(LayoutError, match="first_stage_layers=2"):
        MegatronLayout(pp=2, first_stage_layers=2, last_stage_layers=2).check_model(layers=3, experts=0)
    with pytest.raises(LayoutError, match="sequence parallelism"):
        MegatronLayout(sp=True)
    MegatronLayout(pp=3, first_stage_layers=1, last_stage_layers=1).check_model(layers=5, experts=0)


@pytest.mark.slow
def test_distributed_optimizer_resume_needs_the_step_fix(baseline):
    """megatron's DistributedOptimizer.load_state_dict gives all parameters one shared AdamW `step`
    (torch fallback without apex/TE); distopt_fixes gives each its own again."""
    env = {"PYTHONPATH": os.path.dirname(__file__) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    kwargs = {"family": "gpt", "model": MODELS["gpt"], "layout": {"dp": 2}, "settings": SETTINGS,
              "resume_after": 1}
    fixed = run_workers(2, "mg_workers:resume_in_place", dict(kwargs, fix=True), timeout=600, env=env)
    broken = run_workers(2, "mg_workers:resume_in_place", dict(kwargs, fix=False), timeout=600, env=env)
    uninterrupted = _train("gpt", {"dp": 2}, tokens=None)[0]["losses"]
    assert fixed[0]["shared_steps_after_load"] == 0 and broken[0]["shared_steps_after_load"] > 0
    assert fixed[0]["losses"] == uninterrupted
    rel = abs(broken[0]["losses"][-1] - uninterrupted[-1]) / uninterrupted[-1]
    assert rel > 1e-5, f"the shared step should visibly change the loss, changed it by {rel:.1e}"
