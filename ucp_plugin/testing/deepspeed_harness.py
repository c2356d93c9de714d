"""A megatron-core GPT model trained by a DeepSpeed engine (the Megatron-DeepSpeed set-up), for tests
and recipes: megatron's ``parallel_state`` for TP x DP, the stage ``GPTModel`` with the reference
weights, ``deepspeed.initialize(..., mpu=MegatronMPU())`` with a ZeRO stage and a torch AdamW whose
param groups and hyper-parameters are megatron's (no weight decay on biases and 1-D parameters,
betas 0.9/0.95), so a run here and one with megatron's own optimizer train the same way.

Batches are ``harness.token_batches`` split as ``harness.rank_micro_batches`` does: every layout sees
the same global batch; DeepSpeed accumulates ``global_batch / DP`` micro-batches of one sequence.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..integrations.megatron_deepspeed import MegatronMPU
from ..megatron.layout import MegatronLayout
from ..models.config import ModelConfig
from .build import build_stage_model, init_parallel_state, model_spec
from .harness import TrainSettings, global_mean_loss, rank_micro_batches, reference_state
from .reference_init import copy_reference_shards


@dataclass(frozen=True)
class EngineLayout:
    """TP x DP with a ZeRO stage (DeepSpeed's engine data-parallel over megatron's DP group)."""
    tp: int = 1
    dp: int = 1
    zero_stage: int = 1
    bf16: bool = False

    @property
    def megatron(self) -> MegatronLayout:
        return MegatronLayout(tp=self.tp, dp=self.dp, optimizer="ddp")

    def describe(self) -> str:
        return f"tp{self.tp}.dp{self.dp}.zero{self.zero_stage}" + (".bf16" if self.bf16 else "")


def ds_config(layout: EngineLayout, settings: TrainSettings, async_save: bool = False) -> dict:
    micro = settings.micro_batches(layout.dp)
    config = {"train_batch_size": settings.global_batch, "train_micro_batch_size_per_gpu": settings.micro_batch,
              "gradient_accumulation_steps": micro, "gradient_clipping": settings.clip_grad,
              "zero_optimization": {"stage": layout.zero_stage},
              "checkpoint": {"universal": True, "async": async_save},
              "steps_per_print": 10 ** 9, "wall_clock_breakdown": False}
    if layout.bf16:
        config["bf16"] = {"enabled": True}
    return config


def megatron_param_groups(model, weight_decay: float) -> list[dict]:
    """megatron's default groups: no weight decay for biases and 1-D parameters."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if name.endswith(".bias") or p.dim() == 1 else decay).append(p)
    return [g for g in ({"params": decay, "weight_decay": weight_decay},
                        {"params": no_decay, "weight_decay": 0.0}) if g["params"]]


def setup_engine(family: str, cfg: ModelConfig, layout: EngineLayout, settings: TrainSettings,
                 reference_init: bool = True, async_save: bool = False):
    """This rank's DeepSpeed engine around its TP shard of the model (``async_save``: its universal
    checkpoints are saved asynchronously)."""
    import deepspeed
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    import ucp_plugin.deepspeed  # noqa: F401  (installs the engine patches)

    state = reference_state(family, cfg, settings.seed, {}) if reference_init else None
    init_parallel_state(layout.megatron)
    torch.manual_seed(settings.seed)
    model_parallel_cuda_manual_seed(settings.seed)
    model = build_stage_model(family, cfg, layout.megatron)
    if state is not None:
        copy_reference_shards(model, state, model_spec(family, cfg), cfg)
    optimizer = torch.optim.AdamW(megatron_param_groups(model, settings.weight_decay), lr=settings.lr,
                                  betas=(0.9, 0.95), eps=1e-8)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, mpu=MegatronMPU(family, cfg),
                                      config=ds_config(layout, settings, async_save))
    return engine


def train_step(engine, step_tokens: torch.Tensor, settings: TrainSettings) -> float:
    """One optimizer step (``global_batch / DP`` micro-batches per rank); the global-batch mean loss."""
    from megatron.core import parallel_state as ps

    micro = rank_micro_batches(step_tokens, settings, ps.get_data_parallel_rank(),
                               ps.get_data_parallel_world_size())
    reduced = []
    for mb in micro:
        loss = engine(input_ids=mb["tokens"], position_ids=mb["position_ids"], attention_mask=None,
                      labels=mb["labels"]).float().mean()
        engine.backward(loss)
        engine.step()
        reduced.append({"lm loss": loss.detach()})
    return global_mean_loss(reduced, len(micro) * ps.get_data_parallel_world_size())
