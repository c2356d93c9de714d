"""A small Megatron-core training harness for tests and recipes: one family, one layout, N steps.

It uses megatron's own pieces end to end: ``parallel_state``, the stage ``GPTModel``, megatron DDP,
``get_megatron_optimizer`` (DistributedOptimizer or the plain one; torch AdamW when apex/TE are
absent), the pipeline schedule from ``get_forward_backward_func`` and ``finalize_model_grads``.

Batches: a step consumes ``global_batch`` sequences, identical for every layout. Data-parallel rank d
takes sequences [d*G/DP, (d+1)*G/DP) in micro-batches of ``micro_batch`` sequences, so the number of
micro-batches is G / (micro_batch * DP) and every micro-batch holds the same sequences at every
layout. The reported loss of a step is the mean of the micro-batch mean losses over the whole global
batch, identical on every rank.
"""
from __future__ import annotations

import re
import time
from dataclasses import asdict, dataclass

import torch

from ..errors import LayoutError
from ..megatron.layout import MegatronLayout
from ..megatron.validate import validate_layout
from ..models.config import ModelConfig
from .build import build_stage_model, global_named_parameters, init_parallel_state, model_spec
from .reference_init import copy_reference_shards, full_reference_state


@dataclass(frozen=True)
class TrainSettings:
    """Steps and optimizer hyper-parameters. Learning rate is constant (no scheduler)."""
    steps: int = 3
    global_batch: int = 8
    micro_batch: int = 1
    lr: float = 1e-3
    weight_decay: float = 0.01
    clip_grad: float = 1.0
    seed: int = 1234
    data_seed: int = 4321
    bf16: bool = False  # bf16 parameters (Float16Module) with fp32 master weights in the optimizer

    def micro_batches(self, dp: int) -> int:
        if self.global_batch % (self.micro_batch * dp):
            raise LayoutError(f"global_batch={self.global_batch} is not divisible by micro_batch="
                              f"{self.micro_batch} x DP={dp}; pick a global batch that is")
        return self.global_batch // (self.micro_batch * dp)


def token_batches(cfg: ModelConfig, settings: TrainSettings) -> torch.Tensor:
    """[steps, global_batch, seq_length + 1] random token ids, the same for every layout."""
    generator = torch.Generator().manual_seed(settings.data_seed)
    shape = (settings.steps, settings.global_batch, cfg.seq_length + 1)
    return torch.randint(0, cfg.vocab, shape, generator=generator)


def rank_micro_batches(step_tokens: torch.Tensor, settings: TrainSettings, dp_rank: int,
                       dp: int) -> list[dict]:
    """This DP rank's micro-batches of one step's [global_batch, seq + 1] tokens."""
    per_rank = settings.global_batch // dp
    mine = step_tokens[dp_rank * per_rank:(dp_rank + 1) * per_rank]
    seq = step_tokens.shape[1] - 1
    positions = torch.arange(seq).unsqueeze(0).expand(settings.micro_batch, seq)
    return [{"tokens": mb[:, :-1].contiguous(), "labels": mb[:, 1:].contiguous(), "position_ids": positions}
            for mb in torch.split(mine, settings.micro_batch)]


def forward_step(data_iterator, model):
    """megatron's forward_step_func: per-token losses on the last stage, hidden states elsewhere."""
    batch = next(data_iterator)
    output = model(input_ids=batch["tokens"], position_ids=batch["position_ids"], attention_mask=None,
                   labels=batch["labels"])

    def loss_func(per_token_loss):
        loss = per_token_loss.float().mean()
        # a copy: the schedule divides the returned loss in place by the number of micro-batches
        return loss, {"lm loss": loss.detach().clone()}

    return output, loss_func


@dataclass
class Run:
    """What a rank trains: its DDP-wrapped stage model, the megatron optimizer, the spec."""
    model: object
    optimizer: object
    spec: object
    cfg: ModelConfig
    layout: MegatronLayout
    settings: TrainSettings


