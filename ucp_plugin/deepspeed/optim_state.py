"""One optimizer state entry (``optimizer.state[buffer]``) to and from checkpoint terms: per-element
tensors and scalars (Adam's ``step``), in the form the optimizer at hand keeps them.

Optimizers DeepSpeed runs keep ``step`` differently:

- ``torch.optim.Adam``/``AdamW``: a 0-d tensor per parameter, float32 on the CPU, or on the parameter's
  device when the group is ``capturable`` or ``fused`` (torch/optim/adam.py, ``_init_group``);
- DeepSpeed's ``FusedAdam`` (its default for ``"type": "Adam"/"AdamW"``) and ``DeepSpeedCPUAdam`` (under
  ZeRO-Offload): a Python ``int`` per parameter (deepspeed/ops/adam/fused_adam.py:153,
  cpu_adam.py:155). ``FusedAdam`` also keeps ``param_groups[i]["step"]``, read only to seed a new
  state; it travels with the group's hyperparameters (``state.py``).

A checkpoint stores numbers; ``restore_entry`` writes them back as the target optimizer expects:
into the existing value where there is one (same type, same device), else in the form the
optimizer itself would create. New per-element states follow torch's ``load_state_dict`` rule
(``Optimizer._process_value_according_to_param_policy``): the dtype and device of the tensor they
belong to, so nothing read from disk stays on the CPU when the buffer lives on an accelerator.
"""
from __future__ import annotations

import torch

from ..errors import UnsupportedError
from ..format import is_scalar, scalar_value


def split_state(entry: dict, numel: int, where: str) -> tuple[dict, dict]:
    """Optimizer state of one buffer -> (tensor states of the buffer's length, scalars such as step)."""
    tensors, scalars = {}, {}
    for key, value in entry.items():
        if torch.is_tensor(value) and value.numel() == numel and value.dim() > 0:
            tensors[key] = value.detach().reshape(-1)
        elif is_scalar(value) or (torch.is_tensor(value) and value.numel() == 1):
            scalars[key] = scalar_value(value)
        else:
            raise UnsupportedError(f"{where}: optimizer state {key!r} ({type(value).__name__}) is neither "
                                   "a per-element tensor nor a scalar; this optimizer is not supported")
    return tensors, scalars


def _group_of(opt: torch.optim.Optimizer, t: torch.Tensor) -> dict:
    return next((g for g in opt.param_groups if any(p is t for p in g["params"])), {})


def keeps_tensor_scalars(opt: torch.optim.Optimizer) -> bool:
    """torch's own optimizers keep ``step`` as a tensor; DeepSpeed's (and apex/TE-style) as a number."""
    return type(opt).__module__.startswith("torch.optim")


def new_scalar(opt: torch.optim.Optimizer, t: torch.Tensor, value):
    """``value`` as ``opt`` would create it for a fresh state of ``t``."""
    if not keeps_tensor_scalars(opt):
        return scalar_value(value)
    group = _group_of(opt, t)
    if group.get("capturable") or group.get("fused"):
        return torch.tensor(float(value), dtype=torch.float32, device=t.device)
    dtype = torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
    return torch.tensor(float(value), dtype=dtype)  # torch keeps it on the CPU on purpose


def restore_entry(opt: torch.optim.Optimizer, t: torch.Tensor, states: dict, scalars: dict) -> None:
    """Write flat per-element ``states`` and ``scalars`` into ``opt.state[t]``, creating what is missing."""
    entry = opt.state.get(t, {})
    for key, value in states.items():
        old = entry.get(key)
        if torch.is_tensor(old) and old.numel() == value.numel():
            if old.data_ptr() != value.data_ptr():  # load.py reads straight into a live state when it can
                old.copy_(value.view(old.shape))  # keeps DeepSpeed's views of the state (optim_fragment) valid
        else:
            dtype = t.dtype if t.is_floating_point() and value.is_floating_point() else value.dtype
            entry[key] = value.view(t.shape).to(device=t.device, dtype=dtype)
    for key, value in scalars.items():
        old = entry.get(key)
        if torch.is_tensor(old):
            old.fill_(value)
        elif is_scalar(old):
            entry[key] = type(old)(value)
        else:
            entry[key] = new_scalar(opt, t, value)
    opt.state[t] = entry
