"""Patch of ``deepspeed.runtime.engine.DeepSpeedEngine._do_sanity_check`` (DeepSpeed >= 0.16, < 0.20;
defined at engine.py:2002 in 0.19.8 and called from ``DeepSpeedEngine.__init__`` at :583, right after
the config is parsed and before the model is partitioned or the optimizer built).

When the engine's config has ``"checkpoint": {"universal": true}``, ucp_plugin's check runs first, so a
setting universal checkpointing cannot save (ZeRO offload, fp16, pipeline or model parallelism, ...)
stops ``deepspeed.initialize`` with the setting named, not the first save hours into training. Then
DeepSpeed's own checks run unchanged; without the key only they run. ``install`` is idempotent;
``uninstall`` restores the original.
"""
from __future__ import annotations

import functools

SUPPORTED = ("0.16", "0.20")
_MARK = "__ucp_original__"


def install(engine_cls, enabled, check) -> bool:
    """Wrap ``engine_cls._do_sanity_check``: ``check(engine)`` runs when ``enabled(engine)``. False if
    already installed."""
    original = engine_cls._do_sanity_check
    if getattr(original, _MARK, None) is not None:
        return False

    @functools.wraps(original)
    def _do_sanity_check(self):
        if enabled(self):
            check(self)
        return original(self)

    setattr(_do_sanity_check, _MARK, original)
    engine_cls._do_sanity_check = _do_sanity_check
    return True


def uninstall(engine_cls) -> bool:
    original = getattr(engine_cls._do_sanity_check, _MARK, None)
    if original is None:
        return False
    engine_cls._do_sanity_check = original
    return True
