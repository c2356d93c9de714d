"""The sizes of one model instance (``ModelConfig``) and the fixed architecture of a family
(``Architecture``). Both are framework-free values: the Megatron harness turns them into a
``TransformerConfig``, the family modules into checkpoint-language rules.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelConfig:
    """Sizes of a GPT-style model. ``query_groups`` defaults to ``heads`` (multi-head attention);
    ``moe_ffn`` defaults to ``ffn``; ``experts`` = 0 means a dense MLP. ``divisible_by`` is Megatron's
    ``make-vocab-size-divisible-by`` (the embedding is padded to a multiple of it times TP).
    ``tied`` shares the output layer with the word embedding. ``grouped_mlp`` selects megatron's
    GroupedMLP instead of SequentialMLP for the experts (both store the same per-expert atoms)."""
    hidden: int
    heads: int
    ffn: int
    layers: int
    vocab: int
    query_groups: int | None = None
    divisible_by: int = 128
    tied: bool = False
    experts: int = 0
    topk: int = 2
    moe_ffn: int | None = None
    grouped_mlp: bool = False
    seq_length: int = 64

    def __post_init__(self):
        for name in ("hidden", "heads", "ffn", "layers", "vocab", "divisible_by", "seq_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"ModelConfig.{name} must be >= 1, not {getattr(self, name)}")
        if self.hidden % self.heads:
            raise ValueError(f"ModelConfig.hidden={self.hidden} is not divisible by heads={self.heads}; "
                             "choose hidden as a multiple of heads")
        if self.heads % self.groups:
            raise ValueError(f"ModelConfig.heads={self.heads} is not divisible by query_groups="
                             f"{self.groups}; choose query_groups among the divisors of heads")
        if self.experts < 0 or (self.experts and not 1 <= self.topk <= self.experts):
            raise ValueError(f"ModelConfig: topk={self.topk} must be in 1..experts={self.experts}")
        if self.grouped_mlp and not self.experts:
            raise ValueError("ModelConfig.grouped_mlp=True needs experts > 0")

    @property
    def groups(self) -> int:
        """Number of query groups (key/value heads)."""
        return self.query_groups or self.heads

    @property
    def expert_ffn(self) -> int:
        return self.moe_ffn or self.ffn

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


@dataclass(frozen=True)
class Architecture:
    """What does not vary between instances of a family: norm kind ("LayerNorm"/"RMSNorm"),
    gated (SwiGLU) MLP, linear biases, position embedding ("learned_absolute"/"rope"), activation
    ("gelu"/"silu") and whether the MLP is a Mixture of Experts."""
    family: str
    norm: str
    glu: bool
    bias: bool
    position: str
    activation: str
    moe: bool = False

    def __post_init__(self):
        if self.norm not in ("LayerNorm", "RMSNorm"):
            raise ValueError(f"Architecture.norm must be 'LayerNorm' or 'RMSNorm', not {self.norm!r}")
        if self.position not in ("learned_absolute", "rope"):
            raise ValueError(f"Architecture.position must be 'learned_absolute' or 'rope', "
                             f"not {self.position!r}")
        if self.activation not in ("gelu", "silu"):
            raise ValueError(f"Architecture.activation must be 'gelu' or 'silu', not {self.activation!r}")


def resolve(config: ModelConfig | None, overrides: dict) -> ModelConfig:
    """``spec(config)`` or ``spec(hidden=..., ...)``: exactly one of the two forms."""
    if config is not None and overrides:
        raise TypeError(f"pass either a ModelConfig or keyword sizes, not both (got {sorted(overrides)})")
    return config if config is not None else ModelConfig(**overrides)
