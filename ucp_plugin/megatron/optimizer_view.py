"""Where a megatron optimizer keeps each model parameter's fp32 master and optimizer state.

- ``DistributedOptimizer``: each DP rank owns a contiguous range ``[start, stop)`` of every parameter's
  flattened local tensor it overlaps (the grad buffer is cut into DP shards regardless of parameter
  boundaries); its master is a 1-D fp32 tensor of that range (for fp32 models a view into the
  parameter itself), and the inner torch optimizer keeps the state of that 1-D tensor.
- ``Float16OptimizerWithFloat16Params`` (bf16/fp16 without the distributed optimizer): a whole fp32
  copy per parameter (``fp32_from_float16_groups``); fp32 parameters are their own masters.
- ``FP32Optimizer``: the parameter is its own master.
- ``ChainedOptimizer`` (MoE: dense and expert parameters use different DP groups): each inner one.

Adam's ``step`` lives where the inner optimizer keeps it: torch's AdamW keeps a 0-dim tensor per
parameter (``state[p]["step"]``); Transformer Engine's and apex's ``FusedAdam`` keep one int per param
group (``param_groups[i]["step"]``, and no per-parameter step). Either way it is saved as each
parameter's ``step`` scalar, so a checkpoint of one kind loads into the other, on any layout.

The state entries returned are the live dicts of the inner torch optimizer: writing into their
tensors (``copy_``) changes the optimizer.

Loading with the ``DistributedOptimizer``: a DP rank needs only its own range of each parameter's
fp32 master (and states); the model parameters in megatron's DDP buffers are then assembled by
megatron itself (``assemble_model_params``: main shards into the param buffer, then the DP
all-gather that follows every optimizer step), so the DP group reads each stored weight byte once
instead of once per DP rank. Parameters outside the buffers (frozen ones) are read whole.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import UnsupportedError
from ..format import scalar_value


@dataclass(frozen=True)
class Master:
    """This rank's master of elements ``[start, stop)`` of one parameter's local tensor."""
    start: int
    stop: int
    main: torch.Tensor = field(repr=False)
    state: dict = field(repr=False, compare=False)
    distributed: bool = False
    group: dict | None = field(default=None, repr=False, compare=False)  # the inner param group of ``main``


def inner_optimizers(optimizer) -> list:
    """The megatron optimizers inside a (possibly chained) megatron optimizer."""
    return list(getattr(optimizer, "chained_optimizers", None) or [optimizer])


def is_distributed(optimizer) -> bool:
    return any(hasattr(o, "model_param_group_index_map") for o in inner_optimizers(optimizer))


def masters(optimizer) -> dict:
    """{model parameter: Master} for every parameter this rank keeps a master of."""
    out = {}
    for opt in inner_optimizers(optimizer):
        if getattr(getattr(opt, "config", None), "use_precision_aware_optimizer", False):
            raise UnsupportedError("use_precision_aware_optimizer=True keeps scaled low-precision states "
                                   "the universal checkpoint does not read yet; train with it off")
        if hasattr(opt, "model_param_group_index_map"):
            out.update(_distributed_masters(opt))
        elif hasattr(opt, "fp32_from_float16_groups"):
            out.update(_float16_masters(opt))
        else:
            out.update(_fp32_masters(opt))
    return out


def gathered_params(optimizer) -> set[int]:
    """ids of the model parameters the DistributedOptimizer's param all-gather sets: every one in
    its DDP buffers, owned by this rank or not (frozen parameters are in none)."""
    return {id(p) for opt in _gathering(optimizer) for buf in opt.buffers for p in buf.param_index_map}


def _gathering(optimizer) -> list:
    """The DistributedOptimizers whose model parameters live in DDP buffers that megatron all-gathers
    (not a stub without buffers, not FSDP)."""
    return [o for o in inner_optimizers(optimizer)
            if hasattr(o, "model_param_group_index_map") and getattr(o, "buffers", None)]


def assemble_model_params(optimizer) -> None:
    """After each DP rank has set its own main-param shards: copy them into the model's param buffer
    and all-gather it over DP (over expert-DP for expert parameters), as megatron does after a step.
    Collective: every rank of the job calls it."""
    chunks = {}
    for opt in _gathering(optimizer):
        opt._copy_main_params_to_model_params()
        chunks.update((id(c), c) for c in opt.model_chunks)
    for chunk in chunks.values():
        for group in chunk.bucket_groups + chunk.expert_parallel_bucket_groups:
            if group.param_gather_handle is not None:  # a gather still in flight would end the sync below
                group.param_gather_handle.wait()
                group.param_gather_handle = None
        chunk.start_param_sync(force_sync=True)


def _distributed_masters(opt) -> dict:
    out = {}
    for param, (group, order) in opt.model_param_group_index_map.items():
        main = opt.optimizer.param_groups[group]["params"][order]
        owned = opt._get_model_param_range_map(param)["param"]
        out[param] = Master(owned.start, owned.end, main.detach().view(-1), opt.optimizer.state[main], True,
                            opt.optimizer.param_groups[group])
    return out


def _whole(opt, param, main, groups: dict) -> Master:
    return Master(0, param.numel(), main.detach().view(-1), opt.optimizer.state[main], group=groups[id(main)])


def _groups_by_param(opt) -> dict:
    return {id(p): g for g in opt.optimizer.param_groups for p in g["params"]}


def _float16_masters(opt) -> dict:
    out, groups = {}, _groups_by_param(opt)
    for model_group, main_group in zip(opt.float16_groups, opt.fp32_from_float16_groups):
        for param, main in zip(model_group, main_group):
            out[param] = _whole(opt, param, main, groups)
    for group in opt.fp32_from_fp32_groups:
        for param in group:
            out[param] = _whole(opt, param, param, groups)
    return out


def _fp32_masters(opt) -> dict:
    groups = _groups_by_param(opt)
    return {param: _whole(opt, param, param, groups) for group in opt.optimizer.param_groups
            for param in group["params"]}


def ensure_state(optimizer) -> None:
    """Allocate optimizer state where there is none yet (a fresh optimizer, before a load): one
    optimizer step with zero gradients on the masters. It moves the masters by weight decay and sets
    ``step`` to 1; the load overwrites both."""
    for opt in inner_optimizers(optimizer):
        inner = opt.optimizer
        params = [p for g in inner.param_groups for p in g["params"] if p.numel()]
        if all(inner.state.get(p) for p in params):
            continue
        with torch.no_grad():
            saved = [(p, p.grad) for p in params]
            for p in params:
                p.grad = torch.zeros_like(p)
            inner.step()
            for p, grad in saved:
                p.grad = grad


def tensor_states(state: dict) -> dict[str, torch.Tensor]:
    """The per-element states of one master (``exp_avg``, ``exp_avg_sq``, ...)."""
    return {k: v for k, v in state.items() if torch.is_tensor(v) and v.dim() > 0}


def scalar_states(master: Master) -> dict[str, int | float]:
    """The scalar states (torch AdamW's ``step`` tensor, plain numbers) as numbers; a ``step`` kept
    per param group (TE/apex FusedAdam) counts as each of the group's parameters' own."""
    out = {}
    for key, value in master.state.items():
        value = _number(value)
        if value is not None:
            out[key] = value
    if "step" not in out and keeps_group_step(master):
        step = master.group["step"]  # TE's capturable mode: a one-element tensor
        out["step"] = _number(step.reshape(()) if torch.is_tensor(step) else step)
    return out


def _number(value) -> int | float | None:
    if torch.is_tensor(value) and value.dim() == 0:
        value = value.item()
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return scalar_value(value)
    return None


def keeps_group_step(master: Master) -> bool:
    """Whether the inner optimizer keeps Adam's step per param group, not per parameter. TE's
    FusedAdam adds ``group["step"]`` at its first step (``ensure_state`` makes one before a load)."""
    return "step" not in master.state and master.group is not None and "step" in master.group


def set_scalars(master: Master, scalars: dict) -> None:
    """Each master gets its own tensors: torch AdamW increments ``step`` in place, so one tensor shared
    by several parameters would advance once per parameter per step. A per-group step takes its
    parameters' (equal when one optimizer saved them; the last one read wins otherwise). New values
    are made on the device of the value they replace."""
    for key, value in scalars.items():
        holder = master.group if key == "step" and keeps_group_step(master) else master.state
        old = holder.get(key)
        if torch.is_tensor(old):
            holder[key] = torch.full_like(old, float(value)) if old.dim() else \
                torch.tensor(float(value), dtype=old.dtype, device=old.device)
        else:
            holder[key] = value
