"""Rule builders shared by the families (imported as ``rb``): the names megatron-core's ``GPTModel``
gives its parameters (global names, i.e. as on a single rank) and how tensor parallelism splits each.

Both the local (``get_gpt_layer_local_spec``) and the Transformer-Engine names are declared. TE fuses
the pre-attention / pre-MLP norm into the following linear (``linear_qkv.layer_norm_weight``,
``linear_fc1.layer_norm_weight``) and names its grouped experts ``experts.linear_fc1.weight<K>``.
Megatron's own dist-checkpoints store the local spec's ``input_layernorm.*`` under the TE name, so
the two spellings are one tensor; the language has no alias yet, so here they are separate atoms.
"""
from __future__ import annotations

from ..language import EXPERT, PIPELINE, Fused, Partitioned, Placement, Replicated, Rule, VocabPartitioned
from .config import Architecture, ModelConfig

LAYER = r"decoder\.layers\.\d+\."
WORD_EMBEDDING = "embedding.word_embeddings.weight"

LAYER_PLACEMENT = Placement(r"decoder\.layers\.(\d+)\.", PIPELINE)
# SequentialMLP: one module per local expert; TEGroupedMLP: one weight<K> per local expert
EXPERT_PLACEMENTS = (Placement(r"\.local_experts\.(\d+)\.", EXPERT),
                     Placement(r"\.experts\.linear_fc[12]\.weight(\d+)$", EXPERT))


def _norm_params(arch: Architecture) -> str:
    return r"(weight|bias)" if arch.norm == "LayerNorm" else "weight"


def _te_norm_params(arch: Architecture) -> str:
    return r"layer_norm_(weight|bias)" if arch.norm == "LayerNorm" else "layer_norm_weight"


def embedding_rules(cfg: ModelConfig, arch: Architecture) -> tuple[Rule, ...]:
    rules = [Rule(r"embedding\.word_embeddings\.weight", VocabPartitioned(0, cfg.divisible_by))]
    if arch.position == "learned_absolute":
        rules.append(Rule(r"embedding\.position_embeddings\.weight", Replicated()))
    return tuple(rules)


def output_rules(cfg: ModelConfig) -> tuple[Rule, ...]:
    """With tied embeddings the output layer exists only on the last stage of a PP>1 layout (a copy
    megatron keeps in sync with the word embedding); it is read from the embedding's atom."""
    tied_to = WORD_EMBEDDING if cfg.tied else None
    return (Rule(r"output_layer\.weight", VocabPartitioned(0, cfg.divisible_by), tied_to),)


def norm_rules(arch: Architecture, moe: bool) -> tuple[Rule, ...]:
    """input_layernorm / pre_mlp_layernorm / final_layernorm, replicated across TP (with sequence
    parallelism their gradients are summed over TP, so copies stay identical)."""
    params = _norm_params(arch)
    te = _te_norm_params(arch)
    rules = [Rule(LAYER + r"(input_layernorm|pre_mlp_layernorm)\." + params, Replicated()),
             Rule(r"decoder\.final_layernorm\." + params, Replicated()),
             Rule(LAYER + r"self_attention\.linear_qkv\." + te, Replicated())]
    if not moe:  # an MoE layer keeps its own pre_mlp_layernorm; TE fuses it only into a dense fc1
        rules.append(Rule(LAYER + r"mlp\.linear_fc1\." + te, Replicated()))
    return tuple(rules)


def attention_rules(cfg: ModelConfig, arch: Architecture) -> tuple[Rule, ...]:
    """Fused QKV is laid out per query group ([q_g; k_g; v_g] for each group g), so a TP rank's
    column-parallel slice is contiguous exactly when TP divides the number of query groups."""
    rules = [Rule(LAYER + r"self_attention\.linear_qkv\.weight", Partitioned(0, cfg.groups)),
             Rule(LAYER + r"self_attention\.linear_proj\.weight", Partitioned(1, cfg.heads))]
    if arch.bias:
        rules += [Rule(LAYER + r"self_attention\.linear_qkv\.bias", Partitioned(0, cfg.groups)),
                  Rule(LAYER + r"self_attention\.linear_proj\.bias", Replicated())]
    return tuple(rules)


def mlp_rules(prefix: str, ffn: int, arch: Architecture) -> tuple[Rule, ...]:
    """``prefix`` is a regex for the module holding linear_fc1/linear_fc2. A gated fc1 is
    [gate; up] and each TP rank holds [gate_r; up_r] (megatron's partition_stride=2)."""
    fc1 = Fused(0, (ffn, ffn)) if arch.glu else Partitioned(0)
    rules = [Rule(prefix + r"linear_fc1\.weight", fc1),
             Rule(prefix + r"linear_fc2\.weight", Partitioned(1))]
    if arch.bias:
        rules += [Rule(prefix + r"linear_fc1\.bias", fc1),
                  Rule(prefix + r"linear_fc2\.bias", Replicated())]
    return tuple(rules)


def attributes(cfg: ModelConfig) -> dict[str, int]:
    return {"hidden": cfg.hidden, "heads": cfg.heads, "query_groups": cfg.groups, "ffn": cfg.ffn,
            "layers": cfg.layers, "vocab": cfg.vocab, "divisible_by": cfg.divisible_by,
            "tied": int(cfg.tied), "experts": cfg.experts, "moe_ffn": cfg.expert_ffn if cfg.experts else 0}
