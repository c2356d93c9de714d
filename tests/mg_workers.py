"""Worker functions for the Megatron tests, run in fresh processes by ``ucp_plugin.testing.launcher``
(the CPU shim is process-global, so it never enters the pytest process)."""
from __future__ import annotations

import warnings

warnings.filterwarnings("ignore")  # megatron warns about missing apex/TE at every import

ATTRS = ("tensor_model_parallel", "partition_dim", "partition_stride", "is_embedding_or_output_parameter",
         "allreduce", "sequence_parallel", "shared", "shared_embedding")


def _init_single_rank():
    import torch.distributed as dist

    from ucp_plugin.megatron.layout import MegatronLayout
    from ucp_plugin.testing import cpu_shim
    from ucp_plugin.testing.build import init_parallel_state

    if not dist.is_initialized():
        dist.init_process_group("gloo")
    cpu_shim.install()
    init_parallel_state(MegatronLayout())


def _describe(model) -> list[dict]:
    return [{"name": n, "shape": list(p.shape), **{a: getattr(p, a) for a in ATTRS if hasattr(p, a)}}
            for n, p in model.named_parameters()]


def megatron_parameters(models: dict) -> dict:
    """{label: [param description]} for GPTModels built at TP=PP=EP=1 from {label: (family, sizes)}
    (GroupedMLP builds with the CPU shim's grouped_gemm stand-in)."""
    from ucp_plugin.megatron.layout import MegatronLayout
    from ucp_plugin.models import ModelConfig
    from ucp_plugin.testing.build import build_stage_model

    _init_single_rank()
    out = {}
    for label, (family, sizes) in models.items():
        model = build_stage_model(family, ModelConfig(**sizes), MegatronLayout())
        out[label] = _describe(model)
    return out


def step_fix_runs(family: str, model: dict, layout: dict, settings: dict, resume_after: int) -> dict:
    """megatron's DistributedOptimizer round trip (state_dict() / load_state_dict(), what a resume does
    to the inner torch AdamW) after ``resume_after`` steps, without then with ``distopt_fixes``, and
    the uninterrupted run, one after another in this process."""
    import torch.distributed as dist

    from ucp_plugin.megatron import distopt_fixes
    from ucp_plugin.testing import cpu_shim

    cpu_shim.install()
    dist.init_process_group("gloo")
    broken = _resume_in_place(family, model, layout, settings, resume_after)
    distopt_fixes.install()
    fixed = _resume_in_place(family, model, layout, settings, resume_after)
    uninterrupted = _resume_in_place(family, model, layout, settings, None)
    return {"broken": broken, "fixed": fixed, "uninterrupted": uninterrupted["losses"]}


def _resume_in_place(family, model, layout, settings, resume_after) -> dict:
    from ucp_plugin.megatron.layout import MegatronLayout
    from ucp_plugin.models import ModelConfig
    from ucp_plugin.testing.harness import TrainSettings, setup, token_batches, train_step

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


# ----------------------------------------------------------------------------------- plans of runs

def run_plan(runs: list[dict], runners: dict | None = None) -> dict:
    """Run ``runs`` one after another in this process (parallel_state is re-initialised for each
    layout; all layouts have this job's world size). Each run is {"id", "kind": "save" | "load",
    "args"}. Returns {id: result}; a run that raises gives {"error": "<type>: <message>"} (the errors
    expected here are raised on every rank alike, so the other runs go on)."""
    from ucp_plugin.testing.harness import init_process

    init_process()
    out = {}
    for run in runs:
        try:
            out[run["id"]] = (runners or RUNNERS)[run["kind"]](**run["args"])
        except Exception as e:  # reported to the test, which asserts on it
            out[run["id"]] = {"error": f"{type(e).__name__}: {e}"}
    return out


