"""LLaMA in megatron-core: RMSNorm (no bias), SwiGLU MLP with a fused [gate; up] fc1, grouped-query
attention with a fused QKV, rotary position embeddings (no parameters), untied output layer, no
linear biases.
"""
from __future__ import annotations

from ..language import ModelSpec
from ..language.hf import HfSpec
from . import _hf as h
from . import _rules as rb
from .config import Architecture, ModelConfig, resolve

ARCH = Architecture(family="llama", norm="RMSNorm", glu=True, bias=False, position="rope",
                    activation="silu")


def spec(config: ModelConfig | None = None, **sizes) -> ModelSpec:
    cfg = resolve(config, sizes)
    if cfg.experts:
        raise ValueError("llama.spec: this family has a dense MLP; for experts use ucp_plugin.models.mixtral")
    rules = (rb.embedding_rules(cfg, ARCH) + rb.norm_rules(ARCH, moe=False) + rb.attention_rules(cfg, ARCH)
             + rb.mlp_rules(rb.LAYER + r"mlp\.", cfg.ffn, ARCH) + rb.output_rules(cfg))
    return ModelSpec(family=ARCH.family, rules=rules, placements=(rb.LAYER_PLACEMENT,),
                     num_layers=cfg.layers, attributes=rb.attributes(cfg))


HF_MODEL_TYPE = "llama"
HF_FIELDS = {**h.LLAMA_FIELDS, "intermediate_size": "ffn"}


def hf_spec(config: ModelConfig | None = None, **sizes) -> HfSpec:
    """``LlamaForCausalLM``: QKV unfused per query group, fc1 into gate/up."""
    cfg = resolve(config, sizes)
    rules = h.llama_common(cfg) + h.swiglu(h.L + "mlp.", "model.layers.{0}.mlp.", cfg.ffn)
    return HfSpec("LlamaForCausalLM", HF_MODEL_TYPE, HF_FIELDS,
                  {**h.LLAMA_FIXED, "mlp_bias": False}, rules, {"head_dim": cfg.head_dim}, h.VOCAB_PADDING)
