"""Worker functions for the Megatron tests, run in fresh processes by ``ucp_plugin.launcher``
(the CPU shim is process-global, so it never enters the pytest process)."""
from __future__ import annotations

import warnings

warnings.filterwarnings("ignore")  # megatron warns about missing apex/TE at every import

ATTRS = ("tensor_model_parallel", "partition_dim", "partition_stride", "is_embedding_or_output_parameter",
         "allreduce", "sequence_parallel", "shared", "shared_embedding")


def _init_single_rank():
    import torch.distributed as dist

    from ucp_plugin.megatron import cpu_shim
    from ucp_plugin.megatron.layout import MegatronLayout, init_parallel_state

    if not dist.is_initialized():
        dist.init_process_group("gloo")
    cpu_shim.install()
    init_parallel_state(MegatronLayout())


def _describe(model) -> list[dict]:
    return [{"name": n, "shape": list(p.shape), **{a: getattr(p, a) for a in ATTRS if hasattr(p, a)}}
            for n, p in model.named_parameters()]


def _allow_grouped_gemm_construction():
    """GroupedMLP asserts the CUDA-only grouped_gemm package at construction; the spec test only
    needs its parameter names and attributes, so the assertion is lifted (no forward is run)."""
    from megatron.core.transformer.moe import grouped_gemm_util

    grouped_gemm_util.assert_grouped_gemm_is_available = lambda: None


def megatron_parameters(models: dict) -> dict:
    """{label: [param description]} for GPTModels built at TP=PP=EP=1 from {label: (family, sizes)}."""
    from ucp_plugin.megatron.build import build_stage_model
    from ucp_plugin.megatron.layout import MegatronLayout
    from ucp_plugin.models import ModelConfig

    _init_single_rank()
    _allow_grouped_gemm_construction()
    out = {}
    for label, (family, sizes) in models.items():
        model = build_stage_model(family, ModelConfig(**sizes), MegatronLayout())
        out[label] = _describe(model)
    return out


def resume_in_place(family: str, model: dict, layout: dict, settings: dict, resume_after: int,
                    fix: bool) -> dict:
    """Train, round-trip the optimizer through megatron's own state_dict()/load_state_dict() after
    ``resume_after`` steps (what a checkpoint resume does to the inner torch AdamW), train on."""
    import torch.distributed as dist

    from ucp_plugin.megatron import cpu_shim, distopt_fixes
    from ucp_plugin.megatron.harness import TrainSettings, setup, token_batches, train_step
    from ucp_plugin.megatron.layout import MegatronLayout
    from ucp_plugin.models import ModelConfig

    cpu_shim.install()
    if fix:
        distopt_fixes.install()
    dist.init_process_group("gloo")
    cfg, sets = ModelConfig(**model), TrainSettings(**settings)
    run = setup(family, cfg, MegatronLayout(**layout), sets)
    losses, shared = [], 0
    for step, tokens in enumerate(token_batches(cfg, sets)):
        if step == resume_after:
            run.optimizer.load_state_dict(run.optimizer.state_dict())
            shared = _count_shared_steps(run.optimizer)
        losses.append(train_step(run, tokens))
    return {"losses": losses, "shared_steps_after_load": shared}


def _count_shared_steps(optimizer) -> int:
    ids = [id(s["step"]) for o in getattr(optimizer, "chained_optimizers", [optimizer])
           for s in o.optimizer.state.values() if "step" in s]
    return len(ids) - len(set(ids))


def _mg_run(family, model, layout, settings, reference_init):
    import torch.distributed as dist

    from ucp_plugin.megatron import cpu_shim, distopt_fixes
    from ucp_plugin.megatron.harness import TrainSettings, setup, token_batches
    from ucp_plugin.megatron.layout import MegatronLayout
    from ucp_plugin.models import ModelConfig

    cpu_shim.install()
    distopt_fixes.install()
    if not dist.is_initialized():
        dist.init_process_group("gloo")
    cfg, sets = ModelConfig(**model), TrainSettings(**settings)
    run = setup(family, cfg, MegatronLayout(**layout), sets, reference_init=reference_init)
    return run, token_batches(cfg, sets)


def save_and_continue(family: str, model: dict, layout: dict, settings: dict, root: str, save_after: int,
                      optimizer: bool = True) -> dict:
    """Train ``save_after`` steps, save a universal checkpoint, train the remaining steps."""
    import time

    from ucp_plugin.megatron.checkpoint import save_universal
    from ucp_plugin.megatron.harness import train_step

    run, tokens = _mg_run(family, model, layout, settings, reference_init=True)
    losses = [train_step(run, t) for t in tokens[:save_after]]
    start = time.perf_counter()
    path = save_universal(run.model, run.optimizer if optimizer else None, root, f"iter_{save_after:07d}",
                          save_after, family=family, config=run.cfg, extra_state={"note": "test"})
    seconds = time.perf_counter() - start
    losses += [train_step(run, t) for t in tokens[save_after:]]
    return {"losses": losses, "path": path, "save_seconds": seconds}


def load_and_continue(family: str, model: dict, layout: dict, settings: dict, root: str,
                      optimizer: bool = True) -> dict:
    """Build the model at ``layout`` with its own (different) initial weights, load the universal
    checkpoint in ``root`` (latest), train the remaining steps."""
    import time

    from ucp_plugin.megatron.checkpoint import load_universal
    from ucp_plugin.megatron.harness import train_step

    run, tokens = _mg_run(family, model, layout, settings, reference_init=False)
    start = time.perf_counter()
    state = load_universal(run.model, run.optimizer if optimizer else None, root, family=family,
                           config=run.cfg)
    seconds = time.perf_counter() - start
    losses = [train_step(run, t) for t in tokens[state["iteration"]:]]
    return {"losses": losses, "iteration": state["iteration"], "extra": state["extra_state"],
            "load_seconds": seconds}