def setup(family: str, cfg: ModelConfig, layout: MegatronLayout, settings: TrainSettings,
          reference_init: bool = True, overrides: dict | None = None) -> Run:
    """Initialise parallel_state, build this rank's stage, give it the reference weights (identical
    across layouts), wrap it in megatron DDP and build the optimizer. ``overrides`` are extra
    TransformerConfig fields (e.g. ``moe_aux_loss_coeff``)."""
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    overrides = dict(overrides or {})
    if settings.bf16:
        overrides.update(bf16=True, params_dtype=torch.bfloat16, pipeline_dtype=torch.bfloat16)
    spec = model_spec(family, cfg)
    state = reference_state(family, cfg, settings.seed, overrides) if reference_init else None
    init_parallel_state(layout)
    torch.manual_seed(settings.seed)
    model_parallel_cuda_manual_seed(settings.seed)
    model = build_stage_model(family, cfg, layout, **overrides)
    if state is not None:
        copy_reference_shards(model, state, spec, cfg)
    ddp_model, optimizer = wrap(model, layout, settings)
    return Run(ddp_model, optimizer, spec, cfg, layout, settings)


_REFERENCE: dict = {}


def reference_state(family: str, cfg: ModelConfig, seed: int, overrides: dict) -> dict:
    """``full_reference_state``, computed once per process for each model (it does not depend on the
    layout; a process running several layouts one after another reuses it)."""
    key = (family, cfg, seed, tuple(sorted(overrides.items())))
    if key not in _REFERENCE:
        _REFERENCE[key] = full_reference_state(family, cfg, seed, **overrides)
    return _REFERENCE[key]


def wrap(model, layout: MegatronLayout, settings: TrainSettings):
    """megatron DDP around the stage model and its optimizer; wires the schedule's hooks."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from megatron.core.transformer.module import Float16Module

    distributed = layout.optimizer == "distributed"
    ddp_config = DistributedDataParallelConfig(use_distributed_optimizer=distributed,
                                               grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                               check_for_nan_in_grad=False)
    config = model.config
    if config.bf16:
        model = Float16Module(config, model)  # casts inputs to bf16 and the last stage's output to fp32
    ddp_model = DistributedDataParallel(config=config, ddp_config=ddp_config, module=model)
    opt_config = OptimizerConfig(optimizer="adam", lr=settings.lr, weight_decay=settings.weight_decay,
                                 adam_beta1=0.9, adam_beta2=0.95, clip_grad=settings.clip_grad,
                                 use_distributed_optimizer=distributed, bf16=config.bf16,
                                 params_dtype=config.params_dtype)
    optimizer = get_megatron_optimizer(opt_config, [ddp_model], use_gloo_process_groups=False)
    apply_weight_decay_multipliers(optimizer, settings.weight_decay)
    config.no_sync_func = ddp_model.no_sync
    config.finalize_model_grads_func = finalize_model_grads
    config.grad_scale_func = optimizer.scale_loss
    return ddp_model, optimizer


def apply_weight_decay_multipliers(optimizer, weight_decay: float) -> None:
    """Give every param group its ``weight_decay * wd_mult`` (0 for biases and 1-D parameters).
    megatron builds the groups with ``wd_mult`` but leaves ``weight_decay`` at the configured value in
    all of them; Megatron-LM's ``OptimizerParamScheduler`` applies the multiplier at every step. This
    harness has no scheduler (constant LR), so it applies it once, as that scheduler would."""
    from ..megatron.optimizer_view import inner_optimizers

    for opt in inner_optimizers(optimizer):
        for group in opt.optimizer.param_groups:
            group["weight_decay"] = weight_decay * group.get("wd_mult", 1.0)


def train_step(run: Run, step_tokens: torch.Tensor) -> float:
    """One optimizer step on one global batch; returns the global-batch mean loss (every rank)."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    micro = rank_micro_batches(step_tokens, run.settings, dp_rank, dp)
    run.model.zero_grad_buffer()
    run.optimizer.zero_grad()
    reduced = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iter(micro), model=[run.model],
        num_microbatches=len(micro), seq_length=run.cfg.seq_length, micro_batch_size=run.settings.micro_batch,
        forward_only=False)
    ok, _, _ = run.optimizer.step()
    if not ok:
        raise RuntimeError("megatron's optimizer skipped a step (non-finite gradients) in an fp32 run")
    return global_mean_loss(reduced, len(micro) * dp)


