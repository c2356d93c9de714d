"""Patch of ``deepspeed.runtime.engine.DeepSpeedEngine.save_checkpoint`` (DeepSpeed >= 0.16, < 0.20;
signature at engine.py:4869 in 0.19.8).

When the engine's config has ``"checkpoint": {"universal": true}`` the call goes to ucp_plugin's
writer with the same arguments and return value; otherwise DeepSpeed's original runs untouched.
``install`` is idempotent (a second call finds the marker and does nothing); ``uninstall`` restores
the original.
"""
from __future__ import annotations

import functools

SUPPORTED = ("0.16", "0.20")  # [min, max) DeepSpeed versions whose signature this wraps
_MARK = "__ucp_original__"


def install(engine_cls, enabled, universal_save) -> bool:
    """Wrap ``engine_cls.save_checkpoint``; ``enabled(engine)`` picks the path. False if already done."""
    original = engine_cls.save_checkpoint
    if getattr(original, _MARK, None) is not None:
        return False

    @functools.wraps(original)
    def save_checkpoint(self, save_dir, tag=None, client_state={}, save_latest=True,
                        exclude_frozen_parameters=False):
        if not enabled(self):
            return original(self, save_dir, tag=tag, client_state=client_state, save_latest=save_latest,
                            exclude_frozen_parameters=exclude_frozen_parameters)
        return universal_save(self, save_dir, tag=tag, client_state=client_state, save_latest=save_latest,
                              exclude_frozen_parameters=exclude_frozen_parameters)

    setattr(save_checkpoint, _MARK, original)
    engine_cls.save_checkpoint = save_checkpoint
    return True


def uninstall(engine_cls) -> bool:
    original = getattr(engine_cls.save_checkpoint, _MARK, None)
    if original is None:
        return False
    engine_cls.save_checkpoint = original
    return True
