"""A Megatron-style pretraining entry that takes Megatron-LM's flag names, for GPT, LLaMA and Mixtral
on megatron-core, with universal checkpoints (``--universal-checkpoint``).

    torchrun --nproc-per-node 4 -m recipes.megatron.pretrain \\
        --tensor-model-parallel-size 2 --pipeline-model-parallel-size 2 --use-distributed-optimizer \\
        --num-layers 4 --hidden-size 64 --num-attention-heads 4 --group-query-attention \\
        --num-query-groups 2 --ffn-hidden-size 128 --swiglu --normalization RMSNorm \\
        --position-embedding-type rope --untie-embeddings-and-output-weights \\
        --seq-length 64 --micro-batch-size 1 --global-batch-size 8 --lr 1e-3 --train-iters 20 \\
        --save ckpt --save-interval 10 --load ckpt --universal-checkpoint [--async-save]

With ``--deepspeed --zero-stage N`` (Megatron-DeepSpeed's flags) the model is trained by a DeepSpeed
engine instead of megatron's optimizer (``ucp_plugin.integrations.megatron_deepspeed``: ZeRO over megatron's
data-parallel group, TP x DP); its universal checkpoints are the same format, so either optimizer
resumes the other's.

``--async-save`` (Megatron-LM's flag) saves asynchronously (``ucp_plugin.async_save``): training goes
on while the checkpoint is written; the loop commits it at the next step boundary every rank has
finished writing (``ucp_plugin.poll``) and waits for the last one before returning.

Data: the byte-level text of ``recipes.common`` (Python's standard library sources). On a machine
without CUDA the megatron-core CPU shim is installed; on GPUs it is not.
"""
from __future__ import annotations

import argparse
import json
import os

import torch

import ucp_plugin
from recipes.common import VOCAB, corpus, global_batch
from ucp_plugin.integrations.megatron_lm.flags import UcpOptions, add_ucp_args


def megatron_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="megatron-core pretraining with universal checkpoints")
    a = p.add_argument
    for flag, default in (("--tensor-model-parallel-size", 1), ("--pipeline-model-parallel-size", 1),
                          ("--expert-model-parallel-size", 1), ("--num-layers", 4), ("--hidden-size", 64),
                          ("--num-attention-heads", 4), ("--num-query-groups", None),
                          ("--ffn-hidden-size", None), ("--num-experts", None), ("--moe-router-topk", 2),
                          ("--seq-length", 64), ("--micro-batch-size", 1), ("--global-batch-size", 8),
                          ("--train-iters", 10), ("--save-interval", None), ("--seed", 1234),
                          ("--make-vocab-size-divisible-by", 128),
                          ("--decoder-first-pipeline-num-layers", None),
                          ("--decoder-last-pipeline-num-layers", None), ("--zero-stage", 1),
                          ("--expert-tensor-parallel-size", None)):
        a(flag, type=int, default=default)
    a("--lr", type=float, default=1e-3)
    a("--weight-decay", type=float, default=0.01)
    a("--clip-grad", type=float, default=1.0)
    for flag in ("--sequence-parallel", "--use-distributed-optimizer", "--group-query-attention", "--swiglu",
                 "--untie-embeddings-and-output-weights", "--bf16", "--moe-grouped-gemm", "--deepspeed",
                 "--async-save"):
        a(flag, action="store_true")
    a("--normalization", choices=["LayerNorm", "RMSNorm"], default="LayerNorm")
    a("--position-embedding-type", choices=["learned_absolute", "rope"], default="learned_absolute")
    a("--save")
    a("--load")
    # this entry calls ucp_plugin's save/load itself, so no Megatron-LM patch is involved
    return add_ucp_args(p, check_patched=False)


def configs(args, world_size: int):
    """Megatron flags -> (family, ModelConfig, MegatronLayout, TrainSettings)."""
    from ucp_plugin.megatron.layout import MegatronLayout
    from ucp_plugin.models.config import ModelConfig
    from ucp_plugin.testing.harness import TrainSettings

    family = UcpOptions.from_args(args).family
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    cfg = ModelConfig(hidden=args.hidden_size, heads=args.num_attention_heads,
                      ffn=args.ffn_hidden_size or 4 * args.hidden_size, layers=args.num_layers, vocab=VOCAB,
                      query_groups=args.num_query_groups if args.group_query_attention else None,
                      divisible_by=args.make_vocab_size_divisible_by,
                      tied=not args.untie_embeddings_and_output_weights, experts=args.num_experts or 0,
                      topk=args.moe_router_topk, grouped_mlp=args.moe_grouped_gemm, seq_length=args.seq_length)
    layout = MegatronLayout(tp=tp, pp=pp, dp=world_size // (tp * pp), ep=args.expert_model_parallel_size,
                            etp=args.expert_tensor_parallel_size,
                            sp=args.sequence_parallel,
                            optimizer="distributed" if args.use_distributed_optimizer else "ddp",
                            first_stage_layers=args.decoder_first_pipeline_num_layers,
                            last_stage_layers=args.decoder_last_pipeline_num_layers)
    layout.check_model(cfg.layers, cfg.experts)
    settings = TrainSettings(global_batch=args.global_batch_size, micro_batch=args.micro_batch_size, lr=args.lr,
                             weight_decay=args.weight_decay, clip_grad=args.clip_grad, seed=args.seed,
                             bf16=args.bf16)
    return family, cfg, layout, settings


