"""Mixtral in megatron-core: LLaMA attention (RMSNorm, GQA fused QKV, RoPE, no biases, untied output)
with a Mixture-of-Experts MLP: a replicated router and ``experts`` SwiGLU experts.

Experts are split over expert-parallel ranks by index (an "ep" placement: local expert K on EP rank r
is global expert r * experts/EP + K) and each expert like a dense SwiGLU MLP over megatron's
expert-tensor-parallel (ETP) ranks -- TP by default, or ``expert_tensor_parallel_size``. The splits
below do not depend on the size: the adapter applies them with the expert TP group's rank and size
(``language.tensor_parallel_for``), so a checkpoint moves between ETP sizes like between TP sizes.

Every expert layout is stored as the same per-expert atoms, the SequentialMLP's
(``mlp.experts.local_experts.K.linear_fc{1,2}.weight``, K global), so a checkpoint moves freely
between them and across EP/TP. Declared: SequentialMLP (the local spec), TEGroupedMLP
(``mlp.experts.linear_fc{1,2}.weight<K>``) and the legacy GroupedMLP (``moe_grouped_gemm`` with the
local spec: ``mlp.experts.weight1``/``weight2``, all local experts of an EP rank in one tensor each).
GroupedMLP's forward views weight1 [hidden, E*2*moe_ffn/TP] as E blocks [hidden, 2*moe_ffn/TP] and
weight2 [E*moe_ffn/TP, hidden] as E blocks [moe_ffn/TP, hidden] and multiplies tokens by them
directly, so block K is the transpose of the SequentialMLP's local ``linear_fc1.weight``
([2*moe_ffn/TP, hidden], [gate_r; up_r]) resp. ``linear_fc2.weight`` ([hidden, moe_ffn/TP]): a
``Blocks`` split of transposed blocks over the per-expert atoms.
"""
from __future__ import annotations

from ..language import Blocks, Fused, ModelSpec, Partitioned, Replicated, Rule
from ..language.hf import HfRule, HfSpec
from . import _hf as h
from . import _rules as rb
from .config import Architecture, ModelConfig, resolve

ARCH = Architecture(family="mixtral", norm="RMSNorm", glu=True, bias=False, position="rope",
                    activation="silu", moe=True)


def expert_rules(cfg: ModelConfig) -> tuple[Rule, ...]:
    ffn = cfg.expert_ffn
    fc1, fc2 = Fused(0, (ffn, ffn)), Partitioned(1)
    sequential = rb.mlp_rules(rb.LAYER + r"mlp\.experts\.local_experts\.\d+\.", ffn, ARCH)
    te_grouped = (Rule(rb.LAYER + r"mlp\.experts\.linear_fc1\.weight\d+", fc1),
                  Rule(rb.LAYER + r"mlp\.experts\.linear_fc2\.weight\d+", fc2))
    grouped = (Rule(rb.LAYER + r"mlp\.experts\.weight1",
                    Blocks("local_experts.{index}.linear_fc1.weight", fc1, shared_dim=0)),
               Rule(rb.LAYER + r"mlp\.experts\.weight2",
                    Blocks("local_experts.{index}.linear_fc2.weight", fc2, shared_dim=1)))
    return (Rule(rb.LAYER + r"mlp\.router\.weight", Replicated()),) + sequential + te_grouped + grouped


def spec(config: ModelConfig | None = None, **sizes) -> ModelSpec:
    cfg = resolve(config, sizes)
    if not cfg.experts:
        raise ValueError("mixtral.spec: ModelConfig.experts must be > 0 "
                         "(a dense model is ucp_plugin.models.llama)")
    rules = (rb.embedding_rules(cfg, ARCH) + rb.norm_rules(ARCH, moe=True) + rb.attention_rules(cfg, ARCH)
             + expert_rules(cfg) + rb.output_rules(cfg))
    return ModelSpec(family=ARCH.family, rules=rules, placements=(rb.LAYER_PLACEMENT,) + rb.EXPERT_PLACEMENTS,
                     num_layers=cfg.layers, num_experts=cfg.experts, attributes=rb.attributes(cfg))


HF_MODEL_TYPE = "mixtral"
HF_FIELDS = {**h.LLAMA_FIELDS, "intermediate_size": "moe_ffn", "num_local_experts": "experts",
             "num_experts_per_tok": "topk"}


def hf_spec(config: ModelConfig | None = None, **sizes) -> HfSpec:
    """``MixtralForCausalLM`` (transformers 5): LLaMA attention; the router is ``mlp.gate``; each layer's
    experts are stacked, fc1 ``[gate; up]`` as ``gate_up_proj [E, 2*ffn, hidden]`` and fc2 as
    ``down_proj [E, hidden, ffn]`` -- megatron's per-expert atoms unchanged, one per leading index."""
    cfg = resolve(config, sizes)
    expert = h.L + "mlp.experts.local_experts.{1}."
    rules = h.llama_common(cfg) + (
        HfRule(h.L + "mlp.router.weight", "model.layers.{0}.mlp.gate.weight"),
        HfRule(expert + "linear_fc1.weight", "model.layers.{0}.mlp.experts.gate_up_proj", stack=1),
        HfRule(expert + "linear_fc2.weight", "model.layers.{0}.mlp.experts.down_proj", stack=1))
    return HfSpec("MixtralForCausalLM", HF_MODEL_TYPE, HF_FIELDS, {**h.LLAMA_FIXED, "sliding_window": None,
                                                             "router_jitter_noise": 0.0}, rules,
                  {"head_dim": cfg.head_dim}, h.VOCAB_PADDING)