def save_run(family: str, model: dict, layout: dict, settings: dict, root: str, save_after: int,
             optimizer: bool = True, plain: bool = False, async_save: bool = False) -> dict:
    """Train from the reference weights, save a universal checkpoint after ``save_after`` steps, train
    on: the uninterrupted run's losses. ``plain``: save as a user would without describing the model
    (no family, config or vocabulary size). ``async_save``: the save is written while training goes
    on, committed at a step boundary (``ucp_plugin.poll``) or at the end (``ucp_plugin.wait``)."""
    import time

    import ucp_plugin

    from ucp_plugin.megatron.checkpoint import save_universal
    from ucp_plugin.megatron.layout import MegatronLayout
    from ucp_plugin.models import ModelConfig
    from ucp_plugin.testing.harness import TrainSettings, setup, stage_summary, token_batches, train_step

    cfg, sets = ModelConfig(**model), TrainSettings(**settings)
    run = setup(family, cfg, MegatronLayout(**layout), sets)
    tokens = token_batches(cfg, sets)
    losses = [train_step(run, t) for t in tokens[:save_after]]
    start = time.perf_counter()
    described = {} if plain else dict(family=family, config=cfg, extra_state={"note": "test"})
    path = save_universal(run.model, run.optimizer if optimizer else None, root, f"iter_{save_after:07d}",
                          save_after, **described, async_save=async_save)
    seconds = time.perf_counter() - start
    for t in tokens[save_after:]:
        losses.append(train_step(run, t))
        ucp_plugin.poll()
    ucp_plugin.wait()
    return {"losses": losses, "path": path, "save_seconds": seconds, **stage_summary(run)}


def load_run(family: str, model: dict, layout: dict, settings: dict, root: str,
             resave_root: str | None = None, optimizer: bool = True, plain: bool = False,
             vocab: int | None = None) -> dict:
    """Resume the checkpoint in ``root`` at ``layout`` (the layout is validated against its manifest
    first; the model starts from its own initial weights), re-save at once to ``resave_root`` before
    any step, train the remaining steps. ``plain``: load without describing the model (only
    ``vocab``, when given)."""
    from ucp_plugin.megatron.checkpoint import save_universal
    from ucp_plugin.megatron.layout import MegatronLayout
    from ucp_plugin.models import ModelConfig
    from ucp_plugin.testing.harness import TrainSettings, resume, stage_summary, token_batches, train_step

    cfg, sets = ModelConfig(**model), TrainSettings(**settings)
    described = ({"vocab": vocab} if vocab else {}) if plain else None
    run, state = resume(family, cfg, MegatronLayout(**layout), sets, root, optimizer=optimizer,
                        described=described)
    it, opt = state["iteration"], run.optimizer if optimizer else None
    resaved = save_universal(run.model, opt, resave_root, f"iter_{it:07d}", it, state["scheduler_state"],
                             state["extra_state"], family=family, config=cfg) if resave_root else None
    losses = [train_step(run, t) for t in token_batches(cfg, sets)[it:]]
    return {"losses": losses, "iteration": it, "extra": state["extra_state"], "resaved": resaved,
            **stage_summary(run)}


RUNNERS = {"save": save_run, "load": load_run}


def schedule(runs: list[dict]) -> list[tuple[int, list[dict]]]:
    """Group runs ({"id", "world", "after": id of the run it needs or None, ...}) into launches of
    one world size each, a run after the one it needs (in an earlier launch, or earlier in the same
    one). Few launches: each world size in turn takes every run that is ready."""
    pending, done, launches = list(runs), set(), []
    while pending:
        before = len(pending)
        for world in sorted({r["world"] for r in pending}):
            batch, ids = [], set()
            for r in pending:
                if r["world"] == world and (r["after"] is None or r["after"] in done | ids):
                    batch.append(r)
                    ids.add(r["id"])
            if batch:
                launches.append((world, batch))
                done |= ids
                pending = [r for r in pending if r["id"] not in ids]
        if len(pending) == before:
            raise ValueError(f"runs wait for runs that never come: {[r['id'] for r in pending]}")
    return launches