def global_mean_loss(reduced: list[dict], total_micro_batches: int) -> float:
    """Sum of micro-batch losses held by the last stage's TP-rank-0 ranks, shared with every rank."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    contributes = ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0
    total = torch.zeros(1, dtype=torch.float64)
    if contributes:
        total += sum(float(r["lm loss"]) for r in reduced)
    dist.all_reduce(total)
    return float(total.item()) / total_micro_batches


def train(run: Run, tokens: torch.Tensor) -> dict:
    losses, times = [], []
    for step_tokens in tokens:
        start = time.perf_counter()
        losses.append(train_step(run, step_tokens))
        times.append(time.perf_counter() - start)
    return {"losses": losses, "step_seconds": times}


def stage_summary(run: Run) -> dict:
    """Which global layers and experts this rank holds, and how many parameters (for checks)."""
    names = [name for name, _ in global_named_parameters(run.model, run.spec, run.cfg)]

    def indices(pattern: str) -> list[int]:
        return sorted({int(m.group(1)) for m in map(re.compile(pattern).search, names) if m})

    return {"layers": indices(r"^decoder\.layers\.(\d+)\."), "experts": indices(r"\.local_experts\.(\d+)\."),
            "num_params": len(names)}


def resume(family: str, cfg: ModelConfig, layout: MegatronLayout, settings: TrainSettings, load_dir: str,
           overrides: dict | None = None, optimizer: bool = True, described: dict | None = None
           ) -> tuple[Run, dict]:
    """Check ``layout`` against the checkpoint in ``load_dir`` (its manifest only: nothing is built or
    read before), build this rank's stage with its own initial weights and load the checkpoint
    (``optimizer=False``: the weights only). ``described``: what ``load_universal`` is told about the
    model (default: family and config). Returns the run and ``load_universal``'s state."""
    from ..megatron.checkpoint import load_universal

    validate_layout(load_dir, layout)
    run = setup(family, cfg, layout, settings, reference_init=False, overrides=overrides)
    opt = run.optimizer if optimizer else None
    described = dict(family=family, config=cfg) if described is None else described
    return run, load_universal(run.model, opt, load_dir, **described)


def init_process() -> None:
    """The per-process set-up of a worker: CPU shim, DistributedOptimizer fixes, gloo."""
    import torch.distributed as dist

    from ..megatron import distopt_fixes
    from . import cpu_shim

    cpu_shim.install()
    distopt_fixes.install()
    if not dist.is_initialized():
        dist.init_process_group("gloo")


def _batches(cfg: ModelConfig, settings: TrainSettings, tokens: list | None) -> torch.Tensor:
    return torch.tensor(tokens) if tokens is not None else token_batches(cfg, settings)


def train_worker(family: str, model: dict, layout: dict, settings: dict | None = None,
                 tokens: list | None = None, overrides: dict | None = None) -> dict:
    """``run_workers`` entry point: JSON-able arguments in, per-step losses and timings out.
    ``tokens`` (optional) is a [steps, global_batch, seq + 1] nested list; default: ``token_batches``."""
    start = time.perf_counter()
    import torch.distributed as dist

    init_process()
    cfg, lay, sets = ModelConfig(**model), MegatronLayout(**layout), TrainSettings(**(settings or {}))
    run = setup(family, cfg, lay, sets, overrides=overrides)
    setup_seconds = time.perf_counter() - start
    result = train(run, _batches(cfg, sets, tokens))
    return {"rank": dist.get_rank(), "layout": asdict(lay), "setup_seconds": setup_seconds,
            **stage_summary(run), **result}


def resume_worker(family: str, model: dict, layout: dict, load_dir: str, settings: dict | None = None,
                  tokens: list | None = None, overrides: dict | None = None) -> dict:
    """``run_workers`` entry point: resume the checkpoint in ``load_dir`` at ``layout`` and train the
    steps after its iteration. A layout the saved model cannot have is refused before this process
    initialises anything (``validate.validate_layout``)."""
    import torch.distributed as dist

    cfg, lay, sets = ModelConfig(**model), MegatronLayout(**layout), TrainSettings(**(settings or {}))
    validate_layout(load_dir, lay)
    init_process()
    run, state = resume(family, cfg, lay, sets, load_dir, overrides)
    result = train(run, _batches(cfg, sets, tokens)[state["iteration"]:])
    return {"rank": dist.get_rank(), "layout": asdict(lay), "iteration": state["iteration"],
            **stage_summary(run), **result}
