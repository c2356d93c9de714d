"""Model families: each declares, in the checkpoint language only, how every parameter of
megatron-core's ``GPTModel`` for that family is named and split (``spec(config) -> ModelSpec``).

Built in: ``gpt`` (LayerNorm, GeLU, learned positions, tied output), ``llama`` (RMSNorm, SwiGLU, GQA,
RoPE, untied), ``mixtral`` (LLaMA attention with a Mixture-of-Experts MLP). They import only
``ucp_plugin.language`` and ``models.config``; the core never imports them.

Families are registered by name (``FAMILIES``, ``register_family``): a checkpoint records its
family's name, and a load looks the name up here. A family of your own (shared experts, qk-norm, ...)
is any object with ``spec(config) -> ModelSpec`` (and, for ``ucp_plugin.testing``'s model builder, an
``ARCH``); register it from your code before saving or loading (README, "A model family of your own").
"""
from __future__ import annotations

from collections.abc import Mapping

from .config import Architecture, ModelConfig

__all__ = ["Architecture", "ModelConfig", "FAMILIES", "FamilyRegistry", "family_module", "register_family"]


class FamilyRegistry(Mapping):
    """Family name -> family (a module or object with ``spec(config) -> ModelSpec``), in
    registration order. Read-only as a mapping; ``register`` adds."""

    def __init__(self):
        self._families: dict[str, object] = {}

    def register(self, name: str, family) -> None:
        """Make ``family`` known as ``name``. Registering the same object again is a no-op; another
        object under a taken name raises, since checkpoints record only the name."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"a model family name must be a non-empty string, not {name!r}")
        if not callable(getattr(family, "spec", None)):
            raise ValueError(f"model family {name!r}: {family!r} has no spec(config) -> ModelSpec")
        if self._families.get(name, family) is not family:
            raise ValueError(f"model family {name!r} is already registered ({self._families[name]!r}); "
                             "choose another name")
        self._families[name] = family

    def __getitem__(self, name: str):
        return self._families[name]

    def __iter__(self):
        return iter(self._families)

    def __len__(self) -> int:
        return len(self._families)

    def __repr__(self) -> str:
        return repr(tuple(self._families))


FAMILIES = FamilyRegistry()


def register_family(name: str, family) -> None:
    """Register a model family (``FamilyRegistry.register``)."""
    FAMILIES.register(name, family)


def family_module(family: str):
    """The family registered as ``family`` (its ``spec(config)`` and, for the built-ins, ``ARCH``)."""
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; known: {FAMILIES} (register_family adds one)")
    return FAMILIES[family]


def _register_builtins() -> None:
    from . import gpt, llama, mixtral

    for module in (gpt, llama, mixtral):
        register_family(module.ARCH.family, module)


_register_builtins()
