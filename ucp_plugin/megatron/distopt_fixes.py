"""Fixes for megatron-core 0.16.x's DistributedOptimizer when neither apex nor Transformer Engine is
installed, so that its inner optimizer is torch's AdamW (which keeps a per-parameter ``step`` tensor,
unlike the fused Adams megatron was written for). Installed by an explicit ``install()`` (idempotent).

1. **Shared step** (silent): ``DistributedOptimizer.load_state_dict`` puts ONE ``step`` tensor into
   every parameter's state; torch AdamW increments ``state["step"]`` in place per parameter, so after
   a load the step advances once per parameter per iteration and the bias correction is wrong (losses
   drift ~1e-4 after one step). Fixed: each parameter gets its own copy after the load.
2. **KeyError 'step'** in ``_set_main_param_and_optimizer_states`` (used by every
   ``load_parameter_state_*``): it copies every key of the destination state, ``step`` included, from
   a source that has only param/exp_avg/exp_avg_sq. Fixed: copy the keys the source has, never
   ``step`` (it comes from ``load_state_dict``; overwriting it with a freshly initialised one silently
   resets the bias correction).
3. A fresh optimizer has no state until its first step, and megatron's loaders assert on that:
   ``ensure_optimizer_state`` initialises it (megatron's own dummy step with zero gradients).

Supported: megatron-core 0.16.x (``SUPPORTED`` below); the version is checked at install.
"""
from __future__ import annotations

import torch

from ..errors import UnsupportedError
from .optimizer_view import inner_optimizers

SUPPORTED = ("0.16.",)
_STATE: dict[str, bool] = {}


def install() -> None:
    if _STATE.get("installed"):
        return
    import megatron.core
    from megatron.core.optimizer import distrib_optimizer

    if not megatron.core.__version__.startswith(SUPPORTED):
        raise UnsupportedError(f"distopt_fixes is written for megatron-core {SUPPORTED}, found "
                               f"{megatron.core.__version__}; check whether the bugs it fixes are still "
                               "there and extend SUPPORTED")
    cls = distrib_optimizer.DistributedOptimizer
    original_load = cls.load_state_dict

    def load_state_dict(self, state_dict):
        original_load(self, state_dict)
        unshare_adam_step(self)

    cls.load_state_dict = load_state_dict
    original_set = cls._set_main_param_and_optimizer_states

    def set_main_param_and_optimizer_states(self, model_param, tensors):
        if self.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
            return original_set(self, model_param, tensors)
        live = self._get_main_param_and_optimizer_states(model_param)
        for key, value in tensors.items():
            if key != "step" and key in live:
                live[key].copy_(value)
        return None

    cls._set_main_param_and_optimizer_states = set_main_param_and_optimizer_states
    _STATE["installed"] = True


def unshare_adam_step(optimizer) -> int:
    """Give every parameter its own ``step`` tensor; returns how many were shared before."""
    shared, seen = 0, set()
    for opt in inner_optimizers(optimizer):
        for state in opt.optimizer.state.values():
            step = state.get("step")
            if isinstance(step, torch.Tensor):
                if id(step) in seen:
                    shared += 1
                    state["step"] = step.clone()
                seen.add(id(state["step"]))
    return shared


def ensure_optimizer_state(optimizer) -> None:
    """Allocate the inner optimizer's state if it has none yet (before loading into it). Uses
    megatron's ``_init_optimizer_states_with_dummy_values`` (a step with zero gradients: it changes
    the main params through weight decay and sets step=1, both meant to be overwritten by the load)."""
    for opt in inner_optimizers(optimizer):
        if len(opt.optimizer.state) == 0 and hasattr(opt, "_init_optimizer_states_with_dummy_values"):
            opt._init_optimizer_states_with_dummy_values()
