"""Patch of ``deepspeed.runtime.engine.DeepSpeedEngine._configure_distributed_model`` (DeepSpeed >= 0.16,
< 0.20; defined at engine.py:2074 in 0.19.8 and called once from ``DeepSpeedEngine.__init__`` at :621,
after ``_do_sanity_check`` and before the optimizer is built).

``_do_sanity_check`` runs before the engine holds the model, so settings that only the model shows
(sequence parallelism or MoE layers of a megatron-core model under ``MegatronMPU``) cannot be refused
there. When the engine's config has ``"checkpoint": {"universal": true}``, ucp_plugin's check runs again
right after DeepSpeed has set ``engine.module``, so ``deepspeed.initialize`` still refuses them, before
any optimizer state exists. Without the key the original runs alone. ``install`` is idempotent;
``uninstall`` restores the original.
"""
from __future__ import annotations

import functools

SUPPORTED = ("0.16", "0.20")
_MARK = "__ucp_original__"


def install(engine_cls, enabled, check) -> bool:
    """Wrap ``engine_cls._configure_distributed_model``: ``check(engine)`` runs after it when
    ``enabled(engine)``. False if already installed."""
    original = engine_cls._configure_distributed_model
    if getattr(original, _MARK, None) is not None:
        return False

    @functools.wraps(original)
    def _configure_distributed_model(self, model):
        result = original(self, model)
        if enabled(self):
            check(self)
        return result

    setattr(_configure_distributed_model, _MARK, original)
    engine_cls._configure_distributed_model = _configure_distributed_model
    return True


def uninstall(engine_cls) -> bool:
    original = getattr(engine_cls._configure_distributed_model, _MARK, None)
    if original is None:
        return False
    engine_cls._configure_distributed_model = original
    return True
