"""GPT (GPT-2/3 style) in megatron-core: LayerNorm with bias, GeLU MLP with biases, learned absolute
position embeddings, output layer tied to the word embedding (on the last pipeline stage of a PP>1
layout megatron keeps a synchronised copy named ``output_layer.weight``; it reads the embedding's atom).
"""
from __future__ import annotations

from ..language import ModelSpec
from . import _blocks as b
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
    rules = (b.embedding_rules(cfg, ARCH) + b.norm_rules(ARCH, moe=False) + b.attention_rules(cfg, ARCH)
             + b.mlp_rules(b.LAYER + r"mlp\.", cfg.ffn, ARCH) + b.output_rules(cfg))
    return ModelSpec(family=ARCH.family, rules=rules, placements=(b.LAYER_PLACEMENT,),
                     num_layers=cfg.layers, attributes=b.attributes(cfg))
