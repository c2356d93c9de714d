"""Patch of ``deepspeed.runtime.engine.DeepSpeedEngine.load_checkpoint`` (DeepSpeed >= 0.16, < 0.20;
signature at engine.py:4395 in 0.19.8).

When the engine's config has ``"checkpoint": {"universal": true}`` the call goes to ucp_plugin's
loader (universal checkpoints and native DeepSpeed ones, any DP size / ZeRO stage / dtype) with the
same arguments and the same ``(load_path, client_state)`` result; otherwise DeepSpeed's original runs
untouched. ``install`` is idempotent; ``uninstall`` restores the original.
"""
from __future__ import annotations

import functools

SUPPORTED = ("0.16", "0.20")
_MARK = "__ucp_original__"


def install(engine_cls, enabled, universal_load) -> bool:
    original = engine_cls.load_checkpoint
    if getattr(original, _MARK, None) is not None:
        return False

    @functools.wraps(original)
    def load_checkpoint(self, load_dir, tag=None, load_module_strict=True, load_optimizer_states=True,
                        load_lr_scheduler_states=True, load_module_only=False, custom_load_fn=None):
        kwargs = dict(tag=tag, load_module_strict=load_module_strict, load_optimizer_states=load_optimizer_states,
                      load_lr_scheduler_states=load_lr_scheduler_states, load_module_only=load_module_only,
                      custom_load_fn=custom_load_fn)
        if not enabled(self):
            return original(self, load_dir, **kwargs)
        return universal_load(self, load_dir, **kwargs)

    setattr(load_checkpoint, _MARK, original)
    engine_cls.load_checkpoint = load_checkpoint
    return True


def uninstall(engine_cls) -> bool:
    original = getattr(engine_cls.load_checkpoint, _MARK, None)
    if original is None:
        return False
    engine_cls.load_checkpoint = original
    return True
