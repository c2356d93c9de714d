"""Mixtral in megatron-core: LLaMA attention (RMSNorm, GQA fused QKV, RoPE, no biases, untied output)
with a Mixture-of-Experts MLP: a replicated router and ``experts`` SwiGLU experts.

Experts are split over expert-parallel ranks by index (an "ep" placement: local expert K on EP rank r
is global expert r * experts/EP + K) and each expert over TP like a dense SwiGLU MLP (megatron's
expert-tensor-parallel size; this spec assumes it equals TP, megatron's default).

Declared: SequentialMLP (``mlp.experts.local_experts.K.linear_fc{1,2}.weight``, the local spec) and
TEGroupedMLP (``mlp.experts.linear_fc{1,2}.weight<K>``). Not declared: the legacy GroupedMLP
(``mlp.experts.weight1``/``weight2``): its 2-D parameters are views of [local experts, hidden, ffn/TP]
blocks, one tensor per EP rank holding several experts, transposed relative to the per-expert
linear layout; the language cannot express that yet (see ``GROUPED_MLP_GAP``).
"""
from __future__ import annotations

from ..errors import UnsupportedError
from ..language import Fused, ModelSpec, Partitioned, Replicated, Rule
from . import _blocks as b
from .config import Architecture, ModelConfig, resolve

ARCH = Architecture(family="mixtral", norm="RMSNorm", glu=True, bias=False, position="rope",
                    activation="silu", moe=True)

GROUPED_MLP_GAP = (
    "megatron's legacy GroupedMLP stores all local experts of an EP rank in one 2-D parameter "
    "(weight1: [hidden, local_experts * 2*moe_ffn/TP], memory layout [local_experts, hidden, 2*moe_ffn/TP]; "
    "weight2: [local_experts * moe_ffn/TP, hidden]); the checkpoint language needs a split that views a "
    "parameter as per-expert blocks, maps each block to the expert's atom (transposed) and places blocks "
    "by EP rank. Use the SequentialMLP (grouped_mlp=False) or TEGroupedMLP names meanwhile.")


def expert_rules(cfg: ModelConfig) -> tuple[Rule, ...]:
    ffn = cfg.expert_ffn
    sequential = b.mlp_rules(b.LAYER + r"mlp\.experts\.local_experts\.\d+\.", ffn, ARCH)
    te_grouped = (Rule(b.LAYER + r"mlp\.experts\.linear_fc1\.weight\d+", Fused(0, (ffn, ffn))),
                  Rule(b.LAYER + r"mlp\.experts\.linear_fc2\.weight\d+", Partitioned(1)))
    return (Rule(b.LAYER + r"mlp\.router\.weight", Replicated()),) + sequential + te_grouped


def spec(config: ModelConfig | None = None, **sizes) -> ModelSpec:
    cfg = resolve(config, sizes)
    if not cfg.experts:
        raise ValueError("mixtral.spec: ModelConfig.experts must be > 0 "
                         "(a dense model is ucp_plugin.models.llama)")
    if cfg.grouped_mlp:
        raise UnsupportedError("mixtral.spec(grouped_mlp=True): " + GROUPED_MLP_GAP)
    rules = (b.embedding_rules(cfg, ARCH) + b.norm_rules(ARCH, moe=True) + b.attention_rules(cfg, ARCH)
             + expert_rules(cfg) + b.output_rules(cfg))
    return ModelSpec(family=ARCH.family, rules=rules, placements=(b.LAYER_PLACEMENT,) + b.EXPERT_PLACEMENTS,
                     num_layers=cfg.layers, num_experts=cfg.experts, attributes=b.attributes(cfg))
