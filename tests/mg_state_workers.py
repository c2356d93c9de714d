"""Workers for tests/test_megatron_state.py: megatron runs with overrides (dropout, the router's
expert bias) and, optionally, an optimizer with TE FusedAdam's per-group ``step``."""
from __future__ import annotations

import warnings
from contextlib import nullcontext

warnings.filterwarnings("ignore")  # megatron warns about missing apex/TE at every import


def _optimizer_kind(group_step: bool):
    from ucp_plugin.testing.group_step_adam import as_megatron_adam

    return as_megatron_adam() if group_step else nullcontext()


def _state(run) -> dict:
    """What the test checks besides the losses: the optimizer's steps and the router buffers."""
    from ucp_plugin.megatron.optimizer_view import inner_optimizers

    groups = [g for o in inner_optimizers(run.optimizer) for g in o.optimizer.param_groups if g["params"]]
    bias = [b.tolist() for n, b in run.model.named_buffers() if n.endswith("expert_bias")]
    return {"group_steps": [g.get("step") for g in groups], "expert_bias": bias,
            "optimizer": type(inner_optimizers(run.optimizer)[0].optimizer).__name__}


def save_run(family: str, model: dict, layout: dict, settings: dict, root: str, save_after: int,
             overrides: dict, group_step: bool) -> dict:
    from ucp_plugin.megatron.checkpoint import save_universal
    from ucp_plugin.testing.harness import TrainSettings, setup, token_batches, train_step
    from ucp_plugin.megatron.layout import MegatronLayout
    from ucp_plugin.models import ModelConfig

    cfg, sets = ModelConfig(**model), TrainSettings(**settings)
    with _optimizer_kind(group_step):
        run = setup(family, cfg, MegatronLayout(**layout), sets, overrides=overrides)
    tokens = token_batches(cfg, sets)
    losses = [train_step(run, t) for t in tokens[:save_after]]
    state = _state(run)
    path = save_universal(run.model, run.optimizer, root, f"iter_{save_after:07d}", save_after, family=family,
                          config=cfg)
    losses += [train_step(run, t) for t in tokens[save_after:]]
    return {"losses": losses, "path": path, "at_save": state}


def load_run(family: str, model: dict, layout: dict, settings: dict, root: str, resave_root: str,
             overrides: dict, group_step: bool) -> dict:
    from ucp_plugin.megatron.checkpoint import save_universal
    from ucp_plugin.testing.harness import TrainSettings, resume, token_batches, train_step
    from ucp_plugin.megatron.layout import MegatronLayout
    from ucp_plugin.models import ModelConfig

    cfg, sets = ModelConfig(**model), TrainSettings(**settings)
    with _optimizer_kind(group_step):
        run, state = resume(family, cfg, MegatronLayout(**layout), sets, root, overrides=overrides)
    it = state["iteration"]
    loaded = _state(run)
    resaved = save_universal(run.model, run.optimizer, resave_root, f"iter_{it:07d}", it, family=family,
                             config=cfg) if resave_root else None
    losses = [train_step(run, t) for t in token_batches(cfg, sets)[it:]]
    return {"losses": losses, "resaved": resaved, "loaded": loaded}


def run_plan(runs: list[dict]) -> dict:
    from mg_workers import run_plan as run_all

    return run_all(runs, {"save": save_run, "load": load_run})
