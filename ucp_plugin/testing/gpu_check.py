"""The cases of ``scripts/gpu_check.sh`` (one CUDA device, world size 1; not run by CI).

``python -m ucp_plugin.testing.gpu_check CASE [--cpu-dry-run] [--dir DIR]`` runs one case in this
process and prints one verdict line, ``gpu_check: <CASE>: PASS|FAIL ...``:

- ``ds-zero2-to-zero3`` / ``ds-zero3-to-zero2``: DeepSpeed with the NCCL backend, bf16 and its default
  optimizer (config "AdamW" without ``torch_adam``: ``deepspeed.ops.adam.FusedAdam``, whose ``step`` is
  a Python int), trains, saves a universal checkpoint, trains on (the reference); a fresh engine at the
  other ZeRO stage loads it and trains the same steps; losses compared.
- ``megatron-distopt``: megatron-core GPT with the DistributedOptimizer (Transformer Engine's
  ``FusedAdam`` when TE is importable, which keeps ``step`` per param group; otherwise torch AdamW),
  same flow; also checks that every loaded optimizer state sits on the parameters' device.

``--cpu-dry-run`` runs the same code on CPU over gloo (DeepSpeed's CPU accelerator, the megatron CPU
shim), so the script's Python is exercised where no GPU is.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
import tempfile
import time

import torch

STEPS, SAVE_AT = 6, 3
DS_TOL, MG_TOL = 1e-2, 1e-5  # bf16 across ZeRO stages; fp32 same layout


def _env(dry: bool) -> str:
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    if dry:
        os.environ["DS_ACCELERATOR"] = "cpu"
        return "gloo"
    torch.cuda.set_device(0)
    return "nccl"


def rel(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) / max(abs(y), 1e-12) for x, y in zip(a, b))


# --------------------------------------------------------------------------------------- DeepSpeed

def _ds_config(stage: int) -> dict:
    return {"train_batch_size": 4, "train_micro_batch_size_per_gpu": 4, "gradient_clipping": 1.0,
            "zero_optimization": {"stage": stage}, "bf16": {"enabled": True},
            "optimizer": {"type": "AdamW", "params": {"lr": 3e-3, "weight_decay": 0.01}},
            "checkpoint": {"universal": True}, "steps_per_print": 10**9}


def _ds_model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(32, 128), torch.nn.GELU(), torch.nn.Linear(128, 32))
    net.register_buffer("scale", torch.full((32,), 0.5))  # a persistent buffer, restored by the load
    return net


def _ds_steps(engine, first: int, count: int) -> list[float]:
    losses = []
    for step in range(first, first + count):
        g = torch.Generator().manual_seed(step)
        x, y = torch.randn(4, 32, generator=g), torch.randn(4, 32, generator=g)
        x, y = x.to(engine.device, torch.bfloat16), y.to(engine.device, torch.bfloat16)
        out = engine(x) * engine.module.scale
        loss = torch.nn.functional.mse_loss(out.float(), y.float())
        engine.backward(loss)
        engine.step()
        losses.append(float(loss))
    return losses


def ds_case(source: int, target: int, backend: str, root: str) -> str:
    if backend == "gloo":  # the CPU accelerator JIT-builds a shared-memory comm op at init (~50 s cold), unused here
        importlib.import_module("deepspeed.comm.torch")
        sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
    import deepspeed

    import ucp_plugin.deepspeed  # noqa: F401  (the "checkpoint": {"universal": true} integration)

    deepspeed.init_distributed(dist_backend=backend)
    net = _ds_model(0)
    engine, *_ = deepspeed.initialize(model=net, model_parameters=net.parameters(), config=_ds_config(source))
    optimizer = type(engine.basic_optimizer).__module__ + "." + type(engine.basic_optimizer).__name__
    losses = _ds_steps(engine, 0, SAVE_AT)
    engine.save_checkpoint(root, tag="step3")
    reference = _ds_steps(engine, SAVE_AT, STEPS - SAVE_AT)
    engine.destroy()
    net = _ds_model(1)  # other initial weights: everything must come from the checkpoint
    engine, *_ = deepspeed.initialize(model=net, model_parameters=net.parameters(), config=_ds_config(target))
    engine.load_checkpoint(root, tag="step3")
    resumed = _ds_steps(engine, SAVE_AT, STEPS - SAVE_AT)
    diff = rel(resumed, reference)
    verdict = "PASS" if diff <= DS_TOL else "FAIL"
    return (f"{verdict} ZeRO-{source} -> ZeRO-{target}, {backend}, bf16, {optimizer}: max relative loss "
            f"difference {diff:.1e} (tolerance {DS_TOL:g}); losses before save {[round(v, 4) for v in losses]}")


# ---------------------------------------------------------------------------------------- megatron

def _mg_run(cfg, settings, seed: int, device: str):
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from ucp_plugin.testing.build import build_stage_model
    from ucp_plugin.testing.harness import Run, wrap
    from ucp_plugin.megatron.layout import MegatronLayout

    layout = MegatronLayout()
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)
    model = build_stage_model("gpt", cfg, layout).to(device)
    ddp_model, optimizer = wrap(model, layout, settings)
    return Run(ddp_model, optimizer, None, cfg, layout, settings)


def _mg_step(run, tokens, device: str) -> float:
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from ucp_plugin.testing.harness import forward_step, rank_micro_batches

    micro = [{k: v.to(device) for k, v in mb.items()} for mb in rank_micro_batches(tokens, run.settings, 0, 1)]
    run.model.zero_grad_buffer()
    run.optimizer.zero_grad()
    reduced = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iter(micro), model=[run.model], num_microbatches=len(micro),
        seq_length=run.cfg.seq_length, micro_batch_size=run.settings.micro_batch, forward_only=False)
    run.optimizer.step()
    return sum(float(r["lm loss"]) for r in reduced) / len(micro)


def _state_devices(optimizer) -> set[str]:
    from ucp_plugin.megatron.optimizer_view import masters

    return {str(t.device.type) for m in masters(optimizer).values()
            for t in [m.main, *[v for v in m.state.values() if torch.is_tensor(v)]]}


def megatron_case(backend: str, root: str, device: str) -> str:
    import torch.distributed as dist
    from megatron.core.optimizer import Adam

    from ucp_plugin.megatron import distopt_fixes
    from ucp_plugin.megatron.checkpoint import load_universal, save_universal
    from ucp_plugin.megatron.layout import MegatronLayout
    from ucp_plugin.testing.build import init_parallel_state
    from ucp_plugin.testing.harness import TrainSettings, token_batches
    from ucp_plugin.models import ModelConfig

    dist.init_process_group(backend)
    distopt_fixes.install()
    init_parallel_state(MegatronLayout())
    cfg = ModelConfig(hidden=64, heads=4, ffn=128, layers=2, vocab=256, divisible_by=128, seq_length=32, tied=True)
    settings = TrainSettings(steps=STEPS, global_batch=4, lr=1e-3)
    tokens = token_batches(cfg, settings)
    run = _mg_run(cfg, settings, 1234, device)
    [_mg_step(run, t, device) for t in tokens[:SAVE_AT]]
    save_universal(run.model, run.optimizer, root, "iter_3", SAVE_AT, family="gpt", config=cfg)
    reference = [_mg_step(run, t, device) for t in tokens[SAVE_AT:]]
    resumed_run = _mg_run(cfg, settings, 4321, device)
    load_universal(resumed_run.model, resumed_run.optimizer, os.path.join(root, "iter_3"), family="gpt", config=cfg)
    devices = _state_devices(resumed_run.optimizer)
    resumed = [_mg_step(resumed_run, t, device) for t in tokens[SAVE_AT:]]
    diff = rel(resumed, reference)
    ok = diff <= MG_TOL and devices == {device}
    return (f"{'PASS' if ok else 'FAIL'} megatron-core DistributedOptimizer, world size 1, {backend}, "
            f"{Adam.__module__}.{Adam.__name__}: max relative loss difference {diff:.1e} (tolerance "
            f"{MG_TOL:g}); loaded optimizer states on {sorted(devices)}")


CASES = {"ds-zero2-to-zero3": lambda b, r, d: ds_case(2, 3, b, r),
         "ds-zero3-to-zero2": lambda b, r, d: ds_case(3, 2, b, r),
         "megatron-distopt": megatron_case}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("case", choices=sorted(CASES))
    parser.add_argument("--cpu-dry-run", action="store_true", help="run on CPU over gloo (no GPU needed)")
    parser.add_argument("--dir", help="checkpoint folder (default: a temporary one)")
    args = parser.parse_args(argv)
    backend = _env(args.cpu_dry_run)
    if args.cpu_dry_run and args.case.startswith("megatron"):
        importlib.import_module("ucp_plugin.testing.cpu_shim").install()
    start = time.perf_counter()
    try:
        line = CASES[args.case](backend, args.dir or tempfile.mkdtemp(prefix="ucp-gpu-check-"),
                                "cpu" if args.cpu_dry_run else "cuda")
    except Exception as e:  # the verdict line carries it; the traceback goes to stderr
        import traceback

        traceback.print_exc()
        line = f"FAIL {type(e).__name__}: {str(e)[:300]}"
    print(f"gpu_check: {args.case}: {line} [{time.perf_counter() - start:.0f} s]", flush=True)
    return 0 if line.startswith("PASS") else 1


if __name__ == "__main__":
    sys.exit(main())
