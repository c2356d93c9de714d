"""GPT (GPT-2/3 style) in megatron-core: LayerNorm with bias, GeLU MLP with biases, learned absolute
position embeddings, output layer tied to the word embedding (on the last pipeline stage of a PP>1
layout megatron keeps a synchronised copy named ``output_layer.weight``; it reads the embedding's atom).
"""
from __future__ import annotations

from ..language import ModelSpec
from ..language.hf import HfRule, HfSpec, Rows
from ._hf import VOCAB_PADDING
from . import _rules as rb
from .config import Architecture, ModelConfig, resolve

ARCH = Architecture(family="gpt", norm="LayerNorm", glu=False, bias=True, position="learned_absolute",
                    activation="gelu")


def default_config(**sizes) -> ModelConfig:
    """A GPT config: tied embeddings unless ``tied=False`` is given."""
    sizes.setdefault("tied", True)
    return ModelConfig(**sizes)


def spec(config: ModelConfig | None = None, **sizes) -> ModelSpec:
    cfg = resolve(config, sizes)
    if cfg.experts:
        raise ValueError("gpt.spec: this family has a dense MLP; for experts use ucp_plugin.models.mixtral")
    rules = (rb.embedding_rules(cfg, ARCH) + rb.norm_rules(ARCH, moe=False) + rb.attention_rules(cfg, ARCH)
             + rb.mlp_rules(rb.LAYER + r"mlp\.", cfg.ffn, ARCH) + rb.output_rules(cfg))
    return ModelSpec(family=ARCH.family, rules=rules, placements=(rb.LAYER_PLACEMENT,),
                     num_layers=cfg.layers, attributes=rb.attributes(cfg))


HF_MODEL_TYPE = "gpt2"
HF_FIELDS = {"n_embd": "hidden", "n_head": "heads", "n_layer": "layers", "n_inner": "ffn", "vocab_size": "vocab",
             "n_positions": "seq_length", "tie_word_embeddings": "tied"}
# megatron's GPT: exact (erf) GeLU, LayerNorm eps 1e-5, no dropout, 1/sqrt(head_dim) attention scale
HF_FIXED = {"activation_function": "gelu", "layer_norm_epsilon": 1e-5, "resid_pdrop": 0.0, "embd_pdrop": 0.0,
            "attn_pdrop": 0.0, "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
            "reorder_and_upcast_attn": False}


def hf_spec(config: ModelConfig | None = None, **sizes) -> HfSpec:
    """``GPT2LMHeadModel``. GPT-2's linears are ``Conv1D`` ([in, out], the transpose of megatron's
    [out, in]); its ``c_attn`` is ``[q; k; v]`` over all heads, megatron's QKV ``[q_h; k_h; v_h]`` per
    head (GPT-2 has no grouped-query attention)."""
    cfg = resolve(config, sizes)
    if cfg.groups != cfg.heads:
        raise ValueError(f"gpt.hf_spec: GPT-2 has no grouped-query attention (query_groups={cfg.groups}, "
                         f"heads={cfg.heads}); export such a model as llama")
    d, L, H = cfg.head_dim, "decoder.layers.{0}.", "transformer.h.{0}."
    qkv = Rows(cfg.heads, (d, d, d), (0, 1, 2))
    rules = [HfRule("embedding.word_embeddings.weight", "transformer.wte.weight"),
             HfRule("embedding.position_embeddings.weight", "transformer.wpe.weight"),
             HfRule("decoder.final_layernorm.weight", "transformer.ln_f.weight"),
             HfRule("decoder.final_layernorm.bias", "transformer.ln_f.bias"),
             HfRule(L + "self_attention.linear_qkv.weight", H + "attn.c_attn.weight", qkv, transpose=True),
             HfRule(L + "self_attention.linear_qkv.bias", H + "attn.c_attn.bias", qkv)]
    for kind in ("weight", "bias"):
        rules += [HfRule(L + f"input_layernorm.{kind}", H + f"ln_1.{kind}"),
                  HfRule(L + f"pre_mlp_layernorm.{kind}", H + f"ln_2.{kind}"),
                  HfRule(L + f"self_attention.linear_proj.{kind}", H + f"attn.c_proj.{kind}", transpose=kind == "weight"),
                  HfRule(L + f"mlp.linear_fc1.{kind}", H + f"mlp.c_fc.{kind}", transpose=kind == "weight"),
                  HfRule(L + f"mlp.linear_fc2.{kind}", H + f"mlp.c_proj.{kind}", transpose=kind == "weight")]
    if not cfg.tied:
        rules.append(HfRule("output_layer.weight", "lm_head.weight"))
    return HfSpec("GPT2LMHeadModel", HF_MODEL_TYPE, HF_FIELDS, HF_FIXED, tuple(rules), dropped=VOCAB_PADDING)
