"""Workers for test_megatron_deepspeed.py: megatron-core models trained by a DeepSpeed engine
(``ucp_plugin.testing.deepspeed_harness``), and megatron's own harness (``mg_workers``) for the
cross-framework runs. Every run of one world size goes into one launch (``mg_workers.schedule``)."""
from __future__ import annotations

import mg_workers


def _setup(family, model, layout, settings, reference_init=True):
    from ucp_plugin.models import ModelConfig
    from ucp_plugin.testing.deepspeed_harness import EngineLayout, setup_engine
    from ucp_plugin.testing.harness import TrainSettings, token_batches

    cfg, sets = ModelConfig(**model), TrainSettings(**settings)
    engine = setup_engine(family, cfg, EngineLayout(**layout), sets, reference_init=reference_init)
    return engine, sets, token_batches(cfg, sets)


def ds_save(family: str, model: dict, layout: dict, settings: dict, root: str, save_after: int) -> dict:
    """Train from the reference weights, ``engine.save_checkpoint`` after ``save_after`` steps, train on."""
    from ucp_plugin.testing.deepspeed_harness import train_step

    engine, sets, tokens = _setup(family, model, layout, settings)
    losses = [train_step(engine, t, sets) for t in tokens[:save_after]]
    engine.save_checkpoint(root, tag=f"iter_{save_after:07d}", client_state={"note": "test"})
    losses += [train_step(engine, t, sets) for t in tokens[save_after:]]
    return {"losses": losses, "path": f"{root}/iter_{save_after:07d}"}


def ds_load(family: str, model: dict, layout: dict, settings: dict, root: str,
            resave_root: str | None = None) -> dict:
    """``engine.load_checkpoint`` (own initial weights first), re-save before any step, train on."""
    from ucp_plugin.testing.deepspeed_harness import train_step

    engine, sets, tokens = _setup(family, model, layout, settings, reference_init=False)
    _, client = engine.load_checkpoint(root)
    it = engine.global_steps
    resaved = None
    if resave_root:
        engine.save_checkpoint(resave_root, tag=f"iter_{it:07d}", client_state=client)
        resaved = f"{resave_root}/iter_{it:07d}"
    losses = [train_step(engine, t, sets) for t in tokens[it:]]
    return {"losses": losses, "iteration": it, "client": client, "resaved": resaved}


def ds_refused(family: str, model: dict, layout: dict, zero_stage: int, root: str) -> dict:
    """Build the stage model at a megatron ``layout``, call ``deepspeed.initialize`` and, if that
    passes, ``save_checkpoint``: {"error": message, "at": where it was raised}."""
    import deepspeed
    import torch

    import ucp_plugin.deepspeed  # noqa: F401
    from ucp_plugin.integrations.megatron_deepspeed import MegatronMPU
    from ucp_plugin.megatron.layout import MegatronLayout
    from ucp_plugin.models import ModelConfig
    from ucp_plugin.testing.build import build_stage_model, init_parallel_state

    cfg, lay = ModelConfig(**model), MegatronLayout(**layout)
    init_parallel_state(lay)
    module = build_stage_model(family, cfg, lay)
    config = {"train_batch_size": 4 * lay.dp, "train_micro_batch_size_per_gpu": 4,
              "zero_optimization": {"stage": zero_stage}, "checkpoint": {"universal": True}}
    at = "initialize"
    try:
        engine, *_ = deepspeed.initialize(model=module, optimizer=torch.optim.AdamW(module.parameters()),
                                          mpu=MegatronMPU(family, cfg), config=config)
        at = "save"
        engine.save_checkpoint(root)
    except Exception as e:  # the test asserts on the message
        return {"error": f"{type(e).__name__}: {e}", "at": at, "root": root}
    return {"error": None, "at": None, "root": root}


RUNNERS = {"ds_save": ds_save, "ds_load": ds_load, "ds_refused": ds_refused,
           "mg_save": mg_workers.save_run, "mg_load": mg_workers.load_run}


def run_plan(runs: list[dict]) -> dict:
    """``mg_workers.run_plan`` with the DeepSpeed-engine runners too."""
    return mg_workers.run_plan(runs, RUNNERS)
