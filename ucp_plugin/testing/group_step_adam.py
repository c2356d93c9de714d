"""A CPU stand-in for Transformer Engine's ``FusedAdam`` (and apex's), with its state layout, so that
megatron's optimizer runs on CPU as it does with TE on a GPU (test scaffolding).

Matched against NVIDIA/TransformerEngine ``transformer_engine/pytorch/optimizers/fused_adam.py``
(``FusedAdam.__init__``/``initialize_state``/``step``; apex's ``apex/optimizers/fused_adam.py`` keeps
the same layout):

- Adam's ``step`` is one Python int per *param group*, ``group["step"]``, absent until the first
  ``step()``, then incremented once per ``step()`` before the update ("assume same step across group
  now to simplify things"); there is no per-parameter ``step``;
- ``state[p]`` holds ``exp_avg`` and ``exp_avg_sq`` (fp32, zero-initialised for every parameter of
  the group at its first step, whether or not it has a gradient); ``master_param`` only with
  ``master_weights=True``, which megatron does not use (it keeps its own fp32 masters);
- the update is multi_tensor_adam's: L2 mode adds ``wd * p`` to the gradient, AdamW mode
  (``adam_w_mode=True``, megatron's ``decoupled_weight_decay``) adds it to the update; bias
  correction ``1 - beta ** group["step"]`` when ``bias_correction``.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch


class GroupStepAdam(torch.optim.Optimizer):
    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, amsgrad: bool = False, *, bias_correction: bool = True,
                 adam_w_mode: bool = True):
        if amsgrad:
            raise RuntimeError("FusedAdam does not support the AMSGrad variant.")
        super().__init__(params, dict(lr=lr, bias_correction=bias_correction, betas=betas, eps=eps,
                                      weight_decay=weight_decay))
        self.adam_w_mode = adam_w_mode

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            if group["params"]:
                group["step"] = group.get("step", 0) + 1
                self._update(group)
        return loss

    def _update(self, group: dict) -> None:
        beta1, beta2 = group["betas"]
        lr, eps, wd, step = group["lr"], group["eps"], group["weight_decay"], group["step"]
        bc1, bc2 = (1 - beta1 ** step, 1 - beta2 ** step) if group["bias_correction"] else (1.0, 1.0)
        for p in group["params"]:
            state = self.state[p]
            if not state:
                state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
                state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
            if p.grad is None:
                continue
            grad = p.grad if self.adam_w_mode or not wd else p.grad + wd * p
            state["exp_avg"].mul_(beta1).add_(grad, alpha=1 - beta1)
            state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            update = (state["exp_avg"] / bc1) / ((state["exp_avg_sq"] / bc2).sqrt() + eps)
            if self.adam_w_mode and wd:
                update += wd * p
            p.add_(update, alpha=-lr)


@contextmanager
def as_megatron_adam():
    """megatron builds and treats ``GroupStepAdam`` as it does TE's FusedAdam: its optimizer factory
    (``megatron.core.optimizer.Adam``, ``USING_PYTORCH_OPTIMIZER``) and its DistributedOptimizer
    (which accepts only its ``Adam`` and takes the TE path for ``step`` in its own state_dict)."""
    import megatron.core.optimizer as factory
    import megatron.core.optimizer.distrib_optimizer as distrib

    patches = [(factory, "Adam", GroupStepAdam), (factory, "USING_PYTORCH_OPTIMIZER", False),
               (distrib, "Adam", GroupStepAdam), (distrib, "HAVE_APEX_OR_TE", True),
               (distrib, "USING_TE_OPTIMIZER", True)]
    saved = [(module, name, getattr(module, name)) for module, name, _ in patches]
    for module, name, value in patches:
        setattr(module, name, value)
    try:
        yield
    finally:
        for module, name, value in saved:
            setattr(module, name, value)
