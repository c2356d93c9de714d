"""GPT (GPT-2/3 style) in megatron-core: LayerNorm with bias, GeLU MLP with biases, learned absolute
position embeddings, output layer tied to the word embedding (on the last pipeline stage of a PP>1
layout megatron keeps a synchronised copy named ``output_layer.weight``; it reads the embedding's atom).
"""
from __future__ import annotations

from ..language import ModelSpec
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
