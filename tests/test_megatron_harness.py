"""The Megatron training harness: batches, layout rules, the DistributedOptimizer step fix and its two
launcher entry points. That every layout trains alike (same seed, reference weights and global batch:
per-step losses within 1e-5 relative of TP1's) is checked by test_megatron_checkpoint's source runs."""
import os

import pytest

from ucp_plugin.errors import LayoutError
from ucp_plugin.format import MANIFEST
from ucp_plugin.megatron.layout import MegatronLayout
from ucp_plugin.models import ModelConfig
from ucp_plugin.testing.harness import TrainSettings, rank_micro_batches, token_batches
from ucp_plugin.testing.launcher import WorkerError, run_workers

SIZES = dict(hidden=32, heads=4, ffn=64, layers=4, vocab=100, divisible_by=32, seq_length=16)
MODELS = {"gpt": dict(SIZES, tied=True),
          "llama": dict(SIZES, query_groups=2, ffn=48),
          "mixtral": dict(SIZES, query_groups=2, ffn=48, experts=4, moe_ffn=40)}
SETTINGS = dict(steps=3, global_batch=4, lr=1e-2)


def _tokens(family):
    """One global batch repeated: the model memorises it, so the loss must go down."""
    batch = token_batches(ModelConfig(**MODELS[family]), TrainSettings(**dict(SETTINGS, steps=1)))[0]
    return [batch.tolist()] * SETTINGS["steps"]


def _train(family, layout):
    kwargs = {"family": family, "model": MODELS[family], "layout": layout, "settings": SETTINGS,
              "tokens": _tokens(family)}
    out = run_workers(MegatronLayout(**layout).world_size, "ucp_plugin.testing.harness:train_worker",
                      kwargs, timeout=600)
    assert all(o["losses"] == out[0]["losses"] for o in out), "ranks disagree on the step losses"
    return out


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
def test_distributed_optimizer_resume_needs_the_step_fix():
    """megatron's DistributedOptimizer.load_state_dict gives all parameters one shared AdamW `step`
    (torch fallback without apex/TE); distopt_fixes gives each its own again."""
    env = {"PYTHONPATH": os.path.dirname(__file__) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    kwargs = {"family": "gpt", "model": MODELS["gpt"], "layout": {"dp": 2}, "settings": SETTINGS,
              "resume_after": 1}
    out = run_workers(2, "mg_workers:step_fix_runs", kwargs, timeout=600, env=env)[0]
    fixed, broken, uninterrupted = out["fixed"], out["broken"], out["uninterrupted"]
    assert fixed["shared_steps_after_load"] == 0 and broken["shared_steps_after_load"] > 0
    assert fixed["losses"] == uninterrupted
    rel = abs(broken["losses"][-1] - uninterrupted[-1]) / uninterrupted[-1]
    assert rel > 1e-5, f"the shared step should visibly change the loss, changed it by {rel:.1e}"


@pytest.mark.slow
def test_train_worker_runs_one_layout():
    """The recipes' entry point: a TP1 run that learns its repeated batch (the layouts agree with each
    other: test_megatron_checkpoint)."""
    out = _train("gpt", {})
    assert out[0]["losses"][-1] < out[0]["losses"][0], f"the model does not learn: {out[0]['losses']}"
    assert out[0]["layers"] == [0, 1, 2, 3] and out[0]["experts"] == []


@pytest.mark.slow
def test_resume_worker_refuses_a_bad_layout_before_initialising(tmp_path):
    """The layout is checked on the checkpoint's manifest (a folder holding only ucp.json here) before
    the workers initialise torch.distributed or megatron."""
    from test_megatron_validate import manifest

    (tmp_path / MANIFEST).write_text(manifest("gpt").to_json())
    kwargs = {"family": "gpt", "model": MODELS["gpt"], "layout": {"tp": 3}, "load_dir": str(tmp_path)}
    with pytest.raises(WorkerError, match="cannot be loaded at TP=3 PP=1 EP=1") as e:
        run_workers(3, "ucp_plugin.testing.harness:resume_worker", kwargs, timeout=300)
    assert "TP in [1, 2, 4]" in str(e.value)