def _report(progress: str | None, iteration: int, loss: float) -> None:
    import torch.distributed as dist
    if progress and dist.get_rank() == 0:
        with open(progress, "a") as f:
            f.write(json.dumps({"step": iteration, "loss": loss}) + "\n")


class MegatronTrainer:
    """megatron's DDP + optimizer (``ucp_plugin.testing.harness``), ucp_plugin's save/load calls."""

    def __init__(self, family, cfg, layout, settings, async_save: bool = False):
        from ucp_plugin.testing.harness import setup

        self.family, self.cfg, self.run = family, cfg, setup(family, cfg, layout, settings)
        self.async_save = async_save

    def step(self, batch) -> float:
        from ucp_plugin.testing.harness import train_step

        return train_step(self.run, batch)

    def save(self, folder: str, iteration: int) -> None:
        from ucp_plugin.megatron.checkpoint import save_universal

        save_universal(self.run.model, self.run.optimizer, folder, f"iter_{iteration:07d}", iteration,
                       family=self.family, config=self.cfg, async_save=self.async_save)

    def load(self, folder: str, verify: bool) -> int:
        from ucp_plugin.megatron.checkpoint import load_universal

        return load_universal(self.run.model, self.run.optimizer, folder, verify=verify, family=self.family,
                              config=self.cfg)["iteration"]


class DeepSpeedTrainer:
    """A DeepSpeed engine around the megatron-core model (Megatron-DeepSpeed): the engine's own
    ``save_checkpoint`` / ``load_checkpoint``, universal through its config."""

    def __init__(self, family, cfg, layout, settings, zero_stage: int, async_save: bool = False):
        from ucp_plugin.testing.deepspeed_harness import EngineLayout, setup_engine

        if layout.pp > 1 or layout.ep > 1 or layout.sp or layout.etp is not None:
            raise SystemExit("--deepspeed runs TP x DP only: drop --pipeline-model-parallel-size, "
                             "--expert-model-parallel-size, --expert-tensor-parallel-size and "
                             "--sequence-parallel")
        engine_layout = EngineLayout(tp=layout.tp, dp=layout.dp, zero_stage=zero_stage, bf16=settings.bf16)
        self.settings = settings
        self.engine = setup_engine(family, cfg, engine_layout, settings, async_save=async_save)

    def step(self, batch) -> float:
        from ucp_plugin.testing.deepspeed_harness import train_step

        return train_step(self.engine, batch, self.settings)

    def save(self, folder: str, iteration: int) -> None:
        self.engine.save_checkpoint(folder, tag=f"iter_{iteration:07d}")

    def load(self, folder: str, verify: bool) -> int:
        self.engine.load_checkpoint(folder)
        return self.engine.global_steps


def worker(argv: list[str], progress: str | None = None) -> dict:
    """One rank of a pretraining run; returns the losses of the iterations it trained."""
    import torch.distributed as dist

    from ucp_plugin.megatron import distopt_fixes
    from ucp_plugin.testing import cpu_shim

    args = megatron_parser().parse_args(argv)
    if not torch.cuda.is_available():
        cpu_shim.install()
    distopt_fixes.install()
    if not dist.is_initialized():
        dist.init_process_group("gloo" if not torch.cuda.is_available() else "nccl")
    family, cfg, layout, settings = configs(args, dist.get_world_size())
    opts = UcpOptions.from_args(args)
    if not opts.enabled and (args.save or args.load):
        raise SystemExit("this entry saves and loads universal checkpoints only: add --universal-checkpoint")
    trainer = DeepSpeedTrainer(family, cfg, layout, settings, args.zero_stage, args.async_save) \
        if args.deepspeed else MegatronTrainer(family, cfg, layout, settings, args.async_save)
    iteration = 0
    if args.load and os.path.exists(os.path.join(args.load, "latest")):
        iteration = trainer.load(args.load, opts.load_verify)
    tokens, losses = corpus(), []
    while iteration < args.train_iters:
        batch = torch.from_numpy(global_batch(tokens, iteration, settings.global_batch, cfg.seq_length, args.seed))
        losses.append(trainer.step(batch))
        iteration += 1
        _report(progress, iteration, losses[-1])
        if args.save and args.save_interval and iteration % args.save_interval == 0:
            trainer.save(args.save, iteration)
        ucp_plugin.poll()  # a step boundary: commits an asynchronous save once every rank wrote it
    ucp_plugin.wait()  # the last asynchronous save is committed before the run ends
    engine = f"deepspeed zero{args.zero_stage}" if args.deepspeed else "megatron"
    return {"losses": losses, "iteration": iteration, "layout": f"{layout.describe()} ({engine})"}


if __name__ == "__main__":
    import sys
    print(json.dumps(worker(sys.argv[1:])))
