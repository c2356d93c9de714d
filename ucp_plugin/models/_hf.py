"""Hugging Face mappings shared by the families (``language.hf``): megatron-core's ``GPTModel`` atom
names on the left, ``transformers``' on the right. LLaMA and Mixtral share the attention, norms and
embeddings; GPT-2 (``GPT2LMHeadModel``) has its own names and ``Conv1D`` (transposed) linears.

Megatron's rotary embedding (``rotary_interleaved=False``, the default) rotates halves
(``[-x2, x1]``) with ``inv_freq = base^(-2i/d)``, exactly HF LLaMA's ``rotate_half``: q/k rows need
no permutation (the permutation in HF's Meta-LLaMA converter is for Meta's interleaved pairs).
"""
from __future__ import annotations

from ..language.hf import HfRule, Rows
from .config import ModelConfig

L = "decoder.layers.{0}."
# the padding rows megatron adds to the vocabulary (``megatron.vocab_padding``): not part of the model
VOCAB_PADDING = ("embedding.word_embeddings.weight@vocab_padding", "output_layer.weight@vocab_padding")
ROPE = {"rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"}}  # megatron's rotary_base
LLAMA_FIXED = {"hidden_act": "silu", "rms_norm_eps": 1e-5, "attention_bias": False, "attention_dropout": 0.0,
               **ROPE}
LLAMA_FIELDS = {"hidden_size": "hidden", "num_attention_heads": "heads", "num_key_value_heads": "query_groups",
                "num_hidden_layers": "layers", "vocab_size": "vocab", "max_position_embeddings": "seq_length",
                "tie_word_embeddings": "tied"}


def values(cfg: ModelConfig) -> dict:
    """ModelConfig fields with the defaults resolved (query_groups, moe_ffn)."""
    from dataclasses import asdict
    return {**asdict(cfg), "query_groups": cfg.groups, "moe_ffn": cfg.expert_ffn}


def llama_common(cfg: ModelConfig, hf: str = "model.layers.{0}.") -> tuple[HfRule, ...]:
    """Embedding, norms, GQA attention (fused QKV per query group -> q/k/v), output layer."""
    q, d = cfg.heads // cfg.groups * cfg.head_dim, cfg.head_dim
    qkv = L + "self_attention.linear_qkv.weight"
    rules = [HfRule("embedding.word_embeddings.weight", "model.embed_tokens.weight"),
             HfRule(L + "input_layernorm.weight", hf + "input_layernorm.weight"),
             HfRule(L + "pre_mlp_layernorm.weight", hf + "post_attention_layernorm.weight"),
             HfRule(qkv, hf + "self_attn.q_proj.weight", Rows(cfg.groups, (q, d, d), (0,))),
             HfRule(qkv, hf + "self_attn.k_proj.weight", Rows(cfg.groups, (q, d, d), (1,))),
             HfRule(qkv, hf + "self_attn.v_proj.weight", Rows(cfg.groups, (q, d, d), (2,))),
             HfRule(L + "self_attention.linear_proj.weight", hf + "self_attn.o_proj.weight"),
             HfRule("decoder.final_layernorm.weight", "model.norm.weight")]
    if not cfg.tied:  # tied: HF ties lm_head to embed_tokens (tie_word_embeddings), megatron has no atom
        rules.append(HfRule("output_layer.weight", "lm_head.weight"))
    return tuple(rules)


def swiglu(atom_prefix: str, hf_prefix: str, ffn: int) -> tuple[HfRule, ...]:
    """fc1 = [gate; up] -> gate_proj / up_proj; fc2 -> down_proj."""
    fc1 = atom_prefix + "linear_fc1.weight"
    return (HfRule(fc1, hf_prefix + "gate_proj.weight", Rows(1, (ffn, ffn), (0,))),
            HfRule(fc1, hf_prefix + "up_proj.weight", Rows(1, (ffn, ffn), (1,))),
            HfRule(atom_prefix + "linear_fc2.weight", hf_prefix + "down_proj.weight"))
