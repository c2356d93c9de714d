"""Model families: each module declares, in the checkpoint language only, how every parameter of
megatron-core's ``GPTModel`` for that family is named and split (``spec(config) -> ModelSpec``).

``gpt`` (LayerNorm, GeLU, learned positions, tied output), ``llama`` (RMSNorm, SwiGLU, GQA, RoPE,
untied), ``mixtral`` (LLaMA attention with a Mixture-of-Experts MLP). They import only
``ucp_plugin.language`` and ``models.config``; the core never imports them.
"""
import importlib
from types import ModuleType

from .config import Architecture, ModelConfig

__all__ = ["Architecture", "ModelConfig", "FAMILIES", "family_module"]

FAMILIES = ("gpt", "llama", "mixtral")


def family_module(family: str) -> ModuleType:
    """The module declaring ``family`` (its ``ARCH`` and ``spec(config)``)."""
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; known: {FAMILIES}")
    return importlib.import_module(f"{__name__}.{family}")
