"""Model families: each module declares, in the checkpoint language only, how every parameter of
megatron-core's ``GPTModel`` for that family is named and split (``spec(config) -> ModelSpec``).

``gpt`` (LayerNorm, GeLU, learned positions, tied output), ``llama`` (RMSNorm, SwiGLU, GQA, RoPE,
untied), ``mixtral`` (LLaMA attention with a Mixture-of-Experts MLP). They import only
``ucp_plugin.language`` and ``models.config``; the core never imports them.
"""
from .config import Architecture, ModelConfig

__all__ = ["Architecture", "ModelConfig"]
